#!/usr/bin/env bash
# Train one experiment: fairseq-hydra-train on its config, with update_freq set for this machine's GPUs.
#
#   scripts/train.sh CONFIG [--gpus N] [--tokens-per-update N] [--dry-run] [HYDRA_OVERRIDES...]
#
#   CONFIG                 an experiment, e.g. moec64_big (or its file configs/wmt14_en_de/moec64_big.yaml)
#   --gpus N               GPUs per run (default: CUDA_VISIBLE_DEVICES / nvidia-smi; 1 with common.cpu=true)
#   --tokens-per-update N  the batch to aim at (default 524288, the paper's): optimization.update_freq is set to
#                          N / (GPUs x dataset.max_tokens), unless you pass optimization.update_freq=[K] yourself
#   --dry-run              print the command and exit
# Everything else is a hydra override for fairseq-hydra-train: task.data=DIR, dataset.max_tokens=2048,
# precision=fp32, +model.encoder_layers=4 (a model option the config does not set), ... The command is printed
# and appended to SAVE_DIR/train_commands.log; rerunning it resumes from SAVE_DIR/checkpoint_last.pt.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
PY=${PYTHON:-python}
die() { echo "error: $*" >&2; exit 2; }
usage() { sed -n '2,14p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  usage
  [[ $# -ge 1 ]] && exit 0 || exit 2
fi
CONFIG=$1; shift
DRY_RUN=0 GPUS=() TOKENS=() OVERRIDES=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) DRY_RUN=1; shift ;;
    --gpus|--tokens-per-update) [[ $# -ge 2 ]] || die "$1 needs a value"
      if [[ $1 == --gpus ]]; then GPUS=(--gpus "$2"); else TOKENS=(--tokens-per-update "$2"); fi
      shift 2 ;;
    --) shift; OVERRIDES+=("$@"); break ;;
    --*) die "unknown option: $1 (train.sh's: --gpus, --tokens-per-update, --dry-run; then hydra overrides)" ;;
    *) OVERRIDES+=("$1"); shift ;;
  esac
done
# The plugin by absolute path, so that the command works from any directory (the config's path is relative).
EXTRA=("common.user_dir=$REPO/fairseq_moec")
for o in "${OVERRIDES[@]}"; do [[ $o == common.user_dir=* ]] && EXTRA=(); done
# hydra composes the config (with the overrides); the helper prints where it is, task.data, checkpoint.save_dir
# and the update_freq for the GPU count (empty when the overrides set it).
mapfile -t PLAN < <("$PY" "$HERE/wmt/hydra_config.py" plan "$CONFIG" "${GPUS[@]}" "${TOKENS[@]}" \
                    -- "${EXTRA[@]}" "${OVERRIDES[@]}" || echo failed)
[[ ${#PLAN[@]} == 5 ]] || exit 2  # the helper said why
CONFIG_DIR=${PLAN[0]} CONFIG_NAME=${PLAN[1]} DATA=${PLAN[2]} SAVE_DIR=${PLAN[3]}
[[ -n ${PLAN[4]} ]] && EXTRA+=("optimization.update_freq=[${PLAN[4]}]")

CMD=(fairseq-hydra-train --config-dir "$CONFIG_DIR" --config-name "$CONFIG_NAME" "${EXTRA[@]}" "${OVERRIDES[@]}")
PRINTED=$(printf '%q ' "${CMD[@]}")
echo "[train] ${PRINTED% }" >&2
[[ $DRY_RUN == 1 ]] && exit 0

[[ -d $DATA ]] || die "data directory not found: $DATA (run scripts/prepare-wmt14en2de.sh, or pass task.data=DIR)"
ls "$DATA"/dict.*.txt >/dev/null 2>&1 \
  || die "$DATA has no fairseq dictionary (dict.*.txt): not a fairseq-preprocess output"
command -v fairseq-hydra-train >/dev/null || die "fairseq-hydra-train not found on PATH (activate the virtualenv)"
mkdir -p "$SAVE_DIR"
{
  commit=$(git -C "$HERE" rev-parse --short HEAD 2>/dev/null || echo unknown)
  echo "# $(date '+%Y-%m-%d %H:%M:%S') config=$CONFIG commit=$commit"
  echo "${PRINTED% }"
} >> "$SAVE_DIR/train_commands.log"
exec "${CMD[@]}"
