"""The files of an expert-parallel checkpoint, and merging / splitting them (plain torch, no fairseq import).

A run on W processes writes, for each checkpoint name fairseq picks (checkpoint_last.pt, checkpoint_3_800.pt,
checkpoint_best.pt, ...):

    NAME.pt                 process 0: fairseq's usual checkpoint (shared parameters, the experts of process 0,
                            optimizer and training state) plus ``extra_state["moe_expert_parallel"]`` (META)
    NAME-expert-rank{r}.pt  process r = 1 .. W-1: its experts and their optimizer state

Every file of one save carries the same random ``token``, so a loader never pairs files of different saves.
Writes are atomic (temporary file + rename); a shard file being replaced is kept as ``*.prev`` until the next
save, and the shards are written before the main file, which commits the save. A run killed at any point
therefore leaves, for the main file on disk, a matching shard of every process (``find_shard`` looks there).

Expert tensors keep their names; their first dimension indexes the experts a process holds (contiguous
blocks: process r holds experts r*E/W .. (r+1)*E/W - 1), so merging is a concatenation in process order.
"""

import glob
import logging
import os
import re
import shutil
from typing import Dict, List, Optional

import torch

logger = logging.getLogger(__name__)

META = "moe_expert_parallel"


def shard_suffix(rank: int) -> str:
    return f"-expert-rank{rank}"


def shard_path(main_path: str, rank: int) -> str:
    assert main_path.endswith(".pt"), main_path
    return main_path[: -len(".pt")] + shard_suffix(rank) + ".pt"


def main_path_of(path: str, rank: int) -> str:
    """The main file of a shard name (a main name is returned unchanged)."""
    return re.sub(re.escape(shard_suffix(rank)) + r"\.pt$", ".pt", path) if rank > 0 else path


def main_suffix(suffix: str) -> str:
    """fairseq's checkpoint suffix of a process without its shard suffix: the suffix of the main file."""
    return re.sub(r"-expert-rank\d+$", "", suffix)


def is_shard_path(path: str) -> bool:
    return re.search(r"-expert-rank\d+\.pt$", path) is not None


def _replace(tmp: str, path: str) -> None:
    if is_shard_path(path) and os.path.exists(path):
        os.replace(path, path + ".prev")  # the main file on disk may still need it (see the module docstring)
    os.replace(tmp, path)


def _write_then_replace(tmp: str, path: str, write) -> None:
    try:
        write()
    except BaseException:  # a full disk, an interrupt: no partial file stays behind (the old ``path`` is untouched)
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _replace(tmp, path)


def atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"

    def write():
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())

    _write_then_replace(tmp, path, write)


def atomic_copy(src: str, dst: str) -> None:
    tmp = dst + ".tmp"

    def write():
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())

    _write_then_replace(tmp, dst, write)


def load(path: str, mmap: bool = False) -> dict:
    # fairseq checkpoints hold a few non-tensor globals: fairseq_moec/patches/checkpoint_allowlist.py allows them
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def find_shard(main_path: str, rank: int, token: str) -> dict:
    """The shard of process ``rank`` written with the main file of ``token``: normally NAME-expert-rank{r}.pt;
    after an interrupted save it may be the kept ``.prev`` or the file the save wrote first (fairseq copies
    that file to checkpoint_last.pt etc.); it is then put back in place."""
    paired = shard_path(main_path, rank)
    pattern = os.path.join(glob.escape(os.path.dirname(paired) or "."), "*" + shard_suffix(rank) + ".pt")
    looked: List[str] = []
    for path in [paired, paired + ".prev"] + sorted(glob.glob(pattern)) + sorted(glob.glob(pattern + ".prev")):
        if path in looked or not os.path.isfile(path):
            continue
        looked.append(path)
        try:
            shard = load(path, mmap=True)
        except Exception:  # noqa: BLE001  (an unreadable file is simply not the one we look for)
            continue
        if shard.get(META, {}).get("token") == token:
            if path != paired:
                logger.warning(
                    f"{paired} was not written by the save of {main_path} (interrupted save?): "
                    f"using {path} and restoring it in place"
                )
                shard = load(path)
                if path.endswith(".prev"):
                    os.replace(path, paired)
                else:
                    atomic_copy(path, paired)
            return shard
    raise FileNotFoundError(
        f"no expert shard of process {rank} belongs to {main_path} (save token {token}); looked at: "
        f"{', '.join(looked) or 'nothing'}. Copy all of {os.path.basename(main_path)[:-3]}*-expert-rank*.pt "
        f"along with the main file, or restart from another checkpoint with --restore-file"
    )


def merge(main: dict, shards: List[dict]) -> dict:
    """One single-process checkpoint from the main file and the shards of processes 1..W-1 (in order)."""
    meta = main["extra_state"][META]
    keys, names = meta["expert_keys"], meta["optimizer_param_names"]
    out = dict(main, extra_state={k: v for k, v in main["extra_state"].items() if k != META})
    out["model"] = dict(main["model"])
    local = {k: main["model"][k].shape[0] for k in keys}
    for k in keys:
        out["model"][k] = torch.cat([main["model"][k]] + [s["model"][k] for s in shards])
    opt = main.get("last_optimizer_state")
    if opt is not None:
        if any(s.get("optimizer") is None for s in shards):
            raise ValueError("the main file has optimizer state but a shard has none")
        state = dict(opt["state"])
        for i, name in enumerate(names):
            if name in local and i in state:
                state[i] = {
                    f: torch.cat([v] + [s["optimizer"][name][f] for s in shards]) if _per_expert(v, local[name]) else v
                    for f, v in state[i].items()
                }
        out["last_optimizer_state"] = dict(opt, state=state)
    return out


def split(full: dict, meta: dict, world_size: int, token: str) -> List[dict]:
    """The files of a ``world_size``-process checkpoint from a single-process one: [main, shard 1, ...].
    ``meta`` supplies ``expert_keys`` and ``optimizer_param_names``."""
    keys, names = meta["expert_keys"], meta["optimizer_param_names"]
    for k in keys:
        if full["model"][k].shape[0] % world_size:
            raise ValueError(
                f"{k} holds {full['model'][k].shape[0]} experts: cannot split them over {world_size} processes"
            )
    total = {k: full["model"][k].shape[0] for k in keys}

    def block(t: torch.Tensor, E: int, r: int) -> torch.Tensor:
        n = E // world_size
        return t[r * n : (r + 1) * n].clone()

    opt = full.get("last_optimizer_state")
    index = {name: i for i, name in enumerate(names)}
    files = []
    num_updates = meta.get("num_updates", (full.get("optimizer_history") or [{}])[-1].get("num_updates"))
    for r in range(world_size):
        rmeta = dict(meta, token=token, world_size=world_size, rank=r, num_updates=num_updates)
        model = {k: block(full["model"][k], total[k], r) for k in keys}
        opt_r = None
        if opt is not None:
            opt_r = {
                k: {
                    f: block(v, total[k], r) if _per_expert(v, total[k]) else v
                    for f, v in opt["state"][index[k]].items()
                }
                for k in keys
                if index.get(k) in opt["state"]
            }
        if r == 0:
            main = dict(
                full, model=dict(full["model"], **model), extra_state=dict(full["extra_state"], **{META: rmeta})
            )
            if opt is not None:
                state = dict(opt["state"])
                state.update({index[k]: v for k, v in opt_r.items()})
                main["last_optimizer_state"] = dict(opt, state=state)
            files.append(main)
        else:
            files.append({META: rmeta, "model": model, "optimizer": opt_r})
    return files


def _per_expert(value, num_experts: int) -> bool:
    """Optimizer state entries shaped like the parameter (Adam's moments) split with it; scalars (step) do not."""
    return torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == num_experts


def expert_meta(
    expert_keys: List[str],
    optimizer_param_names: Optional[List[str]],
    token: str,
    world_size: int,
    rank: int,
    num_updates: int,
) -> Dict:
    return {
        "token": token,
        "world_size": world_size,
        "rank": rank,
        "num_updates": num_updates,
        "expert_keys": list(expert_keys),
        "optimizer_param_names": list(optimizer_param_names or []),
    }
