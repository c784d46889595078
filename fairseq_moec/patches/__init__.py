"""Every change the plugin makes to fairseq's (and torch's, and hydra's) own code, one module per patch.

Each module's docstring names the upstream behaviour it fixes, in fairseq-fixed 0.12.3.1 (the release every patch
was written against), and has three functions: ``installed()``, ``check()`` (is the target there and shaped as
expected? else PatchRefused) and ``apply()`` (keep the original, replace it, log what and why at DEBUG on the logger
"fairseq_moec.patches"). ``install()`` checks every patch before it replaces anything, so a fairseq that does not
fit is refused with a message and left untouched; it is idempotent, and logs one INFO line naming the patches it
applied (one line, not one per patch: every process of every fairseq command imports the plugin).
"""

from . import (
    atomic_checkpoint_copy,
    bf16_without_tpu,
    checkpoint_allowlist,
    empty_data,
    expert_parallel_trainer,
    failed_checkpoint_save,
    first_epoch_batches,
    fresh_start,
    hydra_legacy_arch,
    last_batch,
    log_file_once,
    one_line_errors,
    peer_broadcast,
    torchrun_cpu,
    unreadable_checkpoint,
)
from .target import FAIRSEQ_VERSION, PatchRefused, logger  # noqa: F401  (part of the package's interface)

PATCHES = (
    checkpoint_allowlist,  # torch.load of fairseq checkpoints
    peer_broadcast,  # multi-process resume
    last_batch,  # data: the fork's batching
    first_epoch_batches,
    torchrun_cpu,  # launching
    bf16_without_tpu,
    hydra_legacy_arch,
    fresh_start,  # refusals of unusable inputs
    unreadable_checkpoint,
    empty_data,
    one_line_errors,  # how those refusals are printed
    atomic_checkpoint_copy,  # checkpoint writing
    failed_checkpoint_save,
    expert_parallel_trainer,
    log_file_once,  # --log-file
)


def install() -> None:
    """Apply every patch not yet applied, after checking all of them (PatchRefused names the first misfit)."""
    pending = [patch for patch in PATCHES if not patch.installed()]
    for patch in pending:
        patch.check()
    for patch in pending:
        patch.apply()
    if pending:
        names = ", ".join(patch.PATCH.name for patch in pending)
        logger.info(
            "patched fairseq %s in %d places: %s (each one's reason at DEBUG)", FAIRSEQ_VERSION, len(pending), names
        )
