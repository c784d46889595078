"""Routers: token representations -> fp32 logits over experts, and top-k selection with cluster-aware rerouting."""

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class LinearRouter(nn.Module):
    """s = W_r x, computed in fp32 whatever the model's dtype (routing decisions are precision-sensitive)."""

    def __init__(self, embed_dim: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, embed_dim))
        nn.init.normal_(self.weight, std=embed_dim**-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())


class CosineRouter(nn.Module):
    """X-MoE routing: cosine between a low-dimensional projection of x and learned expert embeddings,
    divided by a learned temperature (kept >= 0.01 so logits cannot blow up)."""

    def __init__(self, embed_dim: int, num_experts: int, router_dim: int, temperature: float):
        super().__init__()
        self.proj = nn.Linear(embed_dim, router_dim, bias=False)
        self.expert_embed = nn.Parameter(torch.empty(num_experts, router_dim))
        nn.init.orthogonal_(self.expert_embed, gain=0.32)
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))

    def cosine(self, x: torch.Tensor) -> torch.Tensor:
        """[T, E] fp32: the cosine between each token's projection and each expert embedding, in [-1, 1]."""
        h = F.normalize(F.linear(x.float(), self.proj.weight.float()), dim=-1)
        e = F.normalize(self.expert_embed.float(), dim=-1)
        return h @ e.t()

    def temperature(self) -> torch.Tensor:
        return self.log_temperature.exp().clamp(min=0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cosine(x) / self.temperature()


def cluster_probabilities(probs: torch.Tensor, cluster_size: int) -> torch.Tensor:
    """[T, G]: q_tg, the probability of each cluster, the sum of its experts' probabilities (a dropped expert has
    probability 0, so this is the sum over the cluster's survivors)."""
    return probs.view(probs.shape[0], -1, cluster_size).sum(-1)


class Routing(NamedTuple):
    logits: torch.Tensor  # [T, E] fp32, dropped experts at -inf
    probs: torch.Tensor  # [T, E] softmax over surviving experts
    experts: torch.Tensor  # [T, k] chosen experts, best first
    gates: torch.Tensor  # [T, k] weights of the chosen experts' outputs
    rerouted: torch.Tensor  # [T] bool: a preferred expert was dropped, the token went elsewhere


def route(
    logits: torch.Tensor,
    top_k: int,
    cluster_size: int,
    survivors: Optional[torch.Tensor] = None,
    reroute: str = "cluster",
    gate: str = "expert",
) -> Routing:
    """Pick top_k experts per token and weigh their outputs by ``gate`` (``MoEConfig.gate``): 'expert' = the
    chosen experts' router probabilities, 'cluster' = the probabilities of their clusters, both renormalised over
    the chosen pair for top-2 (GShard); 'sigmoid' (top-1) = sigmoid of the chosen expert's logit (the cosine
    router's cosine / temperature: the official MoEC gate, whose layer adds (1 - gate) * x).

    Without dropout this is plain top-k. With cluster dropout (``survivors``: bool[E]) dropped experts are
    masked out of the softmax; a token's j-th preferred expert, if dropped, is replaced by the best surviving
    expert not chosen yet in the same cluster ('cluster') or anywhere ('global'). When its cluster has no such
    expert left, the token falls back to the best remaining survivor anywhere.
    """
    T, E = logits.shape
    if survivors is None:
        probs = logits.softmax(-1)
        gates, experts = probs.topk(top_k, dim=-1)
        rerouted = torch.zeros(T, dtype=torch.bool, device=logits.device)
    else:
        preferred = logits.topk(top_k, dim=-1).indices
        rerouted = (~survivors[preferred]).any(-1)
        logits = logits.masked_fill(~survivors, float("-inf"))
        probs = logits.softmax(-1)
        if reroute == "global":
            gates, experts = probs.topk(top_k, dim=-1)
        else:
            experts = _reroute_in_cluster(logits, preferred, cluster_size)
            gates = probs.gather(1, experts)
    if gate == "cluster":
        gates = cluster_probabilities(probs, cluster_size).gather(1, experts // cluster_size)
    elif gate == "sigmoid":
        if top_k != 1:
            raise ValueError("the sigmoid gate is top-1 only")
        gates = torch.sigmoid(logits.gather(1, experts))  # chosen experts survive: finite logits
    elif gate != "expert":
        raise ValueError(f"unknown gate {gate!r}")
    if top_k > 1:
        gates = gates / gates.sum(-1, keepdim=True)
    return Routing(logits, probs, experts, gates, rerouted)


def _reroute_in_cluster(masked_logits: torch.Tensor, preferred: torch.Tensor, cluster_size: int) -> torch.Tensor:
    E = masked_logits.shape[1]
    cluster_of = torch.arange(E, device=masked_logits.device) // cluster_size
    scores = masked_logits.clone()
    picks = []
    for j in range(preferred.shape[1]):  # k <= 2: a tiny loop, vectorised over tokens
        same_cluster = cluster_of[None, :] == cluster_of[preferred[:, j]][:, None]
        local = scores.masked_fill(~same_cluster, float("-inf"))
        has_local = torch.isfinite(local).any(-1)
        pick = torch.where(has_local, local.argmax(-1), scores.argmax(-1))
        picks.append(pick)
        scores.scatter_(1, pick[:, None], float("-inf"))  # not chosen twice
    return torch.stack(picks, dim=1)
