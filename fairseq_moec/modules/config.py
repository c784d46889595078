"""The options of a MoEC layer: the single definition of every MoE flag.

Each field becomes the command-line flag ``--<field with dashes>`` in the fairseq glue, so error messages
name the flag a user typed. Plain dataclass, no fairseq import.
"""

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Optional

ROUTERS = ("linear", "cosine")
REROUTES = ("cluster", "global")
CLUSTER_LOSSES = ("intra", "ratio", "token")
LOSS_NORMS = ("relative", "official")
GATES = ("auto", "expert", "cluster", "sigmoid")
# The official MoEC code computes its balance and cluster losses on softmax(cosine / 0.07), a fixed temperature,
# whatever the router's learned one (its TEMPERATURE_FOR_L_UAX): the value --moe-loss-temperature takes there.
OFFICIAL_LOSS_TEMPERATURE = 0.07
ACTIVATIONS = ("relu", "gelu")
EXPERT_PARALLEL = ("auto", "off")
PLACEMENTS = ("contiguous", "cluster")
MAX_MOE_SEED = 2**64 - 1  # cluster-dropout generators are seeded modulo 2**64 (dropout.py): larger seeds would alias


class ConfigError(ValueError):
    """A bad option value, combination or input file, with a message naming the flag or file. The fairseq
    commands print it as one line, as argparse does (fairseq_moec/patches/one_line_errors.py)."""


def experts_dropped_per_cluster(rate: float, cluster_size: int) -> int:
    """The one rounding rule of cluster dropout: floor(rate * m + 1/2), halves round up (not Python's round,
    which rounds 0.5 and 2.5 down to even). The 1e-9 keeps products like 0.58 * 25 = 14.4999... on the half."""
    return math.floor(rate * cluster_size + 0.5 + 1e-9)


def _opt(default, help, choices=None):
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


@dataclass
class MoEConfig:
    moe_expert_count: int = _opt(8, "number of experts E in each MoE layer")
    moe_clusters: int = _opt(
        1, "number of expert clusters G (E % G == 0; expert e is in cluster e // (E/G)); 1 = plain MoE"
    )
    moe_top_k: int = _opt(1, "experts per token (1 = Switch/MoEC, 2 = GShard-style with renormalised gates)")
    moe_expert_sublayers: int = _opt(1, "stacked FFN sublayers per expert (the MoEC paper uses 3)")
    moe_expert_ffn_dim: int = _opt(0, "hidden size of each expert FFN; 0 = the model's FFN size")
    moe_router: str = _opt(
        "linear", "router: 'linear' softmax router in fp32, or 'cosine' low-dimensional (X-MoE)", ROUTERS
    )
    moe_router_dim: int = _opt(32, "projection size of the cosine router")
    moe_router_temperature: float = _opt(0.07, "initial (learned) temperature of the cosine router")
    moe_gate: str = _opt(
        "auto",
        "weight of the chosen expert's output: 'expert' = its router probability (top-2: renormalised over the pair); "
        "'cluster' = the probability of its cluster (the sum over the cluster's surviving experts; top-2: "
        "renormalised), which does not shrink when cluster mates share a token's probability; 'sigmoid' = the official "
        "MoEC code's gate a = sigmoid(cosine / learned temperature), output a * expert(x) + (1 - a) * x (needs "
        "--moe-router cosine and --moe-top-k 1); 'auto' = 'cluster' with --moe-cluster-loss token and "
        "--moe-clusters > 1, else 'expert'",
        GATES,
    )
    moe_loss_temperature: Optional[float] = _opt(
        None,
        "fixed temperature T of the probabilities that the balance and cluster losses see, softmax(cosine / T) "
        f"(needs --moe-router cosine; the official MoEC code: {OFFICIAL_LOSS_TEMPERATURE}). Unset = the router's "
        "own probabilities",
    )
    moe_capacity_factor: Optional[float] = _opt(
        None, "training capacity factor; tokens over capacity are dropped (skip the layer). Unset = dropless"
    )
    moe_eval_capacity_factor: Optional[float] = _opt(
        None, "capacity factor for validation and generation. Unset = dropless"
    )
    moe_jitter_eps: float = _opt(
        0.0, "multiplicative jitter noise on router input during training, uniform in [1-eps, 1+eps]"
    )
    cluster_dropout: float = _opt(
        0.0,
        "fraction p of experts dropped inside every cluster during training: floor(p*m + 1/2) of the m = E/G experts "
        "of each cluster (halves round up), at least 1 dropped and 1 kept, else refused; 0 = off",
    )
    cluster_dropout_interval: int = _opt(250, "resample the dropped experts every this many optimizer updates")
    cluster_dropout_reroute: str = _opt(
        "cluster",
        "where a token whose expert is dropped goes: best survivor in the same 'cluster', or 'global' best survivor",
        REROUTES,
    )
    moe_cluster_loss: str = _opt(
        "intra",
        "cluster loss: 'intra' (mean within-cluster variance of routing mass), 'ratio' (intra / inter), or 'token' "
        "(per token: the cluster mates share its cluster's probability evenly, and it is sure of its cluster; the "
        "clusters get equal shares of the tokens; docs/method.md)",
        CLUSTER_LOSSES,
    )
    moe_cluster_loss_norm: str = _opt(
        "relative",
        "scale of the cluster loss: 'relative' = variance of E' x (mean router probability of each expert over "
        "tokens), 1 for every expert of a uniform router (E' = experts not dropped), so --moe-cluster-weight means the "
        "same at every E and batch size; 'official' = the official MoEC code's term (unbiased variance of masses "
        "summed over tokens, times E'; grows with tokens^2). Only for --moe-cluster-loss intra and ratio",
        LOSS_NORMS,
    )
    moe_seed: int = _opt(
        1, "seed of the cluster-dropout masks (combined with the layer id and the resample period), 0 .. 2^64-1"
    )
    moe_expert_parallel: str = _opt(
        "auto",
        "with W > 1 training processes: 'auto' gives each process E/W of the experts (--moe-expert-count must be a "
        "multiple of W; tokens travel to their expert's process and back, checkpoints are written per process); 'off' "
        "keeps every expert on every process (plain data parallelism)",
        EXPERT_PARALLEL,
    )
    moe_expert_placement: str = _opt(
        "contiguous",
        "expert parallelism: process r holds experts r*E/W .. (r+1)*E/W-1. 'contiguous': any --moe-clusters (a cluster "
        "lies whole on one process when G % W == 0, otherwise clusters straddle processes); 'cluster': the same "
        "blocks, but refuse to start unless every cluster lies whole on one process (G % W == 0)",
        PLACEMENTS,
    )

    @property
    def cluster_size(self) -> int:
        return self.moe_expert_count // self.moe_clusters

    @property
    def dropped_per_cluster(self) -> int:
        return experts_dropped_per_cluster(self.cluster_dropout, self.cluster_size)

    @property
    def gate(self) -> str:
        """The gate in use: --moe-gate with 'auto' resolved. 'auto' keeps every configuration that predates the
        option on the gate it had ('expert'); only the token cluster loss, whose mates share probability, moves on."""
        if self.moe_gate != "auto":
            return self.moe_gate
        return "cluster" if self.moe_cluster_loss == "token" and self.moe_clusters > 1 else "expert"

    def validate(self) -> "MoEConfig":
        """Raise ConfigError naming the flag for every invalid value or combination."""

        def bad(name, msg):
            raise ConfigError(f"--{name.replace('_', '-')}: {msg}")

        for f in fields(self):  # numbers: of their type, and finite (nan and inf pass most comparisons wrongly)
            value = getattr(self, f.name)
            if value is None:
                continue
            if f.type is int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                bad(f.name, f"must be an integer, got {value!r}")
            if f.type in (float, Optional[float]):
                if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                    bad(f.name, f"must be a finite number, got {value!r}")

        E, G = self.moe_expert_count, self.moe_clusters
        if E < 1:
            bad("moe_expert_count", f"must be >= 1, got {E}")
        if G < 1 or E % G:
            bad(
                "moe_clusters",
                f"must be >= 1 and divide --moe-expert-count={E}, got {G} "
                f"(allowed: {', '.join(str(g) for g in range(1, E + 1) if E % g == 0)})",
            )
        if self.moe_top_k not in (1, 2) or self.moe_top_k > E:
            bad("moe_top_k", f"must be 1 or 2 and <= --moe-expert-count={E}, got {self.moe_top_k}")
        if self.moe_expert_sublayers < 1:
            bad("moe_expert_sublayers", f"must be >= 1, got {self.moe_expert_sublayers}")
        if self.moe_expert_ffn_dim < 0:
            bad("moe_expert_ffn_dim", f"must be >= 0, got {self.moe_expert_ffn_dim}")
        for name, allowed in (
            ("moe_router", ROUTERS),
            ("cluster_dropout_reroute", REROUTES),
            ("moe_cluster_loss", CLUSTER_LOSSES),
            ("moe_cluster_loss_norm", LOSS_NORMS),
            ("moe_gate", GATES),
            ("moe_expert_parallel", EXPERT_PARALLEL),
            ("moe_expert_placement", PLACEMENTS),
        ):
            if getattr(self, name) not in allowed:
                bad(name, f"must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.moe_router_dim < 1:
            bad("moe_router_dim", f"must be >= 1, got {self.moe_router_dim}")
        if not self.moe_router_temperature > 0:
            bad("moe_router_temperature", f"must be > 0, got {self.moe_router_temperature}")
        if self.moe_cluster_loss == "token" and self.moe_cluster_loss_norm != "relative":
            bad(
                "moe_cluster_loss_norm",
                f"{self.moe_cluster_loss_norm} is only for --moe-cluster-loss intra or ratio (the token loss has one "
                "scale, 0 to 1 per term): use --moe-cluster-loss-norm relative",
            )
        if self.moe_gate == "sigmoid" and (self.moe_router != "cosine" or self.moe_top_k != 1):
            bad(
                "moe_gate",
                f"sigmoid (the official code's gate) needs --moe-router cosine and --moe-top-k 1, got --moe-router "
                f"{self.moe_router} --moe-top-k {self.moe_top_k}; the other gates: auto, expert, cluster",
            )
        if self.moe_gate == "cluster" and G == 1:
            bad(
                "moe_gate",
                "cluster needs --moe-clusters > 1 (with one cluster the gate is 1 for every token): use "
                "--moe-gate auto or expert",
            )
        if self.moe_loss_temperature is not None:
            if not self.moe_loss_temperature > 0:
                bad(
                    "moe_loss_temperature",
                    f"must be > 0 (leave unset for the router's own probabilities), got {self.moe_loss_temperature}",
                )
            if self.moe_router != "cosine":
                bad(
                    "moe_loss_temperature",
                    f"needs --moe-router cosine (it divides the cosine scores), got --moe-router {self.moe_router}; "
                    "leave it unset for the router's own probabilities",
                )
        for name in ("moe_capacity_factor", "moe_eval_capacity_factor"):
            cf = getattr(self, name)
            if cf is not None and not cf > 0:
                bad(name, f"must be > 0 (leave unset for dropless), got {cf}")
        if not 0.0 <= self.moe_jitter_eps < 1.0:
            bad("moe_jitter_eps", f"must be in [0, 1), got {self.moe_jitter_eps}")
        if not 0.0 <= self.cluster_dropout < 1.0:
            bad("cluster_dropout", f"must be in [0, 1), got {self.cluster_dropout}")
        if self.cluster_dropout > 0:
            m, dropped = self.cluster_size, self.dropped_per_cluster
            if m == 1:
                bad(
                    "cluster_dropout",
                    f"clusters of 1 expert (--moe-expert-count {E} / --moe-clusters {G}) "
                    f"cannot drop an expert and keep one: use --cluster-dropout 0, or fewer --moe-clusters",
                )
            if dropped == 0:
                smallest = math.ceil(0.5 / m * 10**4) / 10**4  # 4 decimals, rounded up: it does drop one
                bad(
                    "cluster_dropout",
                    f"{self.cluster_dropout} drops no expert in clusters of {m} "
                    f"(floor({self.cluster_dropout}*{m} + 1/2) = 0), which would train as plain MoE: the "
                    f"smallest rate that drops one expert is {smallest:g}; 0 turns cluster dropout off",
                )
            if dropped >= m:
                bad(
                    "cluster_dropout",
                    f"{self.cluster_dropout} drops {dropped} of the {m} experts in each cluster, leaving it empty",
                )
            if E - G * self.dropped_per_cluster < self.moe_top_k:
                bad("cluster_dropout", f"leaves fewer than --moe-top-k={self.moe_top_k} experts")
        if self.cluster_dropout_interval < 1:
            bad("cluster_dropout_interval", f"must be >= 1, got {self.cluster_dropout_interval}")
        if not 0 <= self.moe_seed <= MAX_MOE_SEED:
            bad("moe_seed", f"must be in 0 .. 2^64-1, got {self.moe_seed}")
        return self

    def validate_expert_parallel(self, world_size: int) -> "MoEConfig":
        """Raise ConfigError, naming the flags, when the experts cannot be split over ``world_size`` processes."""
        E, G, W = self.moe_expert_count, self.moe_clusters, world_size
        if E % W:
            raise ConfigError(
                f"--moe-expert-count: {E} experts cannot be split evenly over {W} processes (expert parallelism "
                f"gives each process E/W experts): use a multiple of {W}, or --moe-expert-parallel off to keep "
                f"every expert on every process"
            )
        if self.moe_expert_placement == "cluster" and G % W:
            raise ConfigError(
                f"--moe-expert-placement cluster: the {G} clusters of {E // G} experts (--moe-clusters {G}) cannot "
                f"lie whole on {W} processes holding {E // W} experts each; it needs --moe-clusters to be a "
                f"multiple of {W}, or use --moe-expert-placement contiguous"
            )
        return self

    @classmethod
    def from_namespace(cls, args) -> "MoEConfig":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)})
