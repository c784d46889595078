"""Line reading, atomic outputs and the stamps of resumable steps.

A step that can be interrupted writes its outputs under temporary names, renames them when they are complete, and
writes its stamp last: a stamp holding the key of the step's inputs means "done with these inputs".
"""

import contextlib
import gzip
import json
import lzma
import os
import shutil
from pathlib import Path

COMPRESSED = {".xz": lzma.open, ".gz": gzip.open}
BUNDLED_CORPUS = Path(__file__).resolve().parents[2] / "data" / "bible-es-en"  # Spanish-English, .xz files


class PipelineError(Exception):
    """Bad input or a failed step: the command-line tools print it as one line, without a traceback."""


def read_lines(path):
    """The lines of PATH (or of PATH.xz / PATH.gz when only a compressed copy exists), split on '\\n' only: a
    stray '\\r' or U+2028 inside a sentence must not split it and misalign a parallel corpus."""
    path = Path(path)
    if not path.exists():
        for ext, opener in COMPRESSED.items():
            if Path(str(path) + ext).exists():
                with opener(str(path) + ext, "rt", encoding="utf-8", newline="\n") as f:
                    return _split(f.read())
    with open(path, encoding="utf-8", newline="\n") as f:
        return _split(f.read())


def _split(text):
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return lines


@contextlib.contextmanager
def atomic_path(path, mode="file"):
    """Yield a temporary path next to PATH (an empty file, or with mode="dir" an empty directory) for the caller
    to fill; on success rename it to PATH, on any error remove it. Same directory, so the rename is atomic."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    _remove(tmp)  # a leftover of an interrupted process with the same id
    if mode == "dir":
        os.mkdir(tmp)
    else:
        open(tmp, "w").close()
    try:
        yield tmp
        if mode == "dir":
            _remove(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


def write_text_atomic(path, text):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def write_lines_atomic(path, lines):
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for line in lines:
                f.write(line + "\n")


def write_json_atomic(path, obj, indent=1):
    write_text_atomic(path, json.dumps(obj, indent=indent) + "\n")


def stamp_matches(path, key):
    """True when the step's stamp PATH exists and was written for KEY (see ``write_stamp``)."""
    try:
        return json.loads(Path(path).read_text())["key"] == key
    except (OSError, ValueError, KeyError, TypeError):
        return False


def write_stamp(path, key, **extra):
    """Mark a step done for inputs KEY (any JSON value); EXTRA: more entries of the stamp (e.g. line counts)."""
    write_text_atomic(path, json.dumps({"key": key, **extra}) + "\n")
