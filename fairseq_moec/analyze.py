"""Routing analysis of a trained MoEC checkpoint: which experts and clusters the tokens of a split go to.

    python -m fairseq_moec.analyze CHECKPOINT DATA_BIN --split valid --out DIR [--max-sentences 1000]

The model runs in eval mode (all experts, no cluster dropout) with teacher forcing over the first
``--max-sentences`` sentence pairs of the split; every MoE layer records its routing (``MoELayer.keep_routing``).
Written to DIR:

- ``load_heatmap.png``  fraction of tokens per expert, one row per MoE layer, cluster boundaries marked;
- ``co_routing.png``    how often a token's two most probable experts are in the same cluster, vs chance;
- ``cluster_load.png``  fraction of tokens per cluster, one panel per layer;
- ``summary.json``      every number behind the pictures, per layer;
- ``report.md``         a short report, with the most frequent tokens per expert (source tokens for encoder
  layers, the decoder's previous output tokens for decoder layers).

This module runs the checkpoint and is the command; the numbers are computed by fairseq_moec/analysis/metrics.py
(plain tensors, checkable by hand), the pictures drawn by analysis/plots.py, the report written by analysis/report.py.
"""

import argparse
import json
import os
import sys
from typing import Dict, Optional, Sequence

import numpy as np
import torch

from .analysis import plots
from .analysis.metrics import LayerRouting, positions_to_tokens
from .analysis.report import _fmt, write_report


def _first_n(dataset, n: int):
    """The first ``n`` items of a fairseq dataset (file order), ordered by length for batching, no shuffling."""
    from fairseq.data import BaseWrapperDataset

    class FirstN(BaseWrapperDataset):
        def __len__(self):
            return n

        @property
        def sizes(self):
            return self.dataset.sizes[:n]

        def ordered_indices(self):
            indices = np.arange(n, dtype=np.int64)
            tgt = getattr(self.dataset, "tgt_sizes", None)
            src = getattr(self.dataset, "src_sizes", None)
            if tgt is not None:
                indices = indices[np.argsort(tgt[indices], kind="mergesort")]
            if src is not None:
                indices = indices[np.argsort(src[indices], kind="mergesort")]
            return indices

    return FirstN(dataset)


def analyze(
    checkpoint: str,
    data_bin: str,
    split: str = "valid",
    max_sentences: int = 1000,
    batch_size: int = 64,
    max_tokens: Optional[int] = 4000,
    top_tokens: int = 8,
    cpu: bool = False,
    progress: bool = True,
) -> Dict:
    """Run the checkpoint over the split and return the summary dict (see module docstring)."""
    from fairseq import checkpoint_utils, utils
    from tqdm import tqdm

    import fairseq_moec  # noqa: F401  (registers the plugin, safe checkpoint loading)

    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task([checkpoint], arg_overrides={"data": data_bin})
    model = models[0]
    if not hasattr(model, "moe_layers") or not model.moe_layers():
        raise SystemExit(f"{checkpoint}: not a MoEC model (no MoE layers)")
    use_cuda = torch.cuda.is_available() and not cpu
    model = model.cuda() if use_cuda else model
    model.eval()

    task.load_dataset(split)
    full = task.dataset(split)
    n = len(full) if not max_sentences or max_sentences <= 0 else min(max_sentences, len(full))
    dataset = _first_n(full, n)
    itr = task.get_batch_iterator(
        dataset=dataset,
        max_tokens=max_tokens,
        max_sentences=batch_size,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=True,
        required_batch_size_multiple=1,
        seed=1,
        num_workers=0,
    ).next_epoch_itr(shuffle=False)

    layers = model.moe_layers()
    dicts = {"encoder": task.source_dictionary, "decoder": task.target_dictionary}
    sides = {name: ("encoder" if name.startswith("enc") else "decoder") for name, _ in layers}
    acc = {
        name: LayerRouting(layer.cfg.moe_expert_count, layer.cfg.moe_clusters, len(dicts[sides[name]]))
        for name, layer in layers
    }
    padding_routed = {name: 0 for name, _ in layers}
    sentences = 0
    for _, layer in layers:
        layer.keep_routing = True
    try:
        with torch.no_grad():
            for sample in tqdm(itr, desc=f"routing {split}", disable=not progress, file=sys.stderr):
                if not sample:
                    continue
                sample = utils.move_to_cuda(sample) if use_cuda else sample
                for _, layer in layers:
                    layer.last_routing = None
                net_input = sample["net_input"]
                model(**net_input, features_only=True)  # routing only: skip the output projection
                sentences += sample["nsentences"]
                for name, layer in layers:
                    if layer.last_routing is None:
                        continue
                    positions, experts, probs = layer.last_routing
                    batch_tokens = (
                        net_input["src_tokens"] if sides[name] == "encoder" else net_input["prev_output_tokens"]
                    )
                    tok = positions_to_tokens(positions, batch_tokens)
                    pad = dicts[sides[name]].pad()
                    keep = tok != pad  # the layers mask padding; this only guards the position -> token mapping
                    padding_routed[name] += int((~keep).sum())
                    acc[name].update(tok[keep].cpu(), experts[keep], probs[keep])
    finally:
        for _, layer in layers:
            layer.keep_routing = False
            layer.last_routing = None

    summary = {
        "checkpoint": os.path.abspath(checkpoint),
        "data": os.path.abspath(data_bin),
        "split": split,
        "sentences": sentences,
        "skipped_sentences": n - sentences,
        "top_k": layers[0][1].cfg.moe_top_k,
        "layers": {},
    }
    for name, layer in layers:
        d = dicts[sides[name]]
        s = acc[name].summary(top_tokens, exclude=[d.pad()])
        s["top_tokens"] = [
            [{"token": d[v], "id": v, "count": c, "share": sh} for v, c, sh in toks] for toks in s["top_tokens"]
        ]
        summary["layers"][name] = {
            "side": sides[name],
            "top_k": layer.cfg.moe_top_k,
            **s,
            "padding_routed": padding_routed[name],
        }
    return summary


def write_outputs(summary: Dict, out: str) -> Dict[str, str]:
    os.makedirs(out, exist_ok=True)
    paths = {
        k: os.path.join(out, f)
        for k, f in (
            ("load_heatmap", "load_heatmap.png"),
            ("co_routing", "co_routing.png"),
            ("cluster_load", "cluster_load.png"),
            ("summary", "summary.json"),
            ("report", "report.md"),
        )
    }
    layers = summary["layers"]
    if any(s["tokens"] for s in layers.values()):
        plots.plot_load_heatmap(layers, paths["load_heatmap"])
        plots.plot_co_routing(layers, paths["co_routing"])
        plots.plot_cluster_load(layers, paths["cluster_load"])
    with open(paths["summary"], "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, ensure_ascii=False)
    write_report(summary, paths["report"])
    return paths


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fairseq_moec.analyze",
        description="Expert and cluster routing analysis of a trained MoEC checkpoint.",
    )
    p.add_argument("checkpoint", help="checkpoint file (e.g. checkpoints/checkpoint_best.pt)")
    p.add_argument("data_bin", help="fairseq-preprocess output directory the model was trained on")
    p.add_argument("--split", default="valid", help="split to analyse (default: valid)")
    p.add_argument("--out", required=True, help="output directory for the PNGs, summary.json and report.md")
    p.add_argument(
        "--max-sentences",
        type=int,
        default=1000,
        help="analyse the first N sentence pairs of the split; 0 = all (default: 1000)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="sentences per batch (default: 64)")
    p.add_argument("--max-tokens", type=int, default=4000, help="tokens per batch (default: 4000)")
    p.add_argument("--top-tokens", type=int, default=8, help="most frequent tokens listed per expert (default: 8)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is available")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def cli_main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = get_parser().parse_args(argv)
    summary = analyze(
        args.checkpoint,
        args.data_bin,
        args.split,
        args.max_sentences,
        args.batch_size,
        args.max_tokens,
        args.top_tokens,
        args.cpu,
        not args.no_progress,
    )
    paths = write_outputs(summary, args.out)
    for name, s in summary["layers"].items():
        print(
            f"{name}: {s['tokens']} tokens, load cv {s['load_cv']:.3f}, entropy {s['load_entropy']:.3f}/"
            f"{s['load_entropy_max']:.3f}, co-routing {_fmt(s['co_routing_rate'])} "
            f"(chance {_fmt(s['co_routing_chance'])}), cluster loads "
            f"{' '.join(f'{x:.2f}' for x in s['cluster_loads'])}"
        )
    print(f"wrote {', '.join(paths.values())}")
    return summary


if __name__ == "__main__":
    cli_main()
