"""Copy checkpoints atomically (temporary file + rename), so that a run killed mid-copy keeps checkpoint_last.pt.

Upstream behaviour (fairseq-fixed 0.12.3.1): ``fairseq.checkpoint_utils.save_checkpoint`` writes the first
checkpoint file of a save (e.g. checkpoint_3_600.pt) atomically, then copies it over checkpoint_last.pt and
checkpoint_best.pt with ``fairseq.file_io.PathManager.copy``, which is ``shutil.copyfile`` into the destination
itself: a run killed (or a disk that fills up) during that copy leaves a truncated checkpoint_last.pt, and the old
one is lost. We copy to a temporary file next to the destination and rename it over the destination
(sharded_checkpoint.atomic_copy). Copies through iopath's PathManager (remote storage) are left to it. A copy
that fails (a full disk) removes its temporary file and ends the run with one line that names the file and the
last good checkpoint (input_checks.checkpoint_not_written), as a failed write does (failed_checkpoint_save.py).
"""

import os

from fairseq import file_io

from .. import input_checks, sharded_checkpoint
from .target import Patch

PATCH = Patch("atomic_checkpoint_copy", "a run killed while fairseq copies checkpoint_last.pt loses it")

fairseq_copy = None  # fairseq's PathManager.copy, kept by apply()


def atomic_copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
    if file_io.IOPathManager or not overwrite and os.path.exists(dst_path):
        return fairseq_copy(src_path, dst_path, overwrite)
    try:
        sharded_checkpoint.atomic_copy(src_path, dst_path)
    except Exception as e:
        error = input_checks.checkpoint_not_written(dst_path, e)
        if error is None:
            raise
        raise error from e
    return True


def installed() -> bool:
    return PATCH.installed(file_io.PathManager, "copy")


def check() -> None:
    PATCH.expect_fairseq()
    PATCH.expect_parameters(
        file_io.PathManager, "copy", "fairseq.file_io.PathManager", ["src_path", "dst_path", "overwrite"]
    )
    PATCH.expect_attribute(file_io, "IOPathManager", "fairseq.file_io")


def apply() -> None:
    global fairseq_copy
    fairseq_copy = file_io.PathManager.copy
    PATCH.replace(file_io.PathManager, "copy", staticmethod(atomic_copy))
    PATCH.log("replaced fairseq.file_io.PathManager.copy (copies checkpoints to a temporary file, then renames)")
