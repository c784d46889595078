"""Average the parameters of the last N fairseq checkpoints (fairseq's own script is not in its pip wheel).

    average_checkpoints.py --dir CKPT_DIR --last N [--by updates|epochs] --output OUT.pt
    average_checkpoints.py --inputs A.pt B.pt ... --output OUT.pt

--by updates picks checkpoint_<epoch>_<updates>.pt (written with --save-interval-updates), --by epochs picks
checkpoint<epoch>.pt. A checkpoint of an expert-parallel run (experts sharded over W processes in
NAME-expert-rank{r}.pt files) is first merged into one with all experts. Floating-point tensors are averaged in
fp32 (or fp64) and cast back; other tensors (e.g. the cluster-dropout mask and its period, which are state, not
weights) are taken from the newest checkpoint.
The output is the newest checkpoint with the averaged model and without the optimizer state (generation does
not need it; it is the bulk of the file). Checkpoints are read with torch's weights_only loader, which the
fairseq_moec plugin extends with exactly the globals fairseq checkpoints need.
"""

import argparse
import os
import re
from typing import List

from wmt_common import atomic_path, die, log, main_guard


def allow_fairseq_checkpoint_globals() -> None:
    """The plugin's allowlist for torch's weights_only loader (installed when the plugin is imported)."""
    import fairseq_moec  # noqa: F401


EXPERT_PARALLEL_META = "moe_expert_parallel"  # extra_state key of an expert-parallel (sharded) checkpoint


def consolidate(path: str, state: dict) -> dict:
    """A checkpoint written by W expert-parallel processes holds only process 0's experts; the others are in
    NAME-expert-rank{r}.pt. Merge them (with the plugin's sharded_checkpoint module) so that the average has
    every expert. The optimizer state is dropped first: it is not needed and would double the memory."""
    meta = (state.get("extra_state") or {}).get(EXPERT_PARALLEL_META)
    if not meta:
        return state
    world, token = int(meta.get("world_size", 1)), meta.get("token")
    from fairseq_moec import sharded_checkpoint as sc

    shards = []
    for r in range(1, world):
        shard_file = sc.shard_path(path, r)
        if not os.path.isfile(shard_file):
            die(
                f"{path} was written by {world} expert-parallel processes, but the experts of process {r} "
                f"({shard_file}) are missing: copy all of its *-expert-rank*.pt files along with it"
            )
        shard = load_state(shard_file, sc.load)
        if shard.get(EXPERT_PARALLEL_META, {}).get("token") != token:
            die(
                f"{shard_file} does not belong to {path} (written by another save): cannot average a "
                f"checkpoint whose expert shards are inconsistent"
            )
        shard.pop("optimizer", None)
        shards.append(shard)
    state.pop("last_optimizer_state", None)
    log(f"[average] {os.path.basename(path)}: merged the experts of {world} processes")
    return sc.merge(state, shards)


def find_checkpoints(directory: str, last: int, by: str) -> List[str]:
    if not os.path.isdir(directory):
        die(f"checkpoint directory not found: {directory}")
    pattern = re.compile(r"^checkpoint_(\d+)_(\d+)\.pt$" if by == "updates" else r"^checkpoint(\d+)\.pt$")
    found = []
    for name in os.listdir(directory):
        m = pattern.match(name)
        if m:
            found.append((int(m.group(m.lastindex)), os.path.join(directory, name)))
    if not found:
        hint = (
            "checkpoint_<epoch>_<updates>.pt files: train with --save-interval-updates, or use --by epochs"
            if by == "updates"
            else "checkpoint<epoch>.pt files: did training use --no-epoch-checkpoints?"
        )
        die(f"no {hint} in {directory}")
    found.sort()
    chosen = [p for _, p in found[-last:]]
    if len(chosen) < last:
        log(f"[average] only {len(chosen)} checkpoint(s) available, averaging those (asked for {last})")
    return chosen


def load_state(path: str, load=None):
    import torch

    from fairseq_moec.input_checks import load_checkpoint_file
    from fairseq_moec.modules.config import ConfigError

    if not os.path.isfile(path):
        die(f"checkpoint not found: {path}")
    try:  # the plugin's line for an unreadable file (truncated, corrupt, a pickled global the allowlist refuses)
        return load_checkpoint_file(path, load or (lambda p: torch.load(p, map_location="cpu")))
    except ConfigError as e:
        die(str(e))


def average(paths: List[str]):
    import torch

    sums, newest = None, None
    paths = [str(p) for p in paths]
    for i, path in enumerate(paths):
        state = consolidate(path, load_state(path))
        model = state.get("model")
        if not isinstance(model, dict) or not model:
            die(f"{path} has no model parameters: not a fairseq checkpoint")
        if sums is None:
            sums = {
                k: (
                    v.to(torch.float64 if v.dtype == torch.float64 else torch.float32).clone()
                    if v.is_floating_point()
                    else None
                )
                for k, v in model.items()
            }
            dtypes = {k: v.dtype for k, v in model.items()}
            shapes = {k: v.shape for k, v in model.items()}
        else:
            if set(model) != set(sums):
                extra, missing = sorted(set(model) - set(sums)), sorted(set(sums) - set(model))
                die(
                    f"{path} does not have the parameters of {paths[0]} (extra: {extra[:3]}, missing: "
                    f"{missing[:3]}): checkpoints of different models cannot be averaged"
                )
            for k, v in model.items():
                if v.shape != shapes[k]:
                    die(f"{path}: {k} has shape {tuple(v.shape)}, not {tuple(shapes[k])} as in {paths[0]}")
                if sums[k] is not None:
                    sums[k] += v.to(sums[k].dtype)
        newest = state
        log(f"[average] {i + 1}/{len(paths)} {path}")
    n = len(paths)
    averaged = {}
    for k, v in newest["model"].items():
        averaged[k] = (sums[k] / n).to(dtypes[k]) if sums[k] is not None else v
    newest["model"] = averaged
    newest.pop("last_optimizer_state", None)
    if isinstance(newest.get("extra_state"), dict):
        newest["extra_state"]["averaged_checkpoints"] = [os.path.basename(p) for p in paths]
    return newest


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--inputs", nargs="+", help="checkpoint files")
    src.add_argument("--dir", help="checkpoint directory: average its last --last checkpoints")
    ap.add_argument("--last", type=int, default=5)
    ap.add_argument("--by", choices=("updates", "epochs"), default="updates")
    ap.add_argument("--output", required=True)
    args = ap.parse_args()
    if args.last < 1:
        die(f"--last must be >= 1, got {args.last}")
    paths = args.inputs if args.inputs else find_checkpoints(args.dir, args.last, args.by)
    allow_fairseq_checkpoint_globals()
    import torch

    state = average(paths)
    with atomic_path(args.output) as tmp:
        torch.save(state, tmp)
    log(f"[average] wrote {args.output} (mean of {len(paths)} checkpoints)")


if __name__ == "__main__":
    main_guard(main)
