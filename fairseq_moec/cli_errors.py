"""Bad flags and input files end the fairseq commands with one line, as argparse does:

    fairseq-train: error: --moe-clusters: must be >= 1 and divide --moe-expert-count=8, got 3 (allowed: 1, 2, 4, 8)

Our checks raise ``ConfigError`` (modules/config.py) from inside fairseq's main functions (task setup, model and
criterion building, checkpoint and data loading), where nothing catches it, so Python would print a 25-line
traceback ending in the message. Two hooks print the message alone and exit with argparse's status 2:

* ``sys.excepthook``, for an error nobody caught (fairseq-train, -generate, -interactive, -validate). It looks
  along the exception chain, since fairseq re-raises some errors as its own ("Cannot load model parameters").
* fairseq-hydra-train runs main inside hydra's job runner, which catches every exception and re-raises it from
  ``JobReturn.return_value`` to print its own traceback: we report there.

Every other exception (a bug, an interrupted run) keeps its traceback.
"""
import os
import sys
from typing import Optional

from .modules.config import ConfigError


def config_error_in(exc: Optional[BaseException]) -> Optional[ConfigError]:
    """The ConfigError that ``exc`` is or was raised from, if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ConfigError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def report(error: ConfigError) -> None:
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "fairseq"
    sys.stdout.flush()
    print(f"{prog}: error: {error}", file=sys.stderr, flush=True)


def _excepthook(exc_type, exc, tb):
    error = config_error_in(exc)
    if error is None:
        return _previous_excepthook(exc_type, exc, tb)
    report(error)
    if not (hasattr(sys, "ps1") or sys.flags.interactive):  # an interactive session must go on
        # Python would exit with 1 after this hook; argparse exits with 2 for usage errors. Nothing has been
        # trained or written that the skipped interpreter shutdown would have to finish.
        os._exit(2)


_previous_excepthook = sys.excepthook


def _hydra_return_value(self):
    from hydra.core.utils import JobStatus

    error = config_error_in(self._return_value) if self.status == JobStatus.FAILED else None
    if error is not None:
        report(error)
        sys.exit(2)  # SystemExit passes hydra's ``except Exception`` reporting
    return _hydra_job_return_value.fget(self)


_hydra_job_return_value = None


def print_config_errors_as_one_line() -> None:
    global _hydra_job_return_value
    if sys.excepthook is not _excepthook:
        sys.excepthook = _excepthook
    try:
        from hydra.core.utils import JobReturn
    except ImportError:  # fairseq without hydra: nothing to hook
        return
    if _hydra_job_return_value is None:
        _hydra_job_return_value = JobReturn.return_value
        JobReturn.return_value = property(_hydra_return_value, _hydra_job_return_value.fset)
