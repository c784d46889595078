"""Name the file when a checkpoint cannot be read, and every model option that does not fit it.

Upstream behaviour (fairseq-fixed 0.12.3.1): ``fairseq.checkpoint_utils.load_checkpoint_to_cpu`` hands the file
to torch.load, which fails on a zero-byte, truncated or corrupt file (a save cut short, e.g. by a full disk, or
flipped bytes) with a bare EOFError, a zip reader error or a weights_only UnpicklingError that names no file, in
fairseq-train, -generate, -interactive and the hub interface alike; a directory or a text file given as --path
fails the same way, and a --path that does not exist ends ``load_model_ensemble_and_task`` with a traceback. We
raise a ConfigError that names the file and the newest intact checkpoint next to it (input_checks.
load_checkpoint_file; a pickled global that torch refuses is named as such).

Model options that do not fit the checkpoint fail later, in load_state_dict ("Cannot load model parameters from
checkpoint ...; please ensure that the architectures match", or a list of missing keys), with tracebacks. Once
the file is read we compare the options it was trained with to the given ones (input_checks.
refuse_other_model_options): those of a fairseq-train run that resumes or starts from it (patches/fresh_start.py
says which), and the --model-overrides of fairseq-generate/-interactive (the hub's keyword arguments), which
fairseq applies to the checkpoint's options before it builds the model. Overrides of options that shape no
parameter are applied by fairseq as before.
"""

import inspect
import os

from fairseq import checkpoint_utils, file_io

from .. import input_checks
from .target import Patch

PATCH = Patch(
    "unreadable_checkpoint",
    "an unreadable checkpoint, or one of other model options, fails with a traceback that names no file or option",
)

fairseq_load_checkpoint_to_cpu = None  # fairseq's functions, kept by apply()
fairseq_load_model_ensemble_and_task = None


def load_checkpoint_to_cpu_naming_the_file(path, arg_overrides=None, load_on_all_ranks=False):
    model_options, other_overrides = input_checks.split_model_overrides(arg_overrides)
    state = input_checks.load_checkpoint_file(
        path, lambda p: fairseq_load_checkpoint_to_cpu(p, other_overrides, load_on_all_ranks)
    )
    # the model options overridden are compared, not applied: either they differ (refused) or they are the same
    input_checks.refuse_other_model_options(path, state, model_options)
    return state


def load_model_ensemble_and_task_naming_a_missing_file(filenames, *args, **kwargs):
    call = inspect.signature(fairseq_load_model_ensemble_and_task).bind(filenames, *args, **kwargs)
    call.apply_defaults()
    plain = call.arguments["suffix"] == "" and call.arguments["num_shards"] == 1 and call.arguments["state"] is None
    for filename in filenames if plain and not file_io.IOPathManager else ():
        if not os.path.exists(filename[:-3] + "-shard0.pt"):  # else fairseq loads FSDP shards of that name
            input_checks.refuse_missing_checkpoint(filename)
    return fairseq_load_model_ensemble_and_task(filenames, *args, **kwargs)


def installed() -> bool:
    return PATCH.installed(checkpoint_utils, "load_checkpoint_to_cpu")


def check() -> None:
    PATCH.expect_fairseq()
    PATCH.expect_parameters(
        checkpoint_utils,
        "load_checkpoint_to_cpu",
        "fairseq.checkpoint_utils",
        ["path", "arg_overrides", "load_on_all_ranks"],
    )
    PATCH.expect_parameters(
        checkpoint_utils,
        "load_model_ensemble_and_task",
        "fairseq.checkpoint_utils",
        ["filenames", "arg_overrides", "task", "strict", "suffix", "num_shards", "state"],
    )


def apply() -> None:
    global fairseq_load_checkpoint_to_cpu, fairseq_load_model_ensemble_and_task
    fairseq_load_checkpoint_to_cpu = checkpoint_utils.load_checkpoint_to_cpu
    fairseq_load_model_ensemble_and_task = checkpoint_utils.load_model_ensemble_and_task
    PATCH.replace(checkpoint_utils, "load_model_ensemble_and_task", load_model_ensemble_and_task_naming_a_missing_file)
    PATCH.replace(checkpoint_utils, "load_checkpoint_to_cpu", load_checkpoint_to_cpu_naming_the_file)  # installed()
    PATCH.log(
        "replaced fairseq.checkpoint_utils.load_checkpoint_to_cpu (names an unreadable checkpoint and the model "
        "options that do not fit it) and load_model_ensemble_and_task (names a missing file)"
    )
