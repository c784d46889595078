"""Auxiliary routing losses and load statistics. Padding is excluded either by the caller (rows removed) or
through ``real`` (bool[T], False at padding rows: no row is removed, so no value is read back to the host);
dropped experts (cluster dropout) are excluded through ``survivors`` (bool[E]) and have probability 0 in
``probs``."""

from typing import Optional, Tuple

import torch

from .router import cluster_probabilities

EPS = 1e-9


def expert_counts(experts: torch.Tensor, num_experts: int, real: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[E] int64: how many routing choices (all k of them) of the real tokens went to each expert. Counted once
    per forward and shared by dispatch, the balance loss and the statistics. scatter_add_ rather than
    torch.bincount, which on CUDA reads its input's min and max back to the host."""
    flat = experts.reshape(-1)
    ones = torch.ones_like(flat) if real is None else real[:, None].expand(experts.shape).reshape(-1).long()
    return torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, ones)


def token_mean(values: torch.Tensor, real: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over tokens (dim 0) of VALUES, over the real tokens only when ``real`` is given (0 if none is)."""
    if real is None:
        return values.mean(0)
    w = real.to(values.dtype).view(-1, *([1] * (values.dim() - 1)))
    return (values * w).sum(0) / w.sum().clamp(min=1)


def load_balance_loss(
    probs: torch.Tensor,
    counts: torch.Tensor,
    survivors: Optional[torch.Tensor] = None,
    real: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Switch Transformer balance loss E' * sum_e f_e * P_e over the E' surviving experts.

    f_e: fraction of routing choices (all k of them) sent to e (``counts``, from ``expert_counts``);
    P_e: mean router probability of e. Equals 1 for a perfectly uniform router.
    """
    f = counts.to(probs.dtype) / counts.sum().clamp(min=1)
    P = token_mean(probs, real)
    n = probs.shape[1] if survivors is None else survivors.sum()
    return n * (f * P).sum()


def router_z_loss(logits: torch.Tensor, real: Optional[torch.Tensor] = None) -> torch.Tensor:
    """ST-MoE z-loss: mean over tokens of logsumexp(logits)^2 (dropped experts at -inf contribute nothing)."""
    return token_mean(torch.logsumexp(logits, dim=-1).pow(2), real)


def num_survivors(probs: torch.Tensor, survivors: Optional[torch.Tensor] = None):
    """E': the number of experts routing can choose (all E without cluster dropout). A tensor when survivors are
    given, so that no value is read back to the host."""
    return probs.shape[1] if survivors is None else survivors.sum()


def routing_mass(
    probs: torch.Tensor, norm: str, survivors: Optional[torch.Tensor] = None, real: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """m_e, the routing mass of each expert.

    'relative' (default): E' * mean over tokens of p_e. Every surviving expert of a uniform router has mass 1,
    whatever E and the number of tokens T, so the cluster loss and its weight mean the same at every scale.
    'official': sum over tokens of p_e, as the official MoEC code (so its variance grows with T^2)."""
    if norm == "official":
        return probs.sum(0) if real is None else (probs * real[:, None].to(probs.dtype)).sum(0)
    return token_mean(probs, real) * num_survivors(probs, survivors)


def cluster_variances(
    mass: torch.Tensor, num_clusters: int, survivors: Optional[torch.Tensor] = None, unbiased: bool = False
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(intra, inter): mean over clusters of the variance of m_e inside the cluster (survivors only; population
    variance, or the unbiased n-1 form of the official code), and the population variance of the cluster means."""
    m = mass.view(num_clusters, -1)
    w = torch.ones_like(m) if survivors is None else survivors.view(num_clusters, -1).to(m.dtype)
    n = w.sum(1)
    mean = (m * w).sum(1) / n
    denominator = (n - 1).clamp(min=1) if unbiased else n
    intra = ((m - mean[:, None]).pow(2) * w).sum(1) / denominator
    inter = (mean - mean.mean()).pow(2).mean()
    return intra.mean(), inter


def cluster_loss(intra: torch.Tensor, inter: torch.Tensor, kind: str) -> torch.Tensor:
    """'intra': experts of a cluster routed alike. 'ratio': the same relative to how much clusters differ."""
    return intra if kind == "intra" else intra / (inter + EPS)


def token_cluster_terms(
    probs: torch.Tensor,
    num_clusters: int,
    survivors: Optional[torch.Tensor] = None,
    real: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(concentration, impurity, imbalance): the three terms of the token cluster loss, each in [0, 1].

    Per token t, over the m'_g surviving experts of each cluster g: q_tg = sum_(e in g) p_te, r_te = p_te / q_tg.
    concentration = mean_t sum_g q_tg Var_(e in g)(m'_g r_te) / (m'_g - 1) (population variance): 0 when each
    token spreads each cluster's probability evenly over the mates, 1 when it puts it on one mate; clusters of one
    survivor count 0. impurity = mean_t (1 - sum_g q_tg^2) / (1 - 1/G): 0 when every token is sure of its cluster,
    1 when it is uniform over the clusters. imbalance = (sum_g Q_g^2 - 1/G) / (1 - 1/G), Q_g = mean_t q_tg: 0 when
    the clusters get equal shares of the tokens, 1 when one cluster gets them all. impurity + imbalance
    = 1 - sum_g Var_t(q_tg) / (1 - 1/G) is in [0, 1] too: without imbalance, sending every token surely to one
    cluster minimises the other two (a collapse measured in fairseq, docs/method.md). q_tg Var / (m' - 1) is
    computed as sum_e (m' p_te - q_tg)^2 / (q_tg m' (m' - 1)), with q clamped away from 0: an empty cluster
    (q = 0, p = 0) adds 0 and no NaN to the gradients."""
    T, E = probs.shape
    G = num_clusters
    p = probs.view(T, G, E // G)
    w = torch.ones_like(p[0]) if survivors is None else survivors.view(G, -1).to(p.dtype)  # [G, m]
    n = w.sum(1)  # m'_g
    q = cluster_probabilities(probs, E // G)  # [T, G]
    squared = ((p * n[:, None] - q[..., None]) * w).pow(2).sum(-1)
    per_cluster = squared / (q.clamp(min=EPS) * n * (n - 1).clamp(min=1))  # one survivor: p = q, adds 0
    concentration = token_mean(per_cluster.sum(-1), real)
    if G == 1:  # one cluster: every token is sure of it, and it gets them all
        zero = concentration.new_zeros(())
        return concentration, zero, zero
    impurity = token_mean((1 - q.pow(2).sum(-1)) / (1 - 1 / G), real)
    imbalance = (token_mean(q, real).pow(2).sum() - 1 / G) / (1 - 1 / G)
    return concentration, impurity, imbalance


def cluster_terms(
    probs: torch.Tensor,
    num_clusters: int,
    kind: str,
    norm: str,
    survivors: Optional[torch.Tensor] = None,
    real: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, intra, inter) of the cluster loss; intra and inter always on the 'relative' scale, for the
    logs. norm 'official' reproduces the official code's term: unbiased variance of summed masses, times the E'
    inside its aux loss l_aux = E' * (L_balance + c * V). Its size relative to the default is
    T^2 / E' * m / (m - 1) (m: surviving experts per cluster), see ``official_equivalent_weight``.
    kind 'token': the sum of the three ``token_cluster_terms`` (norm 'relative' only)."""
    intra, inter = cluster_variances(routing_mass(probs, "relative", survivors, real), num_clusters, survivors)
    if kind == "token":
        return sum(token_cluster_terms(probs, num_clusters, survivors, real)), intra, inter
    if norm == "official":
        mass = routing_mass(probs, "official", real=real)
        official, _ = cluster_variances(mass, num_clusters, survivors, unbiased=True)
        return num_survivors(probs, survivors) * cluster_loss(official, inter, kind), intra, inter
    return cluster_loss(intra, inter, kind), intra, inter


def official_equivalent_weight(
    official_weight: float, tokens: int, num_clusters: int, surviving_per_cluster: int
) -> float:
    """The --moe-cluster-weight that, with the default 'relative' norm, gives the official code's intra-cluster
    term (weight ``official_weight`` = 0.01 x c) at ``tokens`` routed tokens per forward:
    w_official * T^2 / E' * m / (m - 1), with m surviving experts per cluster and E' = G * m. Summed masses are
    T / E' times the relative ones, the unbiased variance is m / (m - 1) times the population one, and l_aux
    multiplies by E'."""
    m = surviving_per_cluster
    return official_weight * tokens**2 / (num_clusters * m) * (m / (m - 1) if m > 1 else 1.0)


def load_statistics(
    counts: torch.Tensor, survivors: Optional[torch.Tensor] = None
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


def same_cluster_top2(scores: torch.Tensor, cluster_size: int) -> torch.Tensor:
    """bool [T]: the two highest-scoring experts of each token are in the same cluster. Scores are probabilities or
    logits (the same ranking); with dropped experts at -inf logits they never rank above a survivor, where a
    probability that underflows to 0 could tie with a dropped expert's 0."""
    top2 = scores.topk(2, dim=-1).indices // cluster_size
    return top2[:, 0] == top2[:, 1]


def co_routing_chance(surviving_experts: int, surviving_per_cluster: int) -> Optional[float]:
    """The co-routing rate of a router that ignores the clusters: the chance that a second expert drawn at random
    from the other E' - 1 survivors is in the first one's cluster, (m' - 1) / (E' - 1). Every cluster keeps the
    same m' survivors, so it is the same whichever first expert a token has. None when E' < 2."""
    if surviving_experts < 2:
        return None
    return (surviving_per_cluster - 1) / (surviving_experts - 1)
