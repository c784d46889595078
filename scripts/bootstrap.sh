#!/usr/bin/env bash
# Create (or complete) the project virtualenv. Idempotent: each step is skipped once done.
#   bash scripts/bootstrap.sh [VENV_DIR]
# fairseq: PyPI's fairseq 0.12.2 neither builds nor runs on Python 3.11; fairseq-fixed 0.12.3.1 does, but it
# must be installed with --no-deps (it declares torchaudio, which drags in a CUDA torch) and built without
# build isolation (its build needs the installed torch). The built wheel is cached so that later virtualenvs
# take seconds instead of ~9 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
WHEELS=${FAIRSEQ_MOEC_WHEELS:-${XDG_CACHE_HOME:-$HOME/.cache}/fairseq_moec/wheels}
TORCH=torch==2.13.0
FAIRSEQ=fairseq-fixed==0.12.3.1
STAMP=$VENV/.bootstrap-$(cat requirements.txt setup.py scripts/bootstrap.sh | sha1sum | cut -c1-12)

[ -f "$STAMP" ] && exit 0
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip --disable-pip-version-check -q"
echo "[bootstrap] torch, pinned requirements" >&2
$PIP install "$TORCH"
$PIP install -r requirements.txt
if ! "$VENV/bin/python" -c "import fairseq" 2>/dev/null; then
  mkdir -p "$WHEELS"
  if ! ls "$WHEELS"/fairseq_fixed-0.12.3.1-*.whl >/dev/null 2>&1; then
    echo "[bootstrap] building $FAIRSEQ once (about 9 minutes on 2 cores), cached in $WHEELS" >&2
    tmp=$(mktemp -d)
    $PIP wheel --no-deps --no-build-isolation "$FAIRSEQ" -w "$tmp"
    mv "$tmp"/fairseq_fixed-*.whl "$WHEELS"/ && rmdir "$tmp"
  fi
  $PIP install --no-deps "$WHEELS"/fairseq_fixed-0.12.3.1-*.whl
fi
$PIP install --no-deps -e .
"$VENV/bin/python" -c "import torch, fairseq, fairseq_moec; assert torch.__version__.startswith('2.13.0'), torch.__version__"
rm -f "$VENV"/.bootstrap-* && touch "$STAMP"
echo "[bootstrap] ready: $VENV" >&2
