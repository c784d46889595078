"""Let a multi-process run resume under torch >= 2.6: unpickle what process 0 broadcasts as fairseq did before.

Upstream behaviour (fairseq-fixed 0.12.3.1 with torch >= 2.6): a multi-process run that resumes reads the
checkpoint on process 0, which sends it to the others pickled (fairseq.distributed.utils._broadcast_object_slow),
config objects (omegaconf) and fairseq's tensor placeholders included. The receivers unpickle it with torch.load,
whose default became weights_only=True, which refuses those: every resume with more than one process failed.
This is data from process 0 of the same job over its own process group, not a file: we unpickle it like the rest
of fairseq's inter-process messages (all_gather_list uses pickle), with weights_only=False for exactly this call.
"""

import io

import torch
from fairseq.distributed import utils as distributed_utils

from .target import Patch

PATCH = Patch(
    "peer_broadcast",
    "every multi-process resume fails: the other processes cannot unpickle the checkpoint process 0 sends them",
)

fairseq_broadcast_object_slow = None  # fairseq's function, kept by apply()


def broadcast_object_slow(obj, src_rank, group, dist_device):
    """fairseq's _broadcast_object_slow, receiving with weights_only=False."""
    broadcast, get_rank = distributed_utils.broadcast, distributed_utils.get_rank
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


def installed() -> bool:
    return PATCH.installed(distributed_utils, "_broadcast_object_slow")


def check() -> None:
    PATCH.expect_fairseq()
    where = "fairseq.distributed.utils"
    PATCH.expect_parameters(
        distributed_utils, "_broadcast_object_slow", where, ["obj", "src_rank", "group", "dist_device"]
    )
    PATCH.expect_parameters(distributed_utils, "broadcast", where, ["tensor", "src", "group"])
    PATCH.expect_attribute(distributed_utils, "get_rank", where)


def apply() -> None:
    global fairseq_broadcast_object_slow
    fairseq_broadcast_object_slow = distributed_utils._broadcast_object_slow
    PATCH.replace(distributed_utils, "_broadcast_object_slow", broadcast_object_slow)
    PATCH.log(
        "replaced fairseq.distributed.utils._broadcast_object_slow (receivers unpickle process 0's "
        "checkpoint with weights_only=False)"
    )
