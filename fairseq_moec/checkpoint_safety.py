"""Let fairseq checkpoints load under torch >= 2.6, where torch.load defaults to weights_only=True.

fairseq's checkpoint_utils calls torch.load without weights_only, so torch's restricted unpickler refuses
the few non-tensor globals that fairseq stores (the argparse Namespace of old-style configs, numpy scalars
in the training state). We allowlist exactly those; any other global in a checkpoint (say os.system) is
still refused by torch, never executed.
"""
import argparse

import numpy as np
import torch

FAIRSEQ_CHECKPOINT_GLOBALS = [
    argparse.Namespace,
    np.core.multiarray.scalar,
    np.dtype,
    type(np.dtype(np.float64)),
    type(np.dtype(np.float32)),
    type(np.dtype(np.int64)),
]


def allow_fairseq_checkpoint_globals() -> None:
    torch.serialization.add_safe_globals(FAIRSEQ_CHECKPOINT_GLOBALS)
