"""Merge an expert-parallel checkpoint into one file, or reshard it for another number of processes.

An expert-parallel run on W processes writes NAME.pt (shared parameters, process 0's experts, training state)
and NAME-expert-rank{r}.pt for r = 1..W-1 (see fairseq_moec/sharded_checkpoint.py). fairseq-generate and
single-process training need one file with every expert:

    python scripts/consolidate_checkpoint.py ckpt/checkpoint_best.pt -o ckpt/checkpoint_best.merged.pt

and a run on W' processes can start from a checkpoint resharded for it (optimizer state included), e.g.

    python scripts/consolidate_checkpoint.py ckpt/checkpoint_last.pt --world-size 4 -o ckpt4/checkpoint_last.pt
    torchrun --nproc_per_node 4 $(which fairseq-train) ... --save-dir ckpt4

(a W'-process run also starts directly from a merged file: each process takes its own experts). A
checkpoint that was never sharded is accepted as input too. The files are written atomically.
"""

import argparse
import os
import sys
import uuid

import fairseq_moec  # noqa: F401  (lets fairseq checkpoints load under torch's weights_only unpickler)
from fairseq_moec import input_checks
from fairseq_moec import sharded_checkpoint as sc

LAYOUT = "moe_expert_layout"  # kept in merged files: what resharding needs (expert keys, optimizer order)


def merged(path: str) -> dict:
    main = input_checks.load_checkpoint_file(path, sc.load)  # an unreadable file: one line (ConfigError)
    meta = main.get("extra_state", {}).get(sc.META)
    if meta is None:
        return main  # already one file with every expert
    shards = [sc.find_shard(path, r, meta["token"]) for r in range(1, meta["world_size"])]
    out = sc.merge(main, shards)
    out["extra_state"][LAYOUT] = {k: meta[k] for k in ("expert_keys", "optimizer_param_names")}
    print(f"merged the experts of {meta['world_size']} processes from {path} (update {meta.get('num_updates')})")
    return out


def layout_of(full: dict) -> dict:
    layout = full["extra_state"].get(LAYOUT)
    if layout is not None:
        return layout
    # a checkpoint written by one process: expert tensors are named ...moe.experts.fcN.i.{weight,bias}; the
    # optimizer's parameter order is not recorded, so its state cannot be split (the run starts it afresh)
    keys = [k for k in full["model"] if ".moe.experts.fc" in k]
    if full.pop("last_optimizer_state", None) is not None:
        print(
            "note: this checkpoint does not record its optimizer's parameter order: the optimizer state is "
            "left out (the resharded run starts a fresh optimizer)"
        )
    return {"expert_keys": keys, "optimizer_param_names": []}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "checkpoint",
        help="NAME.pt of an expert-parallel checkpoint (its NAME-expert-rank*.pt "
        "files beside it), or a single-file checkpoint to reshard",
    )
    parser.add_argument(
        "-o",
        "--output",
        required=True,
        help="file to write (with --world-size > 1: the main file; its -expert-rank*.pt files go beside it)",
    )
    parser.add_argument(
        "--world-size",
        type=int,
        default=1,
        help="number of expert-parallel processes to write the checkpoint for (default 1: one "
        "file with every expert, for fairseq-generate)",
    )
    args = parser.parse_args(argv)
    if not args.output.endswith(".pt"):
        parser.error("--output must end in .pt")
    if args.world_size < 1:
        parser.error("--world-size must be >= 1")
    full = merged(args.checkpoint)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    if args.world_size == 1:
        sc.atomic_save(full, args.output)
        print(f"wrote {args.output}")
        return
    layout = layout_of(full)
    try:
        files = sc.split(full, layout, args.world_size, token=uuid.uuid4().hex)
    except ValueError as e:
        sys.exit(f"error: {e} (--world-size must divide --moe-expert-count)")
    for r in range(1, args.world_size):  # shards first: the main file commits the set
        sc.atomic_save(files[r], sc.shard_path(args.output, r))
    files[0]["extra_state"].pop(LAYOUT, None)
    sc.atomic_save(files[0], args.output)
    print(f"wrote {args.output} and {args.world_size - 1} expert shards for {args.world_size} processes")


if __name__ == "__main__":
    main()
