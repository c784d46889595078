"""Let fairseq checkpoints load under torch >= 2.6, where torch.load defaults to weights_only=True.

fairseq's checkpoint_utils calls torch.load without weights_only, so torch's restricted unpickler refuses
the few non-tensor globals that fairseq stores (the argparse Namespace of old-style configs, numpy scalars
in the training state). We allowlist exactly those; any other global in a checkpoint (say os.system) is
still refused by torch, never executed. (What process 0 sends the other processes is another matter: see
``_unpickle_peer_broadcasts``.)
"""
import argparse
import io

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
    _unpickle_peer_broadcasts()


def _unpickle_peer_broadcasts() -> None:
    """A multi-process run that resumes reads the checkpoint on process 0, which sends it to the others
    pickled (fairseq.distributed.utils._broadcast_object_slow), config objects (omegaconf) and fairseq's
    tensor placeholders included. torch >= 2.6 refuses those under weights_only=True, so every resume with
    more than one process failed. This is data from process 0 of the same job over its own process group,
    not a file: it is unpickled like the rest of fairseq's inter-process messages (all_gather_list uses
    pickle), with weights_only=False for exactly this call."""
    from fairseq.distributed import utils as distributed_utils

    distributed_utils._broadcast_object_slow = _broadcast_object_slow


def _broadcast_object_slow(obj, src_rank, group, dist_device):
    from fairseq.distributed.utils import broadcast, get_rank

    if get_rank(group) == src_rank:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        buffer = torch.ByteTensor(buffer.getbuffer()).to(dist_device)
        length = torch.LongTensor([len(buffer)]).to(dist_device)
        broadcast(length, src=src_rank, group=group)
        broadcast(buffer, src=src_rank, group=group)
        return obj
    length = torch.LongTensor([0]).to(dist_device)
    broadcast(length, src=src_rank, group=group)
    buffer = torch.ByteTensor(int(length.item())).to(dist_device)
    broadcast(buffer, src=src_rank, group=group)
    return torch.load(io.BytesIO(buffer.cpu().numpy()), map_location="cpu", weights_only=False)
