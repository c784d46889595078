"""Let fairseq checkpoints load under torch >= 2.6, where torch.load defaults to weights_only=True.

Upstream behaviour (fairseq-fixed 0.12.3.1 with torch >= 2.6): fairseq's checkpoint_utils calls torch.load
without weights_only, so torch's restricted unpickler refuses the few non-tensor globals that fairseq stores (the
argparse Namespace of old-style configs, numpy scalars in the training state) and no checkpoint loads. We
allowlist exactly those; any other global in a checkpoint (say os.system) is still refused by torch, never
executed. (What process 0 sends the other processes is another matter: see peer_broadcast.py.)
"""

import argparse

import numpy as np
import torch

from .target import Patch

PATCH = Patch("checkpoint_allowlist", "torch.load refuses every fairseq checkpoint (weights_only=True)")

FAIRSEQ_CHECKPOINT_GLOBALS = [
    argparse.Namespace,
    np.core.multiarray.scalar,
    np.dtype,
    type(np.dtype(np.float64)),
    type(np.dtype(np.float32)),
    type(np.dtype(np.int64)),
]


def installed() -> bool:
    get = getattr(torch.serialization, "get_safe_globals", None)
    return get is not None and all(g in get() for g in FAIRSEQ_CHECKPOINT_GLOBALS)


def check() -> None:
    PATCH.expect_fairseq()
    PATCH.expect_parameters(torch.serialization, "add_safe_globals", "torch.serialization", ["safe_globals"])
    PATCH.expect_attribute(torch.serialization, "get_safe_globals", "torch.serialization")


def apply() -> None:
    torch.serialization.add_safe_globals(FAIRSEQ_CHECKPOINT_GLOBALS)
    PATCH.log(
        "added argparse.Namespace and numpy scalars/dtypes to torch.serialization's weights_only allowlist "
        "(fairseq checkpoints hold them)"
    )
