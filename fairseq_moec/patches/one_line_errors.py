"""Bad flags and input files end the fairseq commands with one line, as argparse does:

    fairseq-train: error: --moe-clusters: must be >= 1 and divide --moe-expert-count=8, got 3 (allowed: 1, 2, 4, 8)

Upstream behaviour (fairseq-fixed 0.12.3.1, hydra-core 1.3): our checks raise ``ConfigError`` (modules/config.py)
from inside fairseq's main functions (task setup, model and criterion building, checkpoint and data loading),
where nothing catches it, so Python prints a 25-line traceback ending in the message. Two hooks print the message
alone and exit with argparse's status 2:

* ``sys.excepthook``, for an error nobody caught (fairseq-train, -generate, -interactive, -validate). It looks
  along the exception chain, since fairseq re-raises some errors as its own ("Cannot load model parameters").
* fairseq-hydra-train runs main inside hydra's job runner, which catches every exception and re-raises it from
  ``hydra.core.utils.JobReturn.return_value`` to print its own traceback: we report there.

Every other exception (a bug, an interrupted run) keeps its traceback.
"""

import os
import sys
from typing import Optional

from ..input_checks import error_in_chain
from ..modules.config import ConfigError
from .target import Patch

PATCH = Patch("one_line_errors", "a bad flag or file ends the fairseq commands with a 25-line traceback")

previous_excepthook = None  # what sys.excepthook was, and hydra's JobReturn.return_value: kept by apply()
hydra_return_value = None


def config_error_in(exc: Optional[BaseException]) -> Optional[ConfigError]:
    """The ConfigError that ``exc`` is or was raised from, if any."""
    return error_in_chain(exc, ConfigError)


def report(error: ConfigError) -> None:
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "fairseq"
    sys.stdout.flush()
    print(f"{prog}: error: {error}", file=sys.stderr, flush=True)


def excepthook(exc_type, exc, tb):
    error = config_error_in(exc)
    if error is None:
        return previous_excepthook(exc_type, exc, tb)
    report(error)
    if not (hasattr(sys, "ps1") or sys.flags.interactive):  # an interactive session must go on
        # Python would exit with 1 after this hook; argparse exits with 2 for usage errors. Nothing has been
        # trained or written that the skipped interpreter shutdown would have to finish.
        os._exit(2)


def return_value_reporting_config_errors(self):
    from hydra.core.utils import JobStatus

    error = config_error_in(self._return_value) if self.status == JobStatus.FAILED else None
    if error is not None:
        report(error)
        sys.exit(2)  # SystemExit passes hydra's ``except Exception`` reporting
    return hydra_return_value.fget(self)


def _job_return():
    """hydra's JobReturn, or None where hydra is not installed (fairseq-hydra-train then cannot run)."""
    try:
        from hydra.core.utils import JobReturn
    except ImportError:
        return None
    return JobReturn


def installed() -> bool:
    job_return = _job_return()
    return PATCH.installed(sys, "excepthook") and (job_return is None or PATCH.installed(job_return, "return_value"))


def check() -> None:
    PATCH.expect_fairseq()
    job_return = _job_return()
    if job_return is None:
        return
    where = "hydra.core.utils.JobReturn"
    if not isinstance(job_return.__dict__.get("return_value"), property):
        raise PATCH.refuse(f"{where}.return_value as a property", repr(job_return.__dict__.get("return_value")))
    PATCH.expect_parameters(job_return, "return_value", where, ["self"])
    fields = getattr(job_return, "__dataclass_fields__", {})
    if not {"status", "_return_value"} <= set(fields):
        raise PATCH.refuse(f"{where} with the fields status and _return_value", f"fields {sorted(fields)}")


def apply() -> None:
    global previous_excepthook, hydra_return_value
    if not PATCH.installed(sys, "excepthook"):
        previous_excepthook = sys.excepthook
        PATCH.replace(sys, "excepthook", excepthook)
    job_return = _job_return()
    if job_return is not None and not PATCH.installed(job_return, "return_value"):
        hydra_return_value = job_return.return_value
        PATCH.replace(
            job_return, "return_value", property(return_value_reporting_config_errors, hydra_return_value.fset)
        )
    PATCH.log(
        "replaced sys.excepthook and hydra's JobReturn.return_value (a ConfigError ends the fairseq "
        "commands with one line, exit status 2)"
    )
