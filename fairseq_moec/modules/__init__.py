"""Plain-torch building blocks of MoEC layers (no fairseq import)."""

from .all_to_all import all_to_all
from .config import MoEConfig
from .dropout import ClusterDropout
from .expert_parallel import ExpertParallel, run_experts_remotely
from .experts import ExpertFFNs, GroupedLinear
from .moe_layer import MoELayer, capacity, dispatch_combine
from .router import CosineRouter, LinearRouter, Routing, route

__all__ = [
    "MoEConfig",
    "ClusterDropout",
    "ExpertFFNs",
    "GroupedLinear",
    "MoELayer",
    "capacity",
    "dispatch_combine",
    "CosineRouter",
    "LinearRouter",
    "Routing",
    "route",
    "ExpertParallel",
    "all_to_all",
    "run_experts_remotely",
]
