#!/usr/bin/env bash
# Install the MoE peers that benchmarks/bench_layer.py compares against, without touching torch.
#   bash benchmarks/install_peers.sh [VENV_DIR]      (default .venv)
#
# Why not `pip install .[bench]`: torchscale 0.3.0 declares `fairscale==0.4.0` (conflicts with the
# fairscale==0.4.13 we pin) and `timm==0.6.13`, and timm pulls torchvision, which pulls a (CUDA) torch
# build of its own, replacing the CPU torch 2.13.0. The modules we use need nothing but torch:
#   fairscale.nn.moe (MOELayer, Top2Gate)              -> torch (numpy, already present)
#   torchscale.component.xmoe (MOELayer, Top1/Top2Gate) -> torch (tries `fairseq.modules.moe`, absent in
#                                                         fairseq 0.12: falls back to nn.Module)
# So both are installed with --no-deps. `pip check` then reports the unmet (unused) timm/fairscale==0.4.0
# declarations of torchscale: expected. torchscale's wheel also installs a top-level `examples` package.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PY="$VENV/bin/python"
before=$("$PY" -c 'import torch; print(torch.__version__)')
"$PY" -m pip --disable-pip-version-check -q install --no-deps "fairscale==0.4.13" "torchscale==0.3.0"
"$PY" - <<'PY'
import warnings
warnings.filterwarnings("ignore")
import torch
from fairscale.nn.moe import MOELayer, Top2Gate  # noqa: F401
from torchscale.component.xmoe.moe_layer import MOELayer as XMoE  # noqa: F401
from torchscale.component.xmoe.routing import Top1Gate, Top2Gate as XTop2Gate  # noqa: F401
print("[install_peers] fairscale + torchscale import fine with torch", torch.__version__)
PY
after=$("$PY" -c 'import torch; print(torch.__version__)')
[ "$before" = "$after" ] || { echo "[install_peers] torch changed: $before -> $after" >&2; exit 1; }
