#!/usr/bin/env bash
# Fetch, on a machine with PyPI, what benchmarks/gpu_check.sh needs on a GPU machine that has python3 + torch but
# no fairseq and no network: fairseq-fixed's source distribution (gpu_check.sh builds its three small C/Cython
# extensions there) and wheels of fairseq's needs that such an image lacks, for CPython 3.12 on x86-64 Linux
# (override with GPU_PYTHON_VERSION). Writes .gpu_pkgs/ (about 11 MB, kept out of git) and prints its files.
#   bash benchmarks/gpu_prepare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.gpu_pkgs
PYV=${GPU_PYTHON_VERSION:-3.12}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
PIP="$PY -m pip --disable-pip-version-check -q"
grep -qxF "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude
mkdir -p "$DEST"
# the source distribution; --no-build-isolation: reading its metadata imports torch, found in this environment
$PIP download --no-deps --no-build-isolation --no-binary :all: fairseq-fixed==0.12.3.1 -d "$DEST"
# fairseq's runtime needs missing from the GPU image (its other needs, numpy, regex, sacrebleu, tqdm, cython,
# sentencepiece, are there); versions as in requirements.txt
$PIP download --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DEST" hydra-core==1.3.2 omegaconf==2.3.0 bitarray==3.12.3
# omegaconf's parser is published as a source archive only: made into a (pure-Python) wheel here, so that the GPU
# machine installs wheels alone
$PIP wheel --no-deps antlr4-python3-runtime==4.9.3 -w "$DEST"
ls -l "$DEST"
