"""Small helpers shared by the WMT recipe scripts: errors, atomic outputs, line I/O, progress bars.

Every script of the recipe reports bad input as one ``SCRIPT: error: ...`` line (argparse's form, no traceback)
and exit status 2, and writes its outputs under a temporary name that is renamed only once complete, so that an
interrupted run never leaves a file that looks finished. The pipeline steps shared with the demo, the study and the
benchmarks (atomic outputs, sentencepiece, hypotheses, sacrebleu) come from fairseq_moec.pipeline, imported when a
script first needs one: it imports the plugin, and with it fairseq (seconds).
"""

import logging
import os
import sys
from typing import Iterable, Iterator, List

# the plugin's patches of fairseq log what they replace when it is imported: news for the fairseq commands, noise
# for these scripts
logging.getLogger("fairseq_moec.patches").setLevel(logging.WARNING)

EXIT_BAD_INPUT = 2


class RecipeError(Exception):
    """A problem with the user's input or environment: reported as one clear line, no traceback."""


def die(msg: str) -> "None":
    raise RecipeError(msg)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    print(f"WARNING: {msg}", file=sys.stderr, flush=True)


def main_guard(main) -> None:
    """Run ``main()``; turn RecipeError, the pipeline library's PipelineError and an OSError (such as a missing or
    unreadable input file) into 'SCRIPT: error: ...' + exit 2: a traceback would hide the message."""
    prog = os.path.basename(sys.argv[0])
    try:
        rc = main()
    except Exception as e:
        if not _bad_input(e):
            raise
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print(f"{prog}: error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(rc or 0)


def _bad_input(e: BaseException) -> bool:
    """A RecipeError, an OSError, or an error of the pipeline library (if a step imported it)."""
    library = sys.modules.get("fairseq_moec.pipeline.files")
    return isinstance(e, (RecipeError, OSError)) or (library is not None and isinstance(e, library.PipelineError))


def atomic_path(path: str, mode: str = "file"):
    """fairseq_moec.pipeline.files.atomic_path: a temporary path next to ``path``, renamed to it on success."""
    from fairseq_moec.pipeline import files

    return files.atomic_path(path, mode)


def write_text_atomic(path: str, text: str) -> None:
    from fairseq_moec.pipeline import files

    files.write_text_atomic(path, text)


def require_file(path: str, what: str = "file", allow_empty: bool = False) -> None:
    if not os.path.exists(path):
        die(f"{what} not found: {path}")
    if not os.path.isfile(path):
        die(f"{what} is not a regular file: {path}")
    if not allow_empty and os.path.getsize(path) == 0:
        die(f"{what} is empty: {path}")


def read_lines(path: str, what: str = "file", allow_empty: bool = False) -> List[str]:
    """Lines split on '\\n' only: Python's universal newlines would also split on stray '\\r' and desync
    parallel files (Common Crawl has such characters)."""
    require_file(path, what, allow_empty)
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        return []
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    try:
        return [line.decode("utf-8") for line in lines]
    except UnicodeDecodeError as e:
        die(f"{what} is not UTF-8: {path} ({e})")


def iter_lines(path: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for line in f:
            yield line.rstrip(b"\n").decode("utf-8", errors="replace")


def count_lines(path: str) -> int:
    n = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            n += block.count(b"\n")
    return n


def write_lines(path: str, lines: Iterable[str]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for line in lines:
            f.write(line)
            f.write("\n")
            n += 1
    return n


def progress(iterable=None, **kwargs):
    """tqdm on stderr, refreshed at most every few seconds when stderr is a log file rather than a terminal."""
    from tqdm import tqdm

    kwargs.setdefault("mininterval", 0.5 if sys.stderr.isatty() else 10.0)
    kwargs.setdefault("file", sys.stderr)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, **kwargs)
