"""Auxiliary routing losses and load statistics. Inputs exclude padding; dropped experts (cluster dropout)
are excluded through ``survivors`` (bool[E]) and have probability 0 in ``probs``."""
from typing import Optional, Tuple

import torch

EPS = 1e-9


def expert_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[E] int64: how many routing choices (all k of them) went to each expert. Counted once per forward and
    shared by dispatch, the balance loss and the statistics. scatter_add_ rather than torch.bincount, which on
    CUDA reads its input's min and max back to the host."""
    flat = experts.reshape(-1)
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def load_balance_loss(probs: torch.Tensor, counts: torch.Tensor, survivors: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Switch Transformer balance loss E' * sum_e f_e * P_e over the E' surviving experts.

    f_e: fraction of routing choices (all k of them) sent to e (``counts``, from ``expert_counts``);
    P_e: mean router probability of e. Equals 1 for a perfectly uniform router.
    """
    f = counts.to(probs.dtype) / counts.sum().clamp(min=1)
    P = probs.mean(0)
    n = probs.shape[1] if survivors is None else survivors.sum()
    return n * (f * P).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2 (dropped experts at -inf contribute nothing)."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def routing_mass(probs: torch.Tensor, norm: str) -> torch.Tensor:
    """m_e: router probability mass of each expert, mean over tokens or (official MoEC code) sum."""
    return probs.mean(0) if norm == "mean" else probs.sum(0)


def cluster_variances(mass: torch.Tensor, num_clusters: int, survivors: Optional[torch.Tensor] = None
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(intra, inter): mean over clusters of the population variance of m_e inside the cluster (survivors only),
    and the population variance of the cluster means."""
    m = mass.view(num_clusters, -1)
    w = torch.ones_like(m) if survivors is None else survivors.view(num_clusters, -1).to(m.dtype)
    n = w.sum(1)
    mean = (m * w).sum(1) / n
    intra = ((m - mean[:, None]).pow(2) * w).sum(1) / n
    inter = (mean - mean.mean()).pow(2).mean()
    return intra.mean(), inter


def cluster_loss(intra: torch.Tensor, inter: torch.Tensor, kind: str) -> torch.Tensor:
    """'intra': experts of a cluster routed alike. 'ratio': the same relative to how much clusters differ."""
    return intra if kind == "intra" else intra / (inter + EPS)


def load_statistics(counts: torch.Tensor, survivors: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cv, entropy) of the expert load ``counts`` over surviving experts: coefficient of variation of the token
    counts (0 = perfectly even) and the entropy in nats of the load distribution (log E' = perfectly even).
    Dropped experts are masked out by weight, not by boolean indexing (which would read back to the host)."""
    load = counts.float()
    w = torch.ones_like(load) if survivors is None else survivors.to(load.dtype)
    mean = (load * w).sum() / w.sum()
    cv = ((load - mean).pow(2) * w).sum().div(w.sum()).sqrt() / mean.clamp(min=EPS)
    p = load * w / (load * w).sum().clamp(min=EPS)
    entropy = -(p * p.clamp(min=EPS).log()).sum()
    return cv, entropy
