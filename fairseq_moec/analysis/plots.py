"""The pictures of the routing analysis, from the per-layer summaries (matplotlib, Agg backend):
load_heatmap.png (token share per expert, cluster boundaries marked), co_routing.png (top-2 experts in one cluster,
against chance) and cluster_load.png (token share per cluster)."""

from typing import Dict

import numpy as np


def pyplot():
    """matplotlib.pyplot on the Agg backend, without matplotlib's DEBUG lines."""
    import logging

    for name in ("matplotlib", "PIL"):  # an imported module may have put the root logger on DEBUG
        logging.getLogger(name).setLevel(logging.WARNING)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_load_heatmap(layers: Dict[str, Dict], path: str) -> None:
    plt = pyplot()
    names = list(layers)
    E = max(s["num_experts"] for s in layers.values())
    data = np.full((len(names), E), np.nan)
    for i, name in enumerate(names):
        data[i, : layers[name]["num_experts"]] = layers[name]["load"]
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
                    ax.text(
                        e,
                        i,
                        f"{data[i, e]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="black" if data[i, e] > 0.6 * vmax else "white",
                    )
    fig.colorbar(im, ax=ax, label="fraction of tokens")
    ax.set_title(f"Expert load per MoE layer (even = 1/{E} = {1 / E:.3g})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_co_routing(layers: Dict[str, Dict], path: str) -> None:
    plt = pyplot()
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
    plt = pyplot()
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
