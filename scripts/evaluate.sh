#!/usr/bin/env bash
# Evaluate a trained model on newstest2014: average the last checkpoints, translate with beam search, score.
#
#   scripts/evaluate.sh --config CONFIG [options] [-- fairseq-generate args]
#   scripts/evaluate.sh --checkpoint-dir DIR --data DATA [options] [-- fairseq-generate args]
#
#   --config CONFIG        take the data and checkpoint directories from an experiment config
#   --checkpoint-dir DIR   average the last --avg checkpoints of DIR (checkpoint_<epoch>_<updates>.pt)
#   --checkpoint FILE      translate with this one checkpoint instead (no averaging)
#   --data DIR             fairseq data directory made by prepare-wmt14en2de.sh
#   --avg N                checkpoints to average (default 5); --avg-by updates|epochs (default updates)
#   --beam N               beam size (default 5, the paper's); --lenpen X length penalty (default 0.6)
#   --batch-size N         sentences per batch (default 128); --max-tokens N to batch by tokens instead
#   --subset NAME          data subset (default test); --ref FILE raw reference (default DATA/test.raw.de)
#   --spm FILE             sentencepiece model (default DATA/spm.model)
#   --out DIR              results directory (default CHECKPOINT_DIR/eval-SUBSET)
# Arguments after -- go to fairseq-generate (e.g. --cpu, --fp16). Writes OUT/generate-SUBSET.txt,
# OUT/hyps.detok.txt, OUT/results.json and OUT/results.txt (each complete or absent) and prints both BLEUs.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
PY=${PYTHON:-python}
die() { echo "evaluate.sh: error: $*" >&2; exit 2; }
usage() { sed -n '2,18p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

CONFIG="" CKPT_DIR="" CKPT="" DATA="" AVG=5 AVG_BY=updates BEAM=5 LENPEN=0.6 BATCH=128 MAX_TOKENS=""
SUBSET=test REF="" SPM="" OUT="" SRC=en TGT=de EXTRA=()
while [[ $# -gt 0 ]]; do
  case $1 in
    --config|--checkpoint-dir|--checkpoint|--data|--avg|--avg-by|--beam|--lenpen|--batch-size|--max-tokens|--subset|--ref|--spm|--out|--src|--tgt)
      [[ $# -ge 2 ]] || die "$1 needs a value"
      case $1 in
        --config) CONFIG=$2 ;; --checkpoint-dir) CKPT_DIR=$2 ;; --checkpoint) CKPT=$2 ;; --data) DATA=$2 ;;
        --avg) AVG=$2 ;; --avg-by) AVG_BY=$2 ;; --beam) BEAM=$2 ;; --lenpen) LENPEN=$2 ;;
        --batch-size) BATCH=$2 ;; --max-tokens) MAX_TOKENS=$2 ;; --subset) SUBSET=$2 ;; --ref) REF=$2 ;;
        --spm) SPM=$2 ;; --out) OUT=$2 ;; --src) SRC=$2 ;; --tgt) TGT=$2 ;;
      esac
      shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) usage >&2; die "unknown option: $1 (fairseq-generate arguments go after --)" ;;
  esac
done
# numbers are checked before the (slow) averaging and model loading
for opt in --avg:$AVG --beam:$BEAM --batch-size:$BATCH ${MAX_TOKENS:+--max-tokens:$MAX_TOKENS}; do
  [[ ${opt#*:} =~ ^[1-9][0-9]{0,8}$ ]] || die "${opt%%:*} must be a positive integer, got '${opt#*:}'"
done
[[ $LENPEN =~ ^-?([0-9]+\.?[0-9]*|\.[0-9]+)$ ]] || die "--lenpen must be a number (e.g. 0.6), got '$LENPEN'"
[[ $AVG_BY == updates || $AVG_BY == epochs ]] || die "--avg-by must be updates or epochs, got '$AVG_BY'"

if [[ -n $CONFIG ]]; then  # the experiment's hydra config, composed by hydra
  mapfile -t FROM_CONFIG < <("$PY" "$HERE/wmt/hydra_config.py" get "$CONFIG" --key task.data \
                                 --key checkpoint.save_dir || echo failed)
  [[ ${#FROM_CONFIG[@]} == 2 ]] || exit 2  # hydra_config.py said why
  [[ -n $DATA ]] || DATA=${FROM_CONFIG[0]}
  [[ -n $CKPT_DIR || -n $CKPT ]] || CKPT_DIR=${FROM_CONFIG[1]}
fi
[[ -n $DATA ]] || die "no data directory: pass --data DIR or --config CONFIG"
[[ -n $CKPT_DIR || -n $CKPT ]] || die "nothing to evaluate: pass --checkpoint-dir DIR, --checkpoint FILE or --config CONFIG"
[[ -d $DATA ]] || die "data directory not found: $DATA"
ls "$DATA"/dict.*.txt >/dev/null 2>&1 || die "$DATA has no fairseq dictionary (dict.*.txt): not a fairseq-preprocess output"
[[ -e $DATA/$SUBSET.$SRC-$TGT.$SRC.idx || -e $DATA/$SUBSET.$TGT-$SRC.$SRC.idx ]] || die "$DATA has no binarized '$SUBSET' subset for $SRC-$TGT"
if [[ -z $REF ]]; then
  [[ $SUBSET == test ]] || die "--ref FILE is required for --subset $SUBSET"
  REF=$DATA/test.raw.$TGT
fi
SPM=${SPM:-$DATA/spm.model}
[[ -s $REF ]] || die "reference missing or empty: $REF"
[[ -s $SPM ]] || die "sentencepiece model missing or empty: $SPM"
if [[ -n $CKPT ]]; then
  [[ -s $CKPT ]] || die "checkpoint missing or empty: $CKPT"
  OUT=${OUT:-$(dirname "$CKPT")/eval-$SUBSET}
else
  [[ -d $CKPT_DIR ]] || die "checkpoint directory not found: $CKPT_DIR (not trained yet?)"
  OUT=${OUT:-$CKPT_DIR/eval-$SUBSET}
fi
command -v fairseq-generate >/dev/null || die "fairseq-generate not found on PATH (activate the virtualenv)"
mkdir -p "$OUT"
# A failed evaluation must not leave the previous run's numbers looking current.
rm -f "$OUT/results.json" "$OUT/results.txt" "$OUT/hyps.detok.txt" "$OUT/generate-$SUBSET.txt"

AVERAGED=""
if [[ -z $CKPT ]]; then
  CKPT=$OUT/checkpoint.avg$AVG-$AVG_BY.pt
  echo "[evaluate] averaging the last $AVG checkpoints ($AVG_BY) of $CKPT_DIR" >&2
  "$PY" "$HERE/wmt/average_checkpoints.py" --dir "$CKPT_DIR" --last "$AVG" --by "$AVG_BY" --output "$CKPT"
  AVERAGED="$AVG ($AVG_BY)"
fi

BATCHING=(--batch-size "$BATCH")
[[ -n $MAX_TOKENS ]] && BATCHING=(--max-tokens "$MAX_TOKENS")
# --required-batch-size-multiple 1: fairseq-fixed drops a last batch that is not a multiple of 8 otherwise.
GEN=(fairseq-generate "$DATA" --user-dir "$REPO/fairseq_moec" --task translation_moec --path "$CKPT"
     --gen-subset "$SUBSET" --source-lang "$SRC" --target-lang "$TGT" --beam "$BEAM" --lenpen "$LENPEN"
     --nbest 1 "${BATCHING[@]}" --required-batch-size-multiple 1 "${EXTRA[@]}")
GEN_PRINTED=$(printf '%q ' "${GEN[@]}")
echo "[evaluate] ${GEN_PRINTED% }" >&2
GEN_OUT=$OUT/generate-$SUBSET.txt
"${GEN[@]}" > "$GEN_OUT.incomplete" || { rm -f "$GEN_OUT.incomplete"; die "fairseq-generate failed (see above)"; }
mv "$GEN_OUT.incomplete" "$GEN_OUT"

"$PY" "$HERE/wmt/score.py" --generate "$GEN_OUT" --ref "$REF" --spm "$SPM" --lang "$TGT" --out-dir "$OUT" \
  --meta "checkpoint=$CKPT" --meta "checkpoints_averaged=${AVERAGED:-no}" --meta "beam=$BEAM" \
  --meta "lenpen=$LENPEN" --meta "subset=$SUBSET" --meta "data=$DATA" --meta "config=${CONFIG:-}" \
  --meta "generate_command=${GEN_PRINTED% }"
