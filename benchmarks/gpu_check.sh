#!/usr/bin/env bash
# The GPU check of benchmarks/README.md in one go: the layer benchmark in bf16 (our layer then runs its experts
# with torch._grouped_mm) at T=4096 with the peers and the host-synchronisation count, then at T=32768 without
# the peers (their one-hot [T, E, C] dispatch grows with T^2).
#   bash benchmarks/gpu_check.sh [OUT_DIR]          (default benchmarks/results)
# Uses the machine's python3 and torch (nothing is installed). The peers are pure Python: put copies of the
# fairscale and torchscale packages in .peers/ (see benchmarks/README.md) to include them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-benchmarks/results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
[ -d .peers ] && export PYTHONPATH="$PWD/.peers${PYTHONPATH:+:$PYTHONPATH}"
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available(),
torch.cuda.get_device_name() if torch.cuda.is_available() else "-", "grouped_mm", hasattr(torch, "_grouped_mm"))'
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader || true
$PY benchmarks/bench_layer.py --device cuda --dtype bf16 --sync-check --out "$OUT/layer_cuda.json" 2>&1 \
    | grep -v "FutureWarning\|custom_bwd\|custom_fwd" | tee "$OUT/layer_cuda.log"
$PY benchmarks/bench_layer.py --device cuda --dtype bf16 --tokens 32768 --no-peers --experts 8,64,128 \
    --out "$OUT/layer_cuda_T32768.json" 2>&1 | grep -v "FutureWarning\|custom_bwd\|custom_fwd" \
    | tee "$OUT/layer_cuda_T32768.log"
