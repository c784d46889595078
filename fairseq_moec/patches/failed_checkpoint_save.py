"""Name the checkpoint that a full disk kept from being written, and the last good one, which is intact.

Upstream behaviour (fairseq-fixed 0.12.3.1): ``fairseq.checkpoint_utils.torch_persistent_save`` writes NAME.tmp and
renames it to NAME, so the previous checkpoint survives a failed write; but a full disk ends fairseq-train with
``OSError: [Errno 28] No space left on device`` (or torch's zip writer's "unexpected pos") and tracebacks, after
three tries 2.5 s apart, each logged, and leaves the partial NAME.tmp, which keeps the disk full. We write local
files once, with sharded_checkpoint.atomic_save (temporary file, fsync, rename; the temporary file is removed
when the write fails), and raise a ConfigError that names the file, the directory and its free space, and the
last good checkpoint (input_checks.checkpoint_not_written). Remote storage (iopath) and --write-checkpoints-
asynchronously keep fairseq's own writer. The copies to checkpoint_last.pt etc. are patches/
atomic_checkpoint_copy.py's.
"""

from fairseq import checkpoint_utils, file_io

from .. import input_checks, sharded_checkpoint
from .target import Patch

PATCH = Patch(
    "failed_checkpoint_save",
    "a full disk ends fairseq-train with tracebacks and leaves a partial checkpoint file that keeps the disk full",
)

fairseq_torch_persistent_save = None  # fairseq's function, kept by apply()


def torch_persistent_save_naming_the_file(obj, filename, async_write=False):
    if async_write or file_io.IOPathManager:
        return fairseq_torch_persistent_save(obj, filename, async_write)
    try:
        sharded_checkpoint.atomic_save(obj, filename)
    except Exception as e:
        error = input_checks.checkpoint_not_written(filename, e)
        if error is None:  # not an I/O error (e.g. something in the state that cannot be pickled): a bug
            raise
        raise error from e


def installed() -> bool:
    return PATCH.installed(checkpoint_utils, "torch_persistent_save")


def check() -> None:
    PATCH.expect_fairseq()
    PATCH.expect_parameters(
        checkpoint_utils, "torch_persistent_save", "fairseq.checkpoint_utils", ["obj", "filename", "async_write"]
    )
    PATCH.expect_attribute(file_io, "IOPathManager", "fairseq.file_io")


def apply() -> None:
    global fairseq_torch_persistent_save
    fairseq_torch_persistent_save = checkpoint_utils.torch_persistent_save
    PATCH.replace(checkpoint_utils, "torch_persistent_save", torch_persistent_save_naming_the_file)
    PATCH.log(
        "replaced fairseq.checkpoint_utils.torch_persistent_save (one atomic write; a full disk names the file "
        "and the last good checkpoint, and leaves no partial file)"
    )
