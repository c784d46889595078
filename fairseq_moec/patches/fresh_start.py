"""Refuse to train from scratch in a save dir that holds checkpoints but no checkpoint_last.pt.

Upstream behaviour (fairseq-fixed 0.12.3.1): ``fairseq.checkpoint_utils.load_checkpoint`` resumes from
SAVE_DIR/checkpoint_last.pt (or --restore-file); when that file is missing it starts from scratch, in the same
directory, and the first validation overwrites checkpoint_best.pt with a worse model. We run
input_checks.refuse_start_from_scratch first, which says how to resume instead.

The checkpoint it then loads (to resume, or --restore-file, --finetune-from-model) is read with the run's model
options at hand (input_checks.loading_to_train), so that one trained with other options is refused with their
names before fairseq fails to load its weights (the check is in patches/unreadable_checkpoint.py, where fairseq
reads the file).
"""

from fairseq import checkpoint_utils

from .. import input_checks
from ..sharded_checkpoint import main_suffix
from .target import Patch

PATCH = Patch(
    "fresh_start", "a run whose checkpoint_last.pt is missing starts from scratch and overwrites checkpoint_best.pt"
)

fairseq_load_checkpoint = None  # fairseq's function, kept by apply()


def load_checkpoint_refusing_a_fresh_start(cfg, trainer, **passthrough_args):
    # every expert-parallel process checks the main file's name (process r > 0 has a shard suffix)
    input_checks.refuse_start_from_scratch(cfg, main_suffix(trainer.checkpoint_suffix))
    with input_checks.loading_to_train(getattr(getattr(trainer, "cfg", None), "model", None)):
        return fairseq_load_checkpoint(cfg, trainer, **passthrough_args)


def installed() -> bool:
    return PATCH.installed(checkpoint_utils, "load_checkpoint")


def check() -> None:
    PATCH.expect_fairseq()
    PATCH.expect_parameters(
        checkpoint_utils, "load_checkpoint", "fairseq.checkpoint_utils", ["cfg", "trainer", "passthrough_args"]
    )


def apply() -> None:
    global fairseq_load_checkpoint
    fairseq_load_checkpoint = checkpoint_utils.load_checkpoint
    PATCH.replace(checkpoint_utils, "load_checkpoint", load_checkpoint_refusing_a_fresh_start)
    PATCH.log("replaced fairseq.checkpoint_utils.load_checkpoint (refuses a fresh start next to checkpoints)")
