#!/usr/bin/env bash
# Train one experiment from its config: scripts/train.sh CONFIG [options] [fairseq-train args...]
#
#   CONFIG         a flag file, e.g. configs/wmt14_en_de/moec64_big.flags (or just moec64_big)
#   --gpus N       GPUs per run, for deriving --update-freq from the config's tokens per update
#                  (default: CUDA_VISIBLE_DEVICES / nvidia-smi; 1 with --cpu)
#   --data DIR     data directory instead of the config's @data (or set DATA=DIR)
#   --unset FLAG   drop a flag that the config sets, e.g. --unset --fp16 for a CPU run (repeatable)
#   --dry-run      print the fairseq-train command and exit
# Every other argument goes to fairseq-train and overrides the config's value of the same flag. The exact
# command is printed and appended to SAVE_DIR/train_commands.log; rerunning the same command resumes from
# SAVE_DIR/checkpoint_last.pt (fairseq's default).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=${PYTHON:-python}
die() { echo "error: $*" >&2; exit 2; }

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  [[ $# -ge 1 ]] && exit 0 || exit 2
fi
CONFIG=$1; shift
DRY_RUN=0 PASS=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) DRY_RUN=1; shift ;;
    --gpus|--data|--unset) [[ $# -ge 2 ]] || die "$1 needs a value"; PASS+=("$1" "$2"); shift 2 ;;
    --) shift; break ;;
    *) break ;;
  esac
done

# flagfile.py resolves includes and overrides and prints the arguments NUL-separated (data directory first).
RESOLVED=$(mktemp)
trap 'rm -f "$RESOLVED"' EXIT
"$PY" "$HERE/wmt/flagfile.py" argv "$CONFIG" "${PASS[@]}" -- "$@" > "$RESOLVED" || exit $?
mapfile -d '' ARGS < "$RESOLVED"
DATA=${ARGS[0]}
ARGS=("${ARGS[@]:1}")
CMD=(fairseq-train "$DATA" "${ARGS[@]}")
PRINTED=$(printf '%q ' "${CMD[@]}")
echo "[train] ${PRINTED% }" >&2
[[ $DRY_RUN == 1 ]] && exit 0

[[ -d $DATA ]] || die "data directory not found: $DATA (run scripts/prepare-wmt14en2de.sh, or pass --data DIR)"
ls "$DATA"/dict.*.txt >/dev/null 2>&1 || die "$DATA has no fairseq dictionary (dict.*.txt): not a fairseq-preprocess output"
command -v fairseq-train >/dev/null || die "fairseq-train not found on PATH (activate the virtualenv)"
SAVE_DIR=checkpoints
for ((i = 0; i < ${#ARGS[@]}; i++)); do
  [[ ${ARGS[i]} == --save-dir ]] && SAVE_DIR=${ARGS[i + 1]}
done
mkdir -p "$SAVE_DIR"
{
  echo "# $(date '+%Y-%m-%d %H:%M:%S') config=$CONFIG commit=$(git -C "$HERE" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "${PRINTED% }"
} >> "$SAVE_DIR/train_commands.log"
rm -f "$RESOLVED"
trap - EXIT
exec "${CMD[@]}"
