#!/usr/bin/env bash
# The paper's WMT'14 en-de comparison: dense Transformer, plain MoE and MoEC at 16/32/64 experts.
#
#   scripts/reproduce_table.sh [--run] [--sizes "big base"] [--experts "16 32 64"] [--gpus N] [--out FILE]
#                              [--dry-run] [-- extra scripts/train.sh arguments, e.g. hydra overrides]
#
# Without --run: collect the results that exist and write the markdown table (default
# checkpoints/wmt14_en_de/results.md, relative to the current directory like the configs' --save-dir); a run
# without results is shown as "not run". With --run: first train (scripts/train.sh) and evaluate
# (scripts/evaluate.sh) every experiment that has no results yet, one after the other; a run that fails is
# reported and left "not run", the others go on. --dry-run prints the commands instead of running them.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
PY=${PYTHON:-python}
die() { echo "error: $*" >&2; exit 2; }

RUN=0 DRY=0 SIZES="big base" EXPERTS="16 32 64" GPUS="" OUT=checkpoints/wmt14_en_de/results.md TRAIN_EXTRA=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --run) RUN=1; shift ;;
    --dry-run) DRY=1; shift ;;
    --sizes|--experts|--gpus|--out)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      case $1 in --sizes) SIZES=$2 ;; --experts) EXPERTS=$2 ;; --gpus) GPUS=$2 ;; --out) OUT=$2 ;; esac
      shift 2 ;;
    -h|--help) sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) shift; TRAIN_EXTRA=("$@"); break ;;
    *) die "unknown option: $1 (see -h)" ;;
  esac
done

CONFIGS=()
for size in $SIZES; do
  [[ $size == big || $size == base ]] || die "--sizes: expected big and/or base, got '$size'"
  CONFIGS+=("dense_$size")
  for e in $EXPERTS; do
    [[ $e == 16 || $e == 32 || $e == 64 ]] || die "--experts: configs exist for 16, 32 and 64 experts, got '$e'"
    CONFIGS+=("moe${e}_$size" "moec${e}_$size")
  done
done
for c in "${CONFIGS[@]}"; do
  [[ -f $REPO/configs/wmt14_en_de/$c.yaml ]] || die "config not found: $REPO/configs/wmt14_en_de/$c.yaml"
done

FAILED=()
if [[ $RUN == 1 ]]; then
  GPU_ARGS=()
  [[ -n $GPUS ]] && GPU_ARGS=(--gpus "$GPUS")
  # every experiment's checkpoint.save_dir, composed by hydra in one go
  mapfile -t SAVE_DIRS < <("$PY" "$HERE/wmt/hydra_config.py" get "${CONFIGS[@]}" --key checkpoint.save_dir \
                           || echo failed)
  [[ ${#SAVE_DIRS[@]} == "${#CONFIGS[@]}" ]] || exit 2  # hydra_config.py said why
  for i in "${!CONFIGS[@]}"; do
    c=${CONFIGS[i]} save_dir=${SAVE_DIRS[i]}
    if [[ -f $save_dir/eval-test/results.json ]]; then
      echo "[reproduce] $c: results exist, skipping ($save_dir/eval-test/results.json)" >&2
      continue
    fi
    train=(bash "$HERE/train.sh" "$c" "${GPU_ARGS[@]}" "${TRAIN_EXTRA[@]}")
    evaluate=(bash "$HERE/evaluate.sh" --config "$c")
    if [[ $DRY == 1 ]]; then
      printf '%q ' "${train[@]}"; echo; printf '%q ' "${evaluate[@]}"; echo
      continue
    fi
    echo "[reproduce] $c: training" >&2
    if "${train[@]}" && "${evaluate[@]}"; then
      echo "[reproduce] $c: done" >&2
    else
      echo "[reproduce] $c: FAILED (see the log above); it stays 'not run'" >&2
      FAILED+=("$c")
    fi
  done
fi
[[ $DRY == 1 ]] && exit 0

"$PY" "$HERE/wmt/table.py" --out "$OUT" ${GPUS:+--gpus "$GPUS"} "${CONFIGS[@]}"
if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "error: ${#FAILED[@]} run(s) failed: ${FAILED[*]}" >&2
  exit 1
fi
