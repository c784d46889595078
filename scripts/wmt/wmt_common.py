"""Small helpers shared by the WMT recipe scripts: errors, atomic outputs, line I/O, progress bars.

Every script of the recipe reports bad input as one ``SCRIPT: error: ...`` line (argparse's form, no traceback)
and exit status 2, and writes its
outputs under a temporary name that is renamed only once complete, so that an interrupted run never leaves a
file that looks finished.
"""
import contextlib
import os
import sys
import tempfile
from typing import Iterable, Iterator, List

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
    """Run ``main()``; turn RecipeError (and an OSError such as a missing or unreadable input file) into
    'SCRIPT: error: ...' + exit 2: a traceback would hide the message."""
    prog = os.path.basename(sys.argv[0])
    try:
        rc = main()
    except (RecipeError, OSError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print(f"{prog}: error: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(rc or 0)


@contextlib.contextmanager
def atomic_path(path: str, mode: str = "file") -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, on any error remove it.

    The temporary sits in the same directory so that the final rename is atomic (same file system)."""
    directory = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(directory, exist_ok=True)
    base = os.path.basename(path)
    if mode == "dir":
        tmp = tempfile.mkdtemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
    else:
        fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=directory)
        os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if mode == "dir":
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomic(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


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
