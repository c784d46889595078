#!/usr/bin/env bash
# Run fairseq-train on several processes with torchrun (docs/scale-out.md explains the set-ups).
#
#   scripts/launch.sh NPROC_PER_NODE <fairseq-train arguments...>
#
# one node, 8 GPUs:  scripts/launch.sh 8 data-bin/wmt14_en_de --user-dir fairseq_moec --task translation_moec ...
# CPU, for testing:  scripts/launch.sh 2 data-bin/... --cpu ...      (adds --distributed-backend gloo)
# several nodes:     on every node: NNODES=4 NODE_RANK=<0..3> MASTER_ADDR=<host of node 0> [MASTER_PORT=29500] \
#                        scripts/launch.sh 8 ...
# SLURM:             srun --nodes 4 --ntasks-per-node 1 scripts/launch.sh 8 ...   (nodes, rank and master from SLURM)
#
# torchrun gives every process RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT, which fairseq reads; the plugin makes
# that work without GPUs too (fairseq_moec/patches/torchrun_cpu.py). If a process dies, torchrun stops the others
# on its node and exits non-zero; run the same command again to resume from checkpoint_last.pt.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ ]]; then
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
nproc=$1
shift
train=$(command -v fairseq-train) || { echo "fairseq-train is not on PATH (activate the virtualenv)" >&2; exit 2; }

extra=()
if [[ " $* " == *" --cpu "* && " $* " != *" --distributed-backend "* ]]; then
    extra+=(--distributed-backend gloo)  # NCCL needs GPUs; gloo does all_reduce and all_to_all on CPU
fi

if [[ -z "${NNODES:-}" && -n "${SLURM_JOB_ID:-}" && "${SLURM_NNODES:-1}" -gt 1 ]]; then
    NNODES=$SLURM_NNODES
    NODE_RANK=$SLURM_NODEID
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi
if [[ "${NNODES:-1}" -gt 1 ]]; then
    : "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1) on every node}"
    : "${MASTER_ADDR:?set MASTER_ADDR to the host name of node 0}"
    dist=(--nnodes "$NNODES" --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "${MASTER_PORT:-29500}")
else
    dist=(--standalone)  # one node: torchrun picks a free port itself
fi

exec "${TORCHRUN:-torchrun}" "${dist[@]}" --nproc_per_node "$nproc" "$train" "$@" \
    ${extra[@]+"${extra[@]}"}
