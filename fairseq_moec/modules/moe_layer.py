"""The MoEC layer: route, dispatch by sorting, run the experts, combine; report losses and statistics."""

import math
from typing import Dict, Optional

import torch
import torch.nn as nn

from . import losses
from .config import MoEConfig
from .dropout import ClusterDropout
from .expert_parallel import ExpertParallel, run_experts_remotely
from .experts import ExpertFFNs
from .router import CosineRouter, LinearRouter, route


def capacity(num_tokens: int, num_experts: int, top_k: int, factor: Optional[float]) -> Optional[int]:
    """Slots per expert: ceil(factor * k * T / E); None (dropless) when no factor is set."""
    return None if factor is None else max(1, math.ceil(factor * top_k * num_tokens / num_experts))


def dispatch_combine(
    x: torch.Tensor,
    experts: torch.Tensor,
    gates: torch.Tensor,
    num_experts: int,
    expert_fn,
    slots: Optional[int] = None,
    counts: Optional[torch.Tensor] = None,
):
    """out[t] = sum_j gates[t, j] * expert_{experts[t, j]}(x[t]) over the assignments that fit in capacity.

    Assignments are ordered choice-major (every token's first choice before any second choice, tokens in
    order), stably sorted by expert, and each expert keeps its first ``slots`` of them: GShard's priority.
    No one-hot [T, E, C] tensor: the cost is a sort plus the expert FFNs on the kept rows.
    ``counts``: ``losses.expert_counts(experts, num_experts)`` if the caller has it already.
    Returns (out [T, d], kept [T, k] bool).
    """
    T, k = experts.shape
    flat_expert = experts.t().reshape(-1)
    order = torch.argsort(flat_expert, stable=True)
    if counts is None:
        counts = losses.expert_counts(experts, num_experts)
    if slots is not None:
        starts = counts.cumsum(0) - counts
        rank = torch.arange(T * k, device=x.device) - starts[flat_expert[order]]
        order = order[rank < slots]
        counts = counts.clamp(max=slots)
    kept = torch.zeros(T * k, dtype=torch.bool, device=x.device).index_fill_(0, order, True)
    token = order % T
    y = expert_fn(x[token], counts)
    y = y * gates.t().reshape(-1)[order, None].to(y.dtype)
    out = torch.zeros_like(x).index_add_(0, token, y.to(x.dtype))
    return out, kept.view(k, T).t()


class MoELayer(nn.Module):
    """Drop-in replacement for a Transformer FFN block: [..., d] in, [..., d] out.

    After each forward ``last_losses`` holds the raw auxiliary losses (balance, cluster, z) and
    ``last_stats`` the detached routing statistics of that batch, for the criterion to weight and log.
    With ``keep_routing = True`` (analysis tools), ``last_routing`` also holds the detached routing:
    (positions [T] of the routed tokens in the flattened input, experts [T, k], probs [T, E]).

    ``expert_parallel`` (default None: all experts here): this process holds only its E/W experts and
    exchanges tokens with the other processes of the group; every process must call forward equally often.
    """

    keep_routing = False

    def __init__(
        self,
        cfg: MoEConfig,
        embed_dim: int,
        ffn_dim: int,
        activation: str = "relu",
        activation_dropout: float = 0.0,
        layer_id: int = 0,
        expert_parallel: Optional[ExpertParallel] = None,
    ):
        super().__init__()
        cfg.validate()
        if expert_parallel is not None:
            cfg.validate_expert_parallel(expert_parallel.world_size)
        self.cfg = cfg
        self.expert_parallel = expert_parallel
        E = cfg.moe_expert_count
        self.router = (
            LinearRouter(embed_dim, E)
            if cfg.moe_router == "linear"
            else CosineRouter(embed_dim, E, cfg.moe_router_dim, cfg.moe_router_temperature)
        )
        self.experts = ExpertFFNs(
            E,
            embed_dim,
            cfg.moe_expert_ffn_dim or ffn_dim,
            cfg.moe_expert_sublayers,
            activation,
            activation_dropout,
            None if expert_parallel is None else expert_parallel.local_experts(E),
        )
        self.cluster_dropout = ClusterDropout(
            E, cfg.moe_clusters, cfg.cluster_dropout, cfg.cluster_dropout_interval, cfg.moe_seed, layer_id
        )
        self.last_losses: Dict[str, torch.Tensor] = {}
        self.last_stats: Dict[str, torch.Tensor] = {}
        self.last_routing = None

    def set_num_updates(self, num_updates: int) -> None:
        self.cluster_dropout.set_num_updates(num_updates)

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: [..., d]; padding_mask: bool, same leading shape as x, True at padding (excluded everywhere)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        real = None if padding_mask is None else ~padding_mask.reshape(-1)
        if real is not None and self._capacity_factor() is not None:
            # capacity ranks the real tokens only: remove the padding first (one host read, the number of tokens)
            keep = real.nonzero().squeeze(1)
            out_tokens, r = self._forward_tokens(x.index_select(0, keep))
            if self.keep_routing:
                self.last_routing = (keep, r.experts.detach(), r.probs.detach())
            return x.new_zeros(x.shape).index_copy_(0, keep, out_tokens).view(shape)
        # dropless: padding rows are routed and computed like the others, then zeroed, and the losses and
        # statistics count the real tokens only; no value is read back to the host for the padding
        out, r = self._forward_tokens(x, real)
        if self.keep_routing:  # for the analysis tools, which may read the host: the real tokens' routing
            keep = torch.arange(x.shape[0], device=x.device) if real is None else real.nonzero().squeeze(1)
            self.last_routing = (keep, r.experts[keep].detach(), r.probs[keep].detach())
        if real is not None:
            out = torch.where(real[:, None], out, out.new_zeros(()))
        return out.view(shape)

    def _capacity_factor(self) -> Optional[float]:
        return self.cfg.moe_capacity_factor if self.training else self.cfg.moe_eval_capacity_factor

    def _forward_tokens(self, x: torch.Tensor, real: Optional[torch.Tensor] = None):
        """(output rows, routing) of the rows of X; ``real``: False at padding rows (see forward)."""
        cfg = self.cfg
        E, T = cfg.moe_expert_count, x.shape[0]
        router_in = x
        if self.training and cfg.moe_jitter_eps > 0:
            router_in = x * torch.empty_like(x).uniform_(1 - cfg.moe_jitter_eps, 1 + cfg.moe_jitter_eps)
        survivors = self.cluster_dropout.mask()
        if cfg.moe_loss_temperature is None:
            logits = self.router(router_in)
        else:  # cosine router: the losses see its cosine at a fixed temperature, routing and gate its learned one
            cosine = self.router.cosine(router_in)
            logits = cosine / self.router.temperature()
        r = route(logits, cfg.moe_top_k, cfg.cluster_size, survivors, cfg.cluster_dropout_reroute, cfg.gate)
        factor = self._capacity_factor()
        expert_fn = self.experts if self.expert_parallel is None else self._run_experts_remotely
        rows = losses.expert_counts(r.experts, E)  # every row, padding included: the dispatch's groups
        out, kept = dispatch_combine(x, r.experts, r.gates, E, expert_fn, capacity(T, E, cfg.moe_top_k, factor), rows)
        if cfg.gate == "sigmoid":  # the official output a * E(x) + (1 - a) * x; over capacity: 0, as every gate
            out = out + ((1 - r.gates[:, 0]) * kept[:, 0]).to(x.dtype)[:, None] * x
        counts = rows if real is None else losses.expert_counts(r.experts, E, real)
        loss_probs = r.probs
        if cfg.moe_loss_temperature is not None:
            loss_logits = cosine / cfg.moe_loss_temperature
            if survivors is not None:
                loss_logits = loss_logits.masked_fill(~survivors, float("-inf"))
            loss_probs = loss_logits.softmax(-1)
        self._record(r, loss_probs, kept, survivors, counts, real)
        return out, r

    def _run_experts_remotely(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        return run_experts_remotely(rows, counts, self.experts, self.expert_parallel)

    def _record(self, r, probs, kept, survivors, counts, real=None) -> None:
        """Losses and statistics of one forward. ``probs``: the probabilities the balance and cluster losses see
        (the router's, or softmax(cosine / --moe-loss-temperature))."""
        cfg = self.cfg
        G = cfg.moe_clusters
        if probs.shape[0] == 0:  # no token at all: nothing to balance
            zero = probs.new_zeros(())
            self.last_losses = {"balance": zero, "cluster": zero, "z": zero}
            self.last_stats = {}
            return
        token_loss = cfg.moe_cluster_loss == "token"
        if G > 1:  # logged for every cluster loss; a graph only where it is the loss
            with torch.set_grad_enabled(torch.is_grad_enabled() and token_loss):
                concentration, impurity, imbalance = losses.token_cluster_terms(probs, G, survivors, real)
        if token_loss:
            cluster = concentration + impurity + imbalance if G > 1 else probs.new_zeros(())
            mass = losses.routing_mass(probs, "relative", survivors, real)
            intra, inter = losses.cluster_variances(mass, G, survivors)
        else:
            cluster, intra, inter = losses.cluster_terms(
                probs, G, cfg.moe_cluster_loss, cfg.moe_cluster_loss_norm, survivors, real
            )
        self.last_losses = {
            "balance": losses.load_balance_loss(probs, counts, survivors, real),
            "cluster": cluster if G > 1 else cluster.new_zeros(()),
            "z": losses.router_z_loss(r.logits, real),
        }
        with torch.no_grad():
            cv, entropy = losses.load_statistics(counts, survivors)
            tokens = probs.new_full((), probs.shape[0]) if real is None else real.to(probs.dtype).sum()
            self.last_stats = {
                "load_cv": cv,
                "load_entropy": entropy,
                "dropped_frac": 1.0 - losses.token_mean(kept.float(), real).mean(),
                "rerouted_frac": losses.token_mean(r.rerouted.float(), real),
                "intra_var": intra.detach(),
                "inter_var": inter.detach(),
                "tokens": tokens,
                "expert_load": counts.float(),
            }
            if G > 1:  # then every cluster keeps a survivor: E' >= 2
                # the chance level from the config's survivor counts, not from a read of the mask
                surviving_per_cluster = cfg.cluster_size - (0 if survivors is None else cfg.dropped_per_cluster)
                chance = losses.co_routing_chance(G * surviving_per_cluster, surviving_per_cluster)
                # ranked by the logits, where dropped experts are at -inf
                same = losses.same_cluster_top2(r.logits, cfg.cluster_size)
                self.last_stats["co_routing"] = losses.token_mean(same.float(), real)
                self.last_stats["co_routing_chance"] = probs.new_full((), chance)
                self.last_stats["mate_concentration"] = concentration.detach()
                self.last_stats["cluster_impurity"] = impurity.detach()
                self.last_stats["cluster_imbalance"] = imbalance.detach()
