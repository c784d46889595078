"""Sparse upcycling of one FFN block (Komatsuzaki et al., ICLR 2023): a MoE layer whose experts are copies of a
dense FFN. Plain torch; the command that upcycles a whole fairseq checkpoint is fairseq_moec/upcycle.py.

Every expert gets the dense fc1 and fc2, weight and bias. ``noise`` > 0 adds independent Gaussian noise of standard
deviation ``noise`` x std(dense weight) to each expert's two weight matrices (biases stay exact copies). The router:
'random' keeps the one the layer was built with (the initialisation of a new model), 'zeros' zeroes a linear router,
so that every expert has probability exactly 1/E for every token.

What the layer computes right after upcycling, in eval mode and without noise (FFN: the dense block):

* top-2, gates renormalised over the pair: FFN(x) exactly, whatever the router (the two experts are the same);
* top-1, gate = router probability: p(x) FFN(x), p(x) = max_e softmax(router(x))_e; with 'zeros' FFN(x) / E.
"""

import math
from typing import Optional

import torch

from .moe_layer import MoELayer
from .router import LinearRouter

ROUTER_INITS = ("random", "zeros")


@torch.no_grad()
def upcycle_moe_layer(
    moe: MoELayer,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor,
    router_init: str = "random",
    noise: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> None:
    """Make every expert of ``moe`` a copy of the dense FFN fc2(act(fc1(x))) (nn.Linear layouts: fc1_weight
    [ffn, d], fc2_weight [d, ffn]); see the module docstring for ``router_init`` and ``noise``."""
    experts = moe.experts
    if len(experts.fc1) != 1:
        raise ValueError(f"experts of {len(experts.fc1)} stacked FFNs cannot be copies of one dense FFN")
    if router_init not in ROUTER_INITS:
        raise ValueError(f"router_init must be one of {', '.join(ROUTER_INITS)}, got {router_init!r}")
    if router_init == "zeros" and not isinstance(moe.router, LinearRouter):
        # a cosine router normalises a projection: at zero it has no direction and an unbounded gradient
        raise ValueError(f"router_init 'zeros' needs a linear router, not {type(moe.router).__name__}")
    if not (math.isfinite(noise) and noise >= 0):
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    copies = (
        (experts.fc1[0].weight, fc1_weight),
        (experts.fc1[0].bias, fc1_bias),
        (experts.fc2[0].weight, fc2_weight),
        (experts.fc2[0].bias, fc2_bias),
    )
    for stacked, dense in copies:  # stacked: [E, *dense.shape]
        if stacked.shape[1:] != dense.shape:
            raise ValueError(f"dense FFN tensor of shape {tuple(dense.shape)}, experts of {tuple(stacked.shape[1:])}")
        stacked.copy_(dense.expand_as(stacked))
    if noise > 0:
        for stacked, dense in (copies[0], copies[2]):
            std = noise * dense.float().std()
            stacked.add_((torch.randn(stacked.shape, generator=generator) * std).to(stacked.dtype))
    if router_init == "zeros":
        moe.router.weight.zero_()
