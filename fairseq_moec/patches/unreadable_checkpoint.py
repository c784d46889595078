"""Name the file when a checkpoint is empty or truncated.

Upstream behaviour (fairseq-fixed 0.12.3.1): ``fairseq.checkpoint_utils.load_checkpoint_to_cpu`` hands the file
to torch.load, which fails on a zero-byte or truncated file (a save cut short, e.g. by a full disk) with a bare
EOFError or a zip reader error that names no file, in fairseq-train, -generate and -interactive alike. We raise a
ConfigError that names the file and the newest intact checkpoint next to it (input_checks.unreadable_checkpoint).
"""

import os

from fairseq import checkpoint_utils

from ..input_checks import unreadable_checkpoint
from .target import Patch

PATCH = Patch("unreadable_checkpoint", "an empty or truncated checkpoint fails with an error that names no file")

fairseq_load_checkpoint_to_cpu = None  # fairseq's function, kept by apply()


def load_checkpoint_to_cpu_naming_the_file(path, *args, **kwargs):
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise unreadable_checkpoint(path, "empty file (0 bytes)")
    try:
        return fairseq_load_checkpoint_to_cpu(path, *args, **kwargs)
    except EOFError as e:
        raise unreadable_checkpoint(path, "truncated (torch.load: EOFError)") from e
    except RuntimeError as e:  # torch's zip reader, or its legacy format's storage reader
        if "PytorchStreamReader" not in str(e) and "unexpected EOF" not in str(e):
            raise
        raise unreadable_checkpoint(path, f"truncated or corrupt (torch.load: {str(e).splitlines()[0]})") from e


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


def apply() -> None:
    global fairseq_load_checkpoint_to_cpu
    fairseq_load_checkpoint_to_cpu = checkpoint_utils.load_checkpoint_to_cpu
    PATCH.replace(checkpoint_utils, "load_checkpoint_to_cpu", load_checkpoint_to_cpu_naming_the_file)
    PATCH.log("replaced fairseq.checkpoint_utils.load_checkpoint_to_cpu (names an empty or truncated checkpoint)")
