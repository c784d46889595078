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

The metric functions at the top take plain tensors (no fairseq), so they can be checked by hand.
Load counts every routing choice (k per token for top-k models) as the training statistics do.
"""
import argparse
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .modules import losses

# ----------------------------------------------------------------------------------------------------------------
# Pure computations on routing tensors (T routed tokens, E experts, G clusters of m = E / G contiguous experts)
# ----------------------------------------------------------------------------------------------------------------


def expert_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Routing choices per expert: experts [T, k] (or [T]) -> float64 counts [E] (k choices per token)."""
    return losses.expert_counts(experts.long().cpu(), num_experts).double()


def load_fractions(counts: torch.Tensor) -> torch.Tensor:
    """Counts [E] -> fraction of routing choices per expert (sums to 1; zeros if nothing was routed)."""
    total = counts.sum()
    return counts / total if total > 0 else torch.zeros_like(counts)


def load_cv_entropy(counts: torch.Tensor) -> Tuple[float, float]:
    """(cv, entropy) of a load vector, computed as in training (``losses.load_statistics``): coefficient of
    variation of the counts (population std / mean; 0 = perfectly even) and entropy in nats of the load
    distribution (log E = perfectly even, 0 = everything on one expert)."""
    cv, entropy = losses.load_statistics(counts)
    return float(cv), float(entropy)


def cluster_of(num_experts: int, num_clusters: int) -> torch.Tensor:
    """Cluster index of every expert: e // (E / G)."""
    return torch.arange(num_experts) // (num_experts // num_clusters)


def cluster_loads(counts: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """Counts [E] -> fraction of routing choices per cluster [G]."""
    return load_fractions(counts.double().view(num_clusters, -1).sum(1))


def same_cluster_top2(probs: torch.Tensor, num_clusters: int) -> torch.Tensor:
    """bool [T]: the two most probable experts of each token (top-2 of ``probs``, whatever k the model routes
    with) are in the same cluster."""
    top2 = probs.topk(2, dim=-1).indices
    c = top2 // (probs.shape[1] // num_clusters)
    return c[:, 0] == c[:, 1]


def co_routing_rate(probs: torch.Tensor, num_clusters: int) -> Optional[float]:
    """Fraction of tokens whose top-2 experts share a cluster; None when E < 2 or there are no tokens."""
    if probs.shape[1] < 2 or probs.shape[0] == 0:
        return None
    return float(same_cluster_top2(probs, num_clusters).double().mean())


def chance_co_routing(num_experts: int, num_clusters: int) -> Optional[float]:
    """Co-routing rate of a random pair of distinct experts: (m - 1) / (E - 1), m = E / G. A router that ignores
    the clusters sits here; one whose clusters group experts that serve the same tokens sits above it."""
    if num_experts < 2:
        return None
    m = num_experts // num_clusters
    return (m - 1) / (num_experts - 1)


def cluster_mass_variances(mean_probs: torch.Tensor, num_clusters: int) -> Tuple[float, float]:
    """(intra, inter) of the relative routing mass E * m_e (m_e: mean router probability of each expert over the
    tokens), as the training logs them (``losses.cluster_variances``): mean over clusters of the variance of
    E * m_e inside the cluster, and the variance of the cluster means."""
    intra, inter = losses.cluster_variances(mean_probs.double() * mean_probs.numel(), num_clusters)
    return float(intra), float(inter)


def positions_to_tokens(positions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Token ids of routed positions. ``tokens`` is the batch [B, L] (fairseq's src_tokens or
    prev_output_tokens); the MoE layer saw its input time-major [L, B, d] flattened, so position p is
    (l, b) = divmod(p, B)."""
    B = tokens.shape[0]
    l, b = positions // B, positions % B
    return tokens[b, l]


def token_expert_counts(token_ids: torch.Tensor, experts: torch.Tensor, vocab_size: int,
                        num_experts: int) -> torch.Tensor:
    """[V, E] int64: how often token v was routed to expert e (all k choices of every token)."""
    k = experts.shape[1] if experts.dim() == 2 else 1
    tok = token_ids.long().cpu().repeat_interleave(k)
    flat = tok * num_experts + experts.reshape(-1).long().cpu()
    return torch.bincount(flat, minlength=vocab_size * num_experts).view(vocab_size, num_experts)


def top_tokens_per_expert(counts: torch.Tensor, n: int, exclude: Sequence[int] = ()
                          ) -> List[List[Tuple[int, int, float]]]:
    """For every expert, its ``n`` most frequent tokens as (token id, count, share); share = the fraction of that
    token's routings that went to this expert (1.0 = the expert gets every occurrence). Ties: lower id first.
    Tokens in ``exclude`` (e.g. padding) are skipped; tokens never routed to the expert are not listed."""
    counts = counts.long().clone()
    if len(exclude):
        counts[list(exclude)] = 0
    per_token = counts.sum(1)
    out = []
    for e in range(counts.shape[1]):
        col = counts[:, e]
        # stable sort by descending count keeps lower ids first among equal counts
        order = torch.sort(-col, stable=True).indices[:n]
        out.append([(int(v), int(col[v]), float(col[v]) / float(per_token[v])) for v in order if col[v] > 0])
    return out


class LayerRouting:
    """Accumulates one MoE layer's routing over batches; ``summary()`` gives the per-layer numbers."""

    def __init__(self, num_experts: int, num_clusters: int, vocab_size: int):
        self.E, self.G, self.V = num_experts, num_clusters, vocab_size
        self.counts = torch.zeros(num_experts, dtype=torch.float64)
        self.prob_sum = torch.zeros(num_experts, dtype=torch.float64)
        self.same_cluster = 0
        self.tokens = 0
        self.token_counts = torch.zeros(vocab_size, num_experts, dtype=torch.long)

    def update(self, token_ids: torch.Tensor, experts: torch.Tensor, probs: torch.Tensor) -> None:
        experts, probs = experts.cpu(), probs.cpu()
        self.tokens += probs.shape[0]
        self.counts += expert_counts(experts, self.E)
        self.prob_sum += probs.double().sum(0)
        if self.E >= 2 and probs.shape[0]:
            self.same_cluster += int(same_cluster_top2(probs, self.G).sum())
        self.token_counts += token_expert_counts(token_ids, experts, self.V, self.E)

    def summary(self, top_n: int = 8, exclude: Sequence[int] = ()) -> Dict:
        cv, entropy = load_cv_entropy(self.counts)
        mean_probs = self.prob_sum / max(self.tokens, 1)
        intra, inter = cluster_mass_variances(mean_probs, self.G)
        return {
            "tokens": self.tokens,
            "num_experts": self.E,
            "num_clusters": self.G,
            "cluster_size": self.E // self.G,
            "load_counts": [int(c) for c in self.counts],
            "load": [float(x) for x in load_fractions(self.counts)],
            "load_cv": cv,
            "load_entropy": entropy,
            "load_entropy_max": math.log(self.E),
            "effective_experts": math.exp(entropy),  # exp(entropy): E for an even load, 1 for a collapsed one
            "co_routing_rate": (self.same_cluster / self.tokens) if self.E >= 2 and self.tokens else None,
            "co_routing_chance": chance_co_routing(self.E, self.G),
            "cluster_loads": [float(x) for x in cluster_loads(self.counts, self.G)],
            "routing_mass": [float(x) for x in mean_probs],
            "intra_var": intra,
            "inter_var": inter,
            "top_tokens": top_tokens_per_expert(self.token_counts, top_n, exclude),
        }


# ----------------------------------------------------------------------------------------------------------------
# Pictures (matplotlib, Agg backend)
# ----------------------------------------------------------------------------------------------------------------


def _pyplot():
    import logging
    for name in ("matplotlib", "PIL"):  # an imported module may have put the root logger on DEBUG
        logging.getLogger(name).setLevel(logging.WARNING)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_load_heatmap(layers: Dict[str, Dict], path: str) -> None:
    plt = _pyplot()
    names = list(layers)
    E = max(s["num_experts"] for s in layers.values())
    data = np.full((len(names), E), np.nan)
    for i, name in enumerate(names):
        data[i, :layers[name]["num_experts"]] = layers[name]["load"]
    fig, ax = plt.subplots(figsize=(min(3 + 0.45 * E, 14), max(2.8, 1.6 + 0.55 * len(names))))
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, interpolation="nearest")
    ax.set_yticks(range(len(names)), names)
    ax.set_xticks(range(E) if E <= 32 else range(0, E, max(1, E // 16)))
    ax.set_xlabel("expert")
    s0 = layers[names[0]]
    m, G = s0["cluster_size"], s0["num_clusters"]
    for g in range(1, G):
        ax.axvline(g * m - 0.5, color="white", lw=2)
    if G > 1:
        top = ax.secondary_xaxis("top")
        top.set_xticks([g * m + (m - 1) / 2 for g in range(G)], [f"C{g}" for g in range(G)])
        top.tick_params(length=0)
        top.set_xlabel("cluster")
    if E <= 16:
        vmax = np.nanmax(data) if np.isfinite(data).any() else 1.0
        for i in range(len(names)):
            for e in range(E):
                if np.isfinite(data[i, e]):
                    ax.text(e, i, f"{data[i, e]:.2f}", ha="center", va="center", fontsize=8,
                            color="black" if data[i, e] > 0.6 * vmax else "white")
    fig.colorbar(im, ax=ax, label="fraction of tokens")
    ax.set_title(f"Expert load per MoE layer (even = 1/{E} = {1 / E:.3g})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_co_routing(layers: Dict[str, Dict], path: str) -> None:
    plt = _pyplot()
    names = list(layers)
    rates = [layers[n]["co_routing_rate"] or 0.0 for n in names]
    chance = [layers[n]["co_routing_chance"] or 0.0 for n in names]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(names) + 2), 3.6))
    ax.bar(x, rates, width=0.6, color="tab:blue", label="top-2 experts in the same cluster")
    for i, (r, c) in enumerate(zip(rates, chance)):
        ax.hlines(c, i - 0.4, i + 0.4, colors="black", linestyles="--", label="chance (m-1)/(E-1)" if i == 0 else None)
        ax.text(i, r + 0.02, f"{r:.2f}", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("fraction of tokens")
    ax.set_title("Cluster co-routing of the two most probable experts")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_cluster_load(layers: Dict[str, Dict], path: str) -> None:
    plt = _pyplot()
    names = list(layers)
    fig, axes = plt.subplots(1, len(names), figsize=(max(4, 3.2 * len(names)), 3.2), sharey=True, squeeze=False)
    ymax = max(max(layers[n]["cluster_loads"]) for n in names)
    for ax, name in zip(axes[0], names):
        loads = layers[name]["cluster_loads"]
        G = len(loads)
        ax.bar(range(G), loads, color=[f"C{g % 10}" for g in range(G)])
        ax.axhline(1 / G, color="black", ls="--", lw=1, label=f"even = 1/{G}")
        ax.set_xticks(range(G), [f"C{g}" for g in range(G)])
        ax.set_title(name)
        ax.set_xlabel("cluster")
        ax.set_ylim(0, min(1.0, ymax * 1.15) if ymax > 0 else 1.0)
    axes[0][0].set_ylabel("fraction of tokens")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Load per expert cluster")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------


def _fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def _md_token(sym: str) -> str:
    return "`" + sym.replace("`", "'").replace("|", "\\|") + "`"


def write_report(summary: Dict, path: str) -> None:
    lines = [
        "# Routing analysis", "",
        f"- checkpoint: `{summary['checkpoint']}`",
        f"- data: `{summary['data']}`, split `{summary['split']}`: {summary['sentences']} sentence pairs "
        f"(skipped as too long: {summary['skipped_sentences']}), teacher forcing, eval mode (all experts)",
        f"- routing: top-{summary['top_k']}; load counts every routing choice", "",
        "| layer | tokens | load CV | load entropy (max) | co-routing (chance) | cluster loads | intra var | inter var |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name, s in summary["layers"].items():
        lines.append(
            f"| {name} | {s['tokens']} | {s['load_cv']:.3f} | {s['load_entropy']:.3f} ({s['load_entropy_max']:.3f}) "
            f"| {_fmt(s['co_routing_rate'])} ({_fmt(s['co_routing_chance'])}) "
            f"| {' '.join(f'{x:.2f}' for x in s['cluster_loads'])} | {s['intra_var']:.2e} | {s['inter_var']:.2e} |")
    lines += ["", "![expert load](load_heatmap.png)", "", "![co-routing](co_routing.png)", "",
              "![cluster load](cluster_load.png)", "",
              "## Most frequent tokens per expert", "",
              "`token` count (share of that token's routings that went to this expert). Encoder layers: source "
              "tokens; decoder layers: the previous output token (target side, teacher forcing).", ""]
    for name, s in summary["layers"].items():
        side = "source tokens" if s["side"] == "encoder" else "previous target tokens"
        lines += [f"### {name} ({side})", "", "| expert | cluster | load | tokens |", "|---:|---:|---:|---|"]
        for e, toks in enumerate(s["top_tokens"]):
            cell = ", ".join(f"{_md_token(t['token'])} {t['count']} ({t['share']:.0%})" for t in toks) or "-"
            lines.append(f"| {e} | {e // s['cluster_size']} | {s['load'][e]:.1%} | {cell} |")
        lines.append("")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


# ----------------------------------------------------------------------------------------------------------------
# Running a checkpoint over a split
# ----------------------------------------------------------------------------------------------------------------


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


def analyze(checkpoint: str, data_bin: str, split: str = "valid", max_sentences: int = 1000,
            batch_size: int = 64, max_tokens: Optional[int] = 4000, top_tokens: int = 8,
            cpu: bool = False, progress: bool = True) -> Dict:
    """Run the checkpoint over the split and return the summary dict (see module docstring)."""
    import fairseq_moec  # noqa: F401  (registers the plugin, safe checkpoint loading)
    from fairseq import checkpoint_utils, utils
    from tqdm import tqdm

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
        dataset=dataset, max_tokens=max_tokens, max_sentences=batch_size,
        max_positions=utils.resolve_max_positions(task.max_positions(), model.max_positions()),
        ignore_invalid_inputs=True, required_batch_size_multiple=1, seed=1, num_workers=0,
    ).next_epoch_itr(shuffle=False)

    layers = model.moe_layers()
    dicts = {"encoder": task.source_dictionary, "decoder": task.target_dictionary}
    sides = {name: ("encoder" if name.startswith("enc") else "decoder") for name, _ in layers}
    acc = {name: LayerRouting(layer.cfg.moe_expert_count, layer.cfg.moe_clusters, len(dicts[sides[name]]))
           for name, layer in layers}
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
                    batch_tokens = net_input["src_tokens"] if sides[name] == "encoder" else net_input["prev_output_tokens"]
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
        "checkpoint": os.path.abspath(checkpoint), "data": os.path.abspath(data_bin), "split": split,
        "sentences": sentences, "skipped_sentences": n - sentences,
        "top_k": layers[0][1].cfg.moe_top_k, "layers": {},
    }
    for name, layer in layers:
        d = dicts[sides[name]]
        s = acc[name].summary(top_tokens, exclude=[d.pad()])
        s["top_tokens"] = [[{"token": d[v], "id": v, "count": c, "share": sh} for v, c, sh in toks]
                           for toks in s["top_tokens"]]
        summary["layers"][name] = {"side": sides[name], "top_k": layer.cfg.moe_top_k, **s,
                                   "padding_routed": padding_routed[name]}
    return summary


def write_outputs(summary: Dict, out: str) -> Dict[str, str]:
    os.makedirs(out, exist_ok=True)
    paths = {k: os.path.join(out, f) for k, f in (
        ("load_heatmap", "load_heatmap.png"), ("co_routing", "co_routing.png"), ("cluster_load", "cluster_load.png"),
        ("summary", "summary.json"), ("report", "report.md"))}
    layers = summary["layers"]
    if any(s["tokens"] for s in layers.values()):
        plot_load_heatmap(layers, paths["load_heatmap"])
        plot_co_routing(layers, paths["co_routing"])
        plot_cluster_load(layers, paths["cluster_load"])
    with open(paths["summary"], "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, ensure_ascii=False)
    write_report(summary, paths["report"])
    return paths


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fairseq_moec.analyze",
                                description="Expert and cluster routing analysis of a trained MoEC checkpoint.")
    p.add_argument("checkpoint", help="checkpoint file (e.g. checkpoints/checkpoint_best.pt)")
    p.add_argument("data_bin", help="fairseq-preprocess output directory the model was trained on")
    p.add_argument("--split", default="valid", help="split to analyse (default: valid)")
    p.add_argument("--out", required=True, help="output directory for the PNGs, summary.json and report.md")
    p.add_argument("--max-sentences", type=int, default=1000,
                   help="analyse the first N sentence pairs of the split; 0 = all (default: 1000)")
    p.add_argument("--batch-size", type=int, default=64, help="sentences per batch (default: 64)")
    p.add_argument("--max-tokens", type=int, default=4000, help="tokens per batch (default: 4000)")
    p.add_argument("--top-tokens", type=int, default=8, help="most frequent tokens listed per expert (default: 8)")
    p.add_argument("--cpu", action="store_true", help="run on CPU even if a GPU is available")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def cli_main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = get_parser().parse_args(argv)
    summary = analyze(args.checkpoint, args.data_bin, args.split, args.max_sentences, args.batch_size,
                      args.max_tokens, args.top_tokens, args.cpu, not args.no_progress)
    paths = write_outputs(summary, args.out)
    for name, s in summary["layers"].items():
        print(f"{name}: {s['tokens']} tokens, load cv {s['load_cv']:.3f}, entropy {s['load_entropy']:.3f}/"
              f"{s['load_entropy_max']:.3f}, co-routing {_fmt(s['co_routing_rate'])} "
              f"(chance {_fmt(s['co_routing_chance'])}), cluster loads "
              f"{' '.join(f'{x:.2f}' for x in s['cluster_loads'])}")
    print(f"wrote {', '.join(paths.values())}")
    return summary


if __name__ == "__main__":
    cli_main()
