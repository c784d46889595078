"""Pure computations on routing tensors (T routed tokens, E experts, G clusters of m = E / G contiguous experts),
and ``LayerRouting``, which accumulates one MoE layer's routing over batches into the numbers of summary.json.

Plain torch (no fairseq), so that every number can be checked by hand. Load counts every routing choice (k per
token for top-k models) as the training statistics do.
"""

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..modules import losses


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
    return losses.same_cluster_top2(probs, probs.shape[1] // num_clusters)


def co_routing_rate(probs: torch.Tensor, num_clusters: int) -> Optional[float]:
    """Fraction of tokens whose top-2 experts share a cluster; None when E < 2 or there are no tokens."""
    if probs.shape[1] < 2 or probs.shape[0] == 0:
        return None
    return float(same_cluster_top2(probs, num_clusters).double().mean())


def chance_co_routing(num_experts: int, num_clusters: int) -> Optional[float]:
    """Co-routing rate of a random pair of distinct experts: (m - 1) / (E - 1), m = E / G. A router that ignores
    the clusters sits here; one whose clusters group experts that serve the same tokens sits above it. All experts
    (the analysis runs in eval): the training logs' ``losses.co_routing_chance`` over the survivors, at E' = E."""
    return losses.co_routing_chance(num_experts, num_experts // num_clusters)


def cluster_mass_variances(mean_probs: torch.Tensor, num_clusters: int) -> Tuple[float, float]:
    """(intra, inter) of the relative routing mass E * m_e (m_e: mean router probability of each expert over the
    tokens), as the training logs them (``losses.cluster_variances``): mean over clusters of the variance of
    E * m_e inside the cluster, and the variance of the cluster means."""
    intra, inter = losses.cluster_variances(mean_probs.double() * mean_probs.numel(), num_clusters)
    return float(intra), float(inter)


def positions_to_tokens(positions: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Token ids of routed positions. ``tokens`` is the batch [B, L] (fairseq's src_tokens or
    prev_output_tokens); the MoE layer saw its input time-major [L, B, d] flattened, so position p is
    (t, b) = divmod(p, B)."""
    B = tokens.shape[0]
    t, b = positions // B, positions % B
    return tokens[b, t]


def token_expert_counts(
    token_ids: torch.Tensor, experts: torch.Tensor, vocab_size: int, num_experts: int
) -> torch.Tensor:
    """[V, E] int64: how often token v was routed to expert e (all k choices of every token)."""
    k = experts.shape[1] if experts.dim() == 2 else 1
    tok = token_ids.long().cpu().repeat_interleave(k)
    flat = tok * num_experts + experts.reshape(-1).long().cpu()
    return torch.bincount(flat, minlength=vocab_size * num_experts).view(vocab_size, num_experts)


def top_tokens_per_expert(
    counts: torch.Tensor, n: int, exclude: Sequence[int] = ()
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
