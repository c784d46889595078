"""What a measurement ran on: the machine, its load, and the exact code (git commit, and whether the tree differed
from it). Every benchmark JSON carries this, so that a figure can be traced to the code that produced it."""

import datetime
import os
import platform
import subprocess
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]  # the repository this package runs from
ENV_KEYS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "THP_MEM_ALLOC_ENABLE",
    "LD_PRELOAD",
    "MALLOC_MMAP_MAX_",
    "MALLOC_TRIM_THRESHOLD_",
    "CUDA_VISIBLE_DEVICES",
)


def _git(root, *args):
    try:
        r = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.returncode == 0 else None


def git_commit(root=CHECKOUT):
    """The full commit hash of HEAD, or None outside a git checkout."""
    out = _git(root, "rev-parse", "HEAD")
    return out.strip() if out else None


def git_changes(root=CHECKOUT, *paths):
    """`git status --porcelain` lines (under PATHS if given): uncommitted changes and untracked files; None
    outside a git checkout."""
    out = _git(root, "status", "--porcelain", *(["--", *paths] if paths else []))
    return None if out is None else [line for line in out.splitlines() if line]


def code_info(root=CHECKOUT):
    """{'git_commit', 'git_dirty', 'git_changes'}: the code behind a result. Dirty = `git status --porcelain` is
    not empty, so the commit alone does not reproduce the result (the first 50 changed paths are listed)."""
    changes = git_changes(root)
    return {
        "git_commit": git_commit(root),
        "git_dirty": None if changes is None else bool(changes),
        "git_changes": None if changes is None else changes[:50],
    }


def loadavg():
    try:
        return os.getloadavg()
    except OSError:
        return None


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return platform.processor() or None


def machine_info(device="cpu", threads=None, root=CHECKOUT):
    """The machine and code of a benchmark run; call ``finish`` at the end for the load then and the wall time."""
    import torch

    info = {
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads or torch.get_num_threads(),
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "loadavg_at_start": loadavg(),
        "env": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
        "device": str(device),
        **code_info(root),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def finish(info, t_start):
    """Add the load average at the end and the elapsed seconds since T_START (time.time()) to INFO."""
    import time

    info["loadavg_at_end"] = loadavg()
    info["elapsed_s"] = round(time.time() - t_start)
    return info
