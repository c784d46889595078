"""The small Transformer of the demo, the study and the end-to-end benchmark: 3 encoder + 3 decoder layers,
d 256, FFN 1024, 4 heads, embeddings shared by encoder, decoder and output. Its MoE variants replace the FFN of
one layer on each side by experts of the same FFN size.

Given as fairseq flags, not as a registered architecture: the study trains fairseq's own `transformer` as the
dense baseline with the same flags, and scripts/demo.sh (bash) keeps the same numbers as the defaults of its
DEMO_LAYERS, DEMO_DIM, DEMO_FFN and DEMO_HEADS (tests/test_demo.py checks that they agree).
"""

SIZES = {"layers": 3, "dim": 256, "ffn": 1024, "heads": 4}


def size_args(layers=SIZES["layers"], dim=SIZES["dim"], ffn=SIZES["ffn"], heads=SIZES["heads"]):
    """fairseq-train flags of the model's shape (shared embeddings, layers, widths, heads), as strings."""
    layers, dim, ffn, heads = (str(v) for v in (layers, dim, ffn, heads))
    return [
        "--share-all-embeddings",
        "--encoder-layers",
        layers,
        "--decoder-layers",
        layers,
        "--encoder-embed-dim",
        dim,
        "--decoder-embed-dim",
        dim,
        "--encoder-ffn-embed-dim",
        ffn,
        "--decoder-ffn-embed-dim",
        ffn,
        "--encoder-attention-heads",
        heads,
        "--decoder-attention-heads",
        heads,
    ]
