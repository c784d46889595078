#!/usr/bin/env bash
# The GPU measurements of the WMT recipe's expert path, as one script for one lent H100/H200-class GPU (about
# 5-6 minutes, at most 9.5; each step has its own time limit, and a failed step does not stop the next):
#   1. recipe_check.py: precision and saved memory of the expert path choices (bf16 grouped, fp16 loop, fp16 cast
#      to bf16) against fp64 on the fused kernel; host synchronisations per forward+backward of the recipe's MoE
#      layer (E=64, 8 clusters, cluster dropout, cosine router, 3 sublayers, d 1024) in bf16 and fp16, with and
#      without padding                                                                 -> recipe_check_cuda.json
#   2. bench_layer.py in bf16 (the recipe's dtype) at E=64: time and memory of the layer against the dense FFN,
#      T=4096 d=512 with the sync count, then T=16384 at Transformer-big sizes   -> layer_cuda_E64{,_big}.json
#   3. bench_e2e.py --device cuda --precision bf16: fairseq-train words/s and fairseq-generate sentences/s of a
#      small MoEC (64 experts, 8 clusters) against the dense model of the same active size -> e2e_cuda.json
# Everything printed also goes to gpu_check.log (5 files in all: the device tool returns at most 8).
#
#   bash benchmarks/gpu_prepare.sh               # first, where PyPI is reachable: fills .gpu_pkgs/
#   bash benchmarks/gpu_check.sh OUT_DIR         # on the GPU machine, with .gpu_pkgs carried along
#   bash benchmarks/gpu_check.sh --smoke OUT_DIR # on a CPU: every step at smoke sizes (checks the script only)
# The GPU image has python3 with torch but not fairseq, and no network: fairseq runs from its source distribution
# in .gpu_pkgs (only its three small C/Cython extensions are built, under a minute) with the wheels of its
# missing needs, all installed under $WORK, outside the system's site-packages. Peers are left out (measured
# before; see benchmarks/README.md). Override the interpreter with PYTHON=...
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
if [ "${1:-}" = "--smoke" ]; then SMOKE=1; shift; fi
OUT=$(mkdir -p "${1:-benchmarks/results}" && cd "${1:-benchmarks/results}" && pwd)
WORK=${GPU_CHECK_WORK:-${TMPDIR:-/tmp}/gpu_check}
PKGS=$PWD/.gpu_pkgs
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the benchmarks import fairseq_moec from this checkout
if [ $SMOKE = 1 ]; then
    PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo "$PWD/.venv/bin/python" || echo python3 )}
    DEV=cpu
else
    PY=${PYTHON:-python3}
    DEV=cuda
fi
export PYTHONUNBUFFERED=1
LOG=$OUT/gpu_check.log
: > "$LOG"
FAILED=()
say() { echo "[gpu_check $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log everything, remember failures
    local name=$1 limit=$2; shift 2
    say "$name: $*"
    timeout "$limit" "$@" 2>&1 | grep --line-buffered -v "FutureWarning\|custom_bwd\|custom_fwd" | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { FAILED+=("$name (exit $rc)"); say "$name FAILED (exit $rc; 124 = over its ${limit}s)"; }
}

say "smoke=$SMOKE device=$DEV out=$OUT work=$WORK git=$(git rev-parse --short HEAD 2>/dev/null)" \
    "dirty=$(git status --porcelain --untracked-files=no 2>/dev/null | wc -l)"
$PY - <<'PY' 2>&1 | tee -a "$LOG"
import sys
import torch
gpu = torch.cuda.is_available()
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, gpu,
      torch.cuda.get_device_name() if gpu else "-", torch.cuda.get_device_capability() if gpu else "-",
      "grouped_mm", hasattr(torch, "_grouped_mm"))
PY
[ $SMOKE = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader \
    2>&1 | tee -a "$LOG"

# 1. precision, memory and host synchronisations of the recipe's expert path
if [ $SMOKE = 1 ]; then
    step recipe_check 300 $PY benchmarks/recipe_check.py --quick --out "$OUT/recipe_check_cpu.json"
else
    step recipe_check 90 $PY benchmarks/recipe_check.py --device cuda --out "$OUT/recipe_check_cuda.json"
fi

# 2. the layer against dense at E=64 in bf16
if [ $SMOKE = 1 ]; then
    step layer 300 $PY benchmarks/bench_layer.py --quick --dtype bf16 --no-peers --out "$OUT/layer_cpu_quick.json"
else
    step layer 90 $PY benchmarks/bench_layer.py --device cuda --dtype bf16 --experts 64 --no-peers --sync-check \
        --out "$OUT/layer_cuda_E64.json"
    step layer_big 90 $PY benchmarks/bench_layer.py --device cuda --dtype bf16 --experts 64 --no-peers \
        --tokens 16384 --dim 1024 --ffn 4096 --no-floors --out "$OUT/layer_cuda_E64_big.json"
fi

# 3. fairseq from its sources, then end to end
install_fairseq() {
    local src=$WORK/fairseq-src site=$WORK/site bin=$WORK/bin
    [ -f "$PKGS"/fairseq_fixed-0.12.3.1.tar.gz ] || { echo "no $PKGS: run benchmarks/gpu_prepare.sh first"; return 1; }
    rm -rf "$src" "$site" "$bin" && mkdir -p "$src" "$site" "$bin" || return 1
    if [ $SMOKE = 0 ]; then  # the wheels are for the GPU image's Python (3.12); the smoke run has its own
        $PY -m pip install -q --no-index --no-deps --no-compile --target "$site" "$PKGS"/*.whl || return 1
    fi
    tar xzf "$PKGS"/fairseq_fixed-0.12.3.1.tar.gz -C "$src" --strip-components 1 || return 1
    (cd "$src" && $PY - <<'PY') || return 1
import numpy
from Cython.Build import cythonize
from setuptools import Extension, setup

# fairseq's setup.py would also build its torch C++/CUDA extensions (NAT and BASE layers, minutes): not needed
args = ["-std=c++11", "-O3"]
exts = [Extension("fairseq.libbleu", ["fairseq/clib/libbleu/libbleu.cpp", "fairseq/clib/libbleu/module.cpp"],
                  extra_compile_args=args)]
exts += cythonize([Extension(name, [f"fairseq/data/{name.split('.')[-1]}.pyx"], include_dirs=[numpy.get_include()],
                             language="c++", extra_compile_args=args)
                   for name in ("fairseq.data.data_utils_fast", "fairseq.data.token_block_utils_fast")],
                  language_level=3, quiet=True)
setup(name="fairseq-extensions", ext_modules=exts, script_args=["-q", "build_ext", "--inplace", "-j", "8"])
PY
    for cmd in train generate preprocess; do  # the console scripts pip would have made
        printf '#!/bin/sh\nexec %s -m fairseq_cli.%s "$@"\n' "$PY" "$cmd" > "$bin/fairseq-$cmd"
        chmod +x "$bin/fairseq-$cmd"
    done
    export PYTHONPATH="$src:$site${PYTHONPATH:+:$PYTHONPATH}" PATH="$bin:$PATH"
    $PY -c "import fairseq, fairseq_cli.train, fairseq.data.data_utils_fast, fairseq.libbleu; print('fairseq', \
fairseq.__version__, 'from', fairseq.__file__)"
}
say "fairseq: from $PKGS into $WORK"
install_fairseq > >(tee -a "$LOG") 2>&1 || { FAILED+=("fairseq install"); say "fairseq install FAILED"; }
if [[ ! " ${FAILED[*]} " =~ "fairseq install" ]]; then
    if [ $SMOKE = 1 ]; then
        step e2e 900 $PY benchmarks/bench_e2e.py --quick --device cpu --precision bf16 --work "$WORK/e2e" \
            --threads 1 --out "$OUT/e2e_cpu_quick.json"
    else
        step e2e 270 $PY benchmarks/bench_e2e.py --device cuda --precision bf16 --work "$WORK/e2e" --threads 8 \
            --updates 200 --log-interval 10 --out "$OUT/e2e_cuda.json"
    fi
fi

if [ ${#FAILED[@]} = 0 ]; then say "all steps done"; else say "failed: ${FAILED[*]}"; fi
ls -l "$OUT" | tee -a "$LOG"
[ ${#FAILED[@]} = 0 ]
