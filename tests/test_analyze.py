"""Routing analysis: the metric functions against hand computations, and the command on a tiny trained model."""

import json
import math
import statistics
import sys

import pytest
import torch
from conftest import run

from fairseq_moec.analysis import metrics as A

# A fixed routing: T = 6 tokens, E = 4 experts in G = 2 clusters (C0 = {0, 1}, C1 = {2, 3}, m = 2).
PROBS = torch.tensor(
    [
        [0.50, 0.30, 0.10, 0.10],  # top-2 = (0, 1): C0, C0  same cluster
        [0.10, 0.60, 0.20, 0.10],  # top-2 = (1, 2): C0, C1  different
        [0.10, 0.10, 0.20, 0.60],  # top-2 = (3, 2): C1, C1  same
        [0.20, 0.10, 0.40, 0.30],  # top-2 = (2, 3): C1, C1  same
        [0.45, 0.05, 0.10, 0.40],  # top-2 = (0, 3): C0, C1  different
        [0.70, 0.20, 0.05, 0.05],  # top-2 = (0, 1): C0, C0  same
    ]
)
EXPERTS = torch.tensor([[0], [1], [3], [2], [0], [0]])  # the top-1 choices, read off PROBS by hand
TOKENS = torch.tensor([5, 7, 5, 9, 7, 5])  # token ids of the 6 routed tokens (vocabulary of 10)


def test_load_counts_fractions_cv_entropy_by_hand():
    counts = A.expert_counts(EXPERTS, 4)
    assert counts.tolist() == [3, 1, 1, 1]
    assert A.load_fractions(counts).tolist() == pytest.approx([1 / 2, 1 / 6, 1 / 6, 1 / 6])
    cv, entropy = A.load_cv_entropy(counts)
    # mean 1.5; deviations (1.5, -.5, -.5, -.5); population variance (2.25 + 3 * 0.25) / 4 = 0.75
    assert cv == pytest.approx(math.sqrt(0.75) / 1.5)  # = 1 / sqrt(3) = 0.57735
    # -(1/2 ln 1/2 + 3 * 1/6 ln 1/6) = 0.5 ln 2 + 0.5 ln 6 = 1.242453
    assert entropy == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(6))
    assert entropy == pytest.approx(1.242453, abs=1e-6)
    # even load: cv 0 and entropy log E; everything on one expert: entropy 0, cv sqrt(E - 1)
    assert A.load_cv_entropy(torch.tensor([2.0, 2, 2, 2])) == pytest.approx((0.0, math.log(4)))
    assert A.load_cv_entropy(torch.tensor([8.0, 0, 0, 0])) == pytest.approx((math.sqrt(3), 0.0), abs=1e-6)


def test_training_statistics_on_the_fixed_routing_by_hand():
    # the training logs' load_cv and load_entropy of the same routing: load [3, 1, 1, 1] as above
    from fairseq_moec.modules import losses

    cv, entropy = losses.load_statistics(losses.expert_counts(EXPERTS, 4))
    assert float(cv) == pytest.approx(1 / math.sqrt(3), rel=1e-6)
    assert float(entropy) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(6), rel=1e-6)


def test_top2_counts_both_choices():
    experts = torch.tensor([[0, 1], [1, 2]])
    assert A.expert_counts(experts, 4).tolist() == [1, 2, 1, 0]
    assert A.load_fractions(A.expert_counts(experts, 4)).tolist() == [0.25, 0.5, 0.25, 0.0]


def test_cluster_loads_by_hand():
    # C0 gets tokens 0, 1, 4, 5 (experts 0, 1, 0, 0) = 4/6; C1 gets tokens 2, 3 = 2/6
    assert A.cluster_loads(A.expert_counts(EXPERTS, 4), 2).tolist() == pytest.approx([2 / 3, 1 / 3])
    assert A.cluster_of(8, 2).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert A.cluster_loads(torch.tensor([1.0, 2, 3, 4, 5, 6]), 3).tolist() == pytest.approx([3 / 21, 7 / 21, 11 / 21])


def test_co_routing_by_hand():
    assert A.same_cluster_top2(PROBS, 2).tolist() == [True, False, True, True, False, True]
    assert A.co_routing_rate(PROBS, 2) == pytest.approx(4 / 6)
    # chance for a random pair of distinct experts: (m - 1) / (E - 1)
    assert A.chance_co_routing(4, 2) == pytest.approx(1 / 3)
    assert A.chance_co_routing(64, 8) == pytest.approx(7 / 63)
    assert A.chance_co_routing(8, 1) == 1.0 and A.co_routing_rate(PROBS, 1) == 1.0  # one cluster: always
    assert A.chance_co_routing(4, 4) == 0.0 and A.co_routing_rate(PROBS, 4) == 0.0  # singleton clusters: never
    assert A.co_routing_rate(PROBS[:, :1], 1) is None and A.chance_co_routing(1, 1) is None


def test_cluster_mass_variances_by_hand():
    # mean router probability per expert: column sums (2.05, 1.35, 1.05, 1.55) / 6
    # C0: (2.05, 1.35)/6, half-difference 0.35/6 -> variance 0.1225/36; C1: (1.05, 1.55)/6 -> 0.0625/36
    # relative masses 4 * m_e = (8.2, 5.4, 4.2, 6.2) / 6: intra = ((1.4/6)^2 + (1/6)^2) / 2 = 2.96 / 72;
    # cluster means 13.6/12 and 10.4/12 around 1 -> inter = (1.6/12)^2
    intra, inter = A.cluster_mass_variances(PROBS.mean(0), 2)
    assert intra == pytest.approx(2.96 / 72)
    assert inter == pytest.approx((1.6 / 12) ** 2)


def test_positions_map_to_time_major_tokens():
    # batch B = 2, L = 3, the second sentence has one pad (id 1); the layer saw [L, B, d] flattened, so
    # position p = l * B + b; position 5 = (l 2, b 1) is the pad and was not routed
    tokens = torch.tensor([[10, 11, 12], [20, 21, 1]])
    assert A.positions_to_tokens(torch.tensor([0, 1, 2, 3, 4]), tokens).tolist() == [10, 20, 11, 21, 12]


def test_top_tokens_per_expert_by_hand():
    counts = A.token_expert_counts(TOKENS, EXPERTS, vocab_size=10, num_experts=4)
    # token 5 -> experts 0, 3, 0; token 7 -> experts 1, 0; token 9 -> expert 2
    assert counts[5].tolist() == [2, 0, 0, 1] and counts[7].tolist() == [1, 1, 0, 0]
    assert counts[9].tolist() == [0, 0, 1, 0]
    assert counts.sum() == 6
    top = A.top_tokens_per_expert(counts, n=3)
    assert top[0] == [(5, 2, pytest.approx(2 / 3)), (7, 1, pytest.approx(1 / 2))]
    assert top[1] == [(7, 1, pytest.approx(1 / 2))]
    assert top[2] == [(9, 1, pytest.approx(1.0))]
    assert top[3] == [(5, 1, pytest.approx(1 / 3))]
    assert A.top_tokens_per_expert(counts, n=1, exclude=[5])[0] == [(7, 1, pytest.approx(1 / 2))]


def test_accumulating_over_batches_equals_one_batch():
    whole = A.LayerRouting(4, 2, 10)
    whole.update(TOKENS, EXPERTS, PROBS)
    parts = A.LayerRouting(4, 2, 10)
    parts.update(TOKENS[:2], EXPERTS[:2], PROBS[:2])
    parts.update(TOKENS[2:], EXPERTS[2:], PROBS[2:])
    a, b = whole.summary(), parts.summary()
    assert a.keys() == b.keys() and a["top_tokens"] == b["top_tokens"]
    for key in a.keys() - {"top_tokens"}:
        assert a[key] == pytest.approx(b[key]), key
    assert a["tokens"] == 6 and a["load_counts"] == [3, 1, 1, 1]
    assert a["co_routing_rate"] == pytest.approx(4 / 6) and a["co_routing_chance"] == pytest.approx(1 / 3)
    assert a["cluster_loads"] == pytest.approx([2 / 3, 1 / 3])
    assert a["intra_var"] == pytest.approx(2.96 / 72) and a["inter_var"] == pytest.approx((1.6 / 12) ** 2)
    assert a["routing_mass"] == pytest.approx([2.05 / 6, 1.35 / 6, 1.05 / 6, 1.55 / 6])
    assert a["load_entropy_max"] == pytest.approx(math.log(4))
    assert a["effective_experts"] == pytest.approx(math.sqrt(12))  # exp(0.5 ln 2 + 0.5 ln 6) = sqrt(12) = 3.46


SUMMARY_LAYER_KEYS = {
    "side",
    "tokens",
    "num_experts",
    "num_clusters",
    "cluster_size",
    "load",
    "load_counts",
    "load_cv",
    "load_entropy",
    "load_entropy_max",
    "effective_experts",
    "co_routing_rate",
    "co_routing_chance",
    "cluster_loads",
    "routing_mass",
    "intra_var",
    "inter_var",
    "top_tokens",
    "padding_routed",
}


@pytest.mark.slow  # fairseq-train and the analysis command
def test_analysis_command_on_tiny_model(tiny_moec_checkpoint, tmp_path):
    from fairseq.data.indexed_dataset import MMapIndexedDataset
    from PIL import Image

    ckpt, data_bin = tiny_moec_checkpoint
    out = tmp_path / "analysis"
    proc = run(
        [
            sys.executable,
            "-m",
            "fairseq_moec.analyze",
            ckpt,
            data_bin,
            "--split",
            "valid",
            "--out",
            out,
            "--max-sentences",
            "50",
            "--batch-size",
            "16",
            "--cpu",
        ],
        cwd=tmp_path,
    )
    assert "enc1:" in proc.stdout and "dec1:" in proc.stdout

    for name in ("load_heatmap.png", "co_routing.png", "cluster_load.png"):
        path = out / name
        assert path.stat().st_size > 0 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert {"checkpoint", "data", "split", "sentences", "skipped_sentences", "top_k", "layers"} <= set(summary)
    assert summary["split"] == "valid" and summary["sentences"] == 50 and summary["skipped_sentences"] == 0
    assert list(summary["layers"]) == ["enc1", "dec1"]

    # every non-padding token of the first 50 sentence pairs was routed once per layer (source tokens in the
    # encoder, previous output tokens = target length in the decoder), and none of them mapped to padding
    def first_50_tokens(lang):  # keep the memory-mapped dataset alive while its sizes are read
        ds = MMapIndexedDataset(str(data_bin / f"valid.es-en.{lang}"))
        return int(ds.sizes[:50].sum())

    src, tgt = first_50_tokens("es"), first_50_tokens("en")
    for name, side, n in (("enc1", "encoder", src), ("dec1", "decoder", tgt)):
        s = summary["layers"][name]
        assert SUMMARY_LAYER_KEYS <= set(s), SUMMARY_LAYER_KEYS - set(s)
        assert s["side"] == side and s["tokens"] == n and s["padding_routed"] == 0
        assert (s["num_experts"], s["num_clusters"], s["cluster_size"]) == (4, 2, 2)
        assert sum(s["load_counts"]) == n and sum(s["load"]) == pytest.approx(1.0)
        assert sum(s["cluster_loads"]) == pytest.approx(1.0) and sum(s["routing_mass"]) == pytest.approx(1.0)
        assert s["cluster_loads"] == pytest.approx([sum(s["load"][:2]), sum(s["load"][2:])])
        assert 0.0 <= s["co_routing_rate"] <= 1.0 and s["co_routing_chance"] == pytest.approx(1 / 3)
        fractions = [c / n for c in s["load_counts"]]  # cv and entropy from the counts, written out
        assert s["load_cv"] == pytest.approx(statistics.pstdev(s["load_counts"]) / (n / 4))
        assert s["load_entropy"] == pytest.approx(-sum(f * math.log(f) for f in fractions if f > 0))
        assert len(s["top_tokens"]) == 4
        routed = [t for toks in s["top_tokens"] for t in toks]
        assert routed and all(isinstance(t["token"], str) and t["count"] > 0 and 0 < t["share"] <= 1 for t in routed)
        assert "<pad>" not in {t["token"] for t in routed}

    report = (out / "report.md").read_text(encoding="utf-8")
    assert "### enc1 (source tokens)" in report and "### dec1 (previous target tokens)" in report
    assert "load_heatmap.png" in report
