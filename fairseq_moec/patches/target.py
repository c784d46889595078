"""What every patch checks before it replaces anything, how it replaces, and the one (DEBUG) line it logs.

A patch is written against the code of one fairseq release (fairseq-fixed 0.12.3.1, the fork that installs on
Python >= 3.10). Another release may have moved, renamed or changed the function it wraps, and a wrapper around
the wrong thing can break fairseq silently; so before anything is replaced every patch checks the fairseq
version and the target (it exists, takes the parameters the wrapper passes on) and refuses otherwise.
"""

import inspect
import logging
from typing import Callable, Sequence

FAIRSEQ_VERSION = "0.12.3.1"
FAIRSEQ_DISTRIBUTION = "fairseq-fixed"

logger = logging.getLogger("fairseq_moec.patches")


class PatchRefused(RuntimeError):
    """A patch's target is not the one the patch was written against."""


def _underlying_function(value):
    """The function a replacement is stored as: a property's getter, a static/class method's function."""
    if isinstance(value, property):
        return value.fget
    return getattr(value, "__func__", value)


class Patch:
    """One fix of fairseq's (or torch's) behaviour: ``name`` for the messages, ``fixes`` says what goes wrong
    without it (it ends the refusal message)."""

    def __init__(self, name: str, fixes: str):
        self.name, self.fixes = name, fixes

    def refuse(self, expected: str, found: str) -> PatchRefused:
        return PatchRefused(
            f"fairseq_moec: patch {self.name} expects {expected}, found {found}; without it "
            f"{self.fixes}. Use {FAIRSEQ_DISTRIBUTION}=={FAIRSEQ_VERSION} (scripts/bootstrap.sh "
            f"installs it)"
        )

    def expect_fairseq(self) -> None:
        import fairseq

        found = getattr(fairseq, "__version__", "a fairseq without __version__")
        if found != FAIRSEQ_VERSION:
            raise self.refuse(f"fairseq {FAIRSEQ_VERSION} ({FAIRSEQ_DISTRIBUTION})", f"fairseq {found}")

    def expect_attribute(self, owner, attribute: str, where: str):
        """``owner.attribute``, which must exist; ``where`` names it in the message (e.g. 'fairseq.trainer')."""
        if not hasattr(owner, attribute):
            raise self.refuse(f"{where}.{attribute}", "no such attribute")
        return getattr(owner, attribute)

    def expect_parameters(self, owner, attribute: str, where: str, parameters: Sequence[str]) -> Callable:
        """``owner.attribute`` must be a callable whose parameters are named ``parameters``, in that order (a
        method's ``self`` included); a property is checked by its getter."""
        target = _underlying_function(self.expect_attribute(owner, attribute, where))
        try:
            found = list(inspect.signature(target).parameters)
        except (TypeError, ValueError):
            found = None
        if found != list(parameters):
            raise self.refuse(
                f"{where}.{attribute}({', '.join(parameters)})",
                f"({', '.join(found)})" if found is not None else "no signature",
            )
        return target

    def mark(self, replacement):
        """Tag a replacement function as this patch's, so that ``installed`` can recognise it."""
        _underlying_function(replacement).fairseq_moec_patch = self.name
        return replacement

    def installed(self, owner, attribute: str) -> bool:
        """Whether ``owner.attribute`` is already this patch's replacement."""
        value = getattr(owner, attribute, None)
        return getattr(_underlying_function(value), "fairseq_moec_patch", None) == self.name

    def replace(self, owner, attribute: str, replacement) -> None:
        setattr(owner, attribute, self.mark(replacement))

    def log(self, what: str) -> None:
        """The one line a patch logs at DEBUG: what it replaced (or added), and why (install() sums them up at INFO)."""
        logger.debug("%s: %s", self.name, what)
