"""Inputs that fairseq would silently misuse or fail on without naming the file: the checks, as plain functions.

* Starting from scratch next to checkpoints. fairseq resumes from SAVE_DIR/checkpoint_last.pt; when that file is
  missing (deleted, lost), it trains from scratch in the same directory and its first validation overwrites
  checkpoint_best.pt with a worse model. We refuse to start when the save dir holds checkpoint*.pt files but
  no checkpoint_last.pt, and when --restore-file names a file that does not exist (fairseq starts from scratch
  then too), and say how to resume. Fresh runs in an empty save dir, --no-save, --finetune-from-model and
  --continue-once are left alone.
* Unreadable checkpoints. A zero-byte or truncated file makes torch.load fail with a bare EOFError or a zip
  reader error that names no file (fairseq-train, -generate, -interactive): we name the file and the newest
  intact checkpoint next to it.
* Empty data. An empty split binarizes to a zero-byte .bin file, which fairseq fails to load with "cannot mmap
  an empty file": we name the file.

fairseq calls them through three patches (patches/fresh_start.py, unreadable_checkpoint.py, empty_data.py).
Errors are ConfigError: the commands print them as one line (patches/one_line_errors.py).
"""

import glob
import os
from typing import List, Optional

from .modules.config import ConfigError
from .sharded_checkpoint import is_shard_path

DEFAULT_RESTORE_FILE = "checkpoint_last.pt"  # fairseq's default: "resume from SAVE_DIR/checkpoint_last.pt"


# ------------------------------------------------------------------------------------------------ checkpoints
def checkpoint_files(save_dir: str) -> List[str]:
    """The checkpoint*.pt files of a directory (expert-parallel shards included), newest first."""
    files = [p for p in glob.glob(os.path.join(glob.escape(save_dir), "checkpoint*.pt")) if os.path.isfile(p)]
    return sorted(files, key=os.path.getmtime, reverse=True)


def newest_intact_checkpoint(directory: str, besides: str = "") -> Optional[str]:
    """The newest non-empty main checkpoint file of ``directory`` other than ``besides``, or None."""
    for path in checkpoint_files(directory):
        if not is_shard_path(path) and os.path.getsize(path) > 0 and not _same_file(path, besides):
            return path
    return None


def _same_file(a: str, b: str) -> bool:
    return bool(b) and os.path.abspath(a) == os.path.abspath(b)


def refuse_start_from_scratch(cfg, suffix: str = "") -> None:
    """Raise ConfigError when fairseq-train, given its checkpoint config ``cfg``, would start from scratch
    although there are checkpoints it should resume from. ``suffix``: fairseq's checkpoint suffix."""
    if cfg.finetune_from_model or getattr(cfg, "continue_once", None):
        return
    if cfg.restore_file != DEFAULT_RESTORE_FILE:
        path = cfg.restore_file.replace(".pt", suffix + ".pt")
        if not os.path.isfile(path):
            raise ConfigError(
                f"--restore-file {cfg.restore_file}: no such file ({os.path.abspath(path)}); "
                f"fairseq would start from scratch"
            )
        return
    if cfg.no_save:  # nothing will be overwritten
        return
    last = os.path.join(cfg.save_dir, f"checkpoint_last{suffix}.pt")
    found = checkpoint_files(cfg.save_dir)
    if os.path.exists(last) or not found:
        return
    names = ", ".join(os.path.basename(p) for p in found[:3]) + (", ..." if len(found) > 3 else "")
    newest = newest_intact_checkpoint(cfg.save_dir)
    resume = (
        f"To continue from the newest, add --restore-file {newest} to this run only (later runs resume "
        f"from the checkpoint_last.pt it writes), or copy it to {last}."
        if newest
        else "None of them is an intact checkpoint (all are empty or expert shards)."
    )
    raise ConfigError(
        f"--save-dir {cfg.save_dir}: holds {len(found)} checkpoint file(s) ({names}) but no "
        f"{os.path.basename(last)}, so fairseq would start from scratch and overwrite them "
        f"(checkpoint_best.pt at the first validation). {resume} To start a new run, use "
        f"another --save-dir."
    )


def unreadable_checkpoint(path: str, why: str) -> ConfigError:
    """The error for a checkpoint ``path`` that torch.load cannot read (``why``)."""
    newest = newest_intact_checkpoint(os.path.dirname(path) or ".", besides=path)
    other = (
        f"the newest intact checkpoint next to it is {newest} (fairseq-train: --restore-file {newest}; "
        f"fairseq-generate/-interactive: --path {newest})"
        if newest
        else "there is no intact checkpoint next to it"
    )
    return ConfigError(
        f"{path}: {why}, not a readable checkpoint (a save cut short, e.g. by a full disk). Delete it; {other}"
    )


# ------------------------------------------------------------------------------------------------------ data
def refuse_empty_data(path: str, combine: bool = False) -> None:
    """Raise ConfigError if a binarized dataset ``path`` (e.g. data-bin/train.es-en.es; with ``combine`` also
    its shards path1, path2, ...) has a zero-byte .bin file."""
    k = 0
    while True:
        path_k = path + (str(k) if k > 0 else "")
        bin_file = path_k + ".bin"
        if not os.path.isfile(bin_file):
            return
        if os.path.getsize(bin_file) == 0:
            split = os.path.basename(path).split(".")[0]
            raise ConfigError(
                f"{bin_file}: empty data file (no sentences): the '{split}' split was binarized "
                f"from an empty text file. Re-run fairseq-preprocess with its data "
                f"(--trainpref/--validpref/--testpref), or use another data directory"
            )
        if not combine:
            return
        k += 1
