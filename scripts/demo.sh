#!/usr/bin/env bash
# The demo: train and evaluate a small MoEC Transformer (Spanish -> English) on the bundled Bible corpus, on CPU,
# with no download. One command (`make demo`, or `bash scripts/demo.sh` with the project venv on PATH).
# The same pipeline trains on your own parallel text, any language pair:
#   DEMO_CORPUS=DIR DEMO_SRC=de DEMO_TGT=fr bash scripts/demo.sh   (DIR holds {train,valid,test}.{de,fr}[.xz|.gz])
#
# Steps (each one writes under temporary names and writes its stamp file last, so a finished step is skipped by
# the next run and an interrupted one is redone; training resumes from checkpoint_last.pt). Stamps: the data steps
# in $DEMO_DIR/stamps/, the model steps in $DEMO_DIR/model-<hash of the training settings>/stamps/.
#   corpus      decompress the corpus to $DEMO_DIR/corpus and check it (aligned, no empty line, sha256)
#   spm         joint sentencepiece unigram model (DEMO_VOCAB pieces) on train.SRC + train.TGT
#   encode      sentencepiece-encode every split
#   preprocess  fairseq-preprocess --source-lang SRC --target-lang TGT --joined-dictionary
#   train       fairseq-train, a fixed number of updates (DEMO_UPDATES)
#   generate    fairseq-generate on EVERY test line (fails unless #hypotheses == #test lines), spm-decode, reorder
#   score       sacrebleu BLEU (tokenizer: sacrebleu's for the target language, 13a for most) and chrF with
#               signatures -> results.txt / results.json
#
# Settings (environment variables; defaults in brackets):
#   DEMO_CORPUS [data/bible-es-en]: files {train,valid,test}.{SRC,TGT}, each plain, .xz or .gz, aligned line by
#               line; optional {train,valid,test}.ref (unique ids) and SHA256SUMS (sha256sum format)
#   DEMO_SRC [es]  DEMO_TGT [en]   language codes: the corpus' file suffixes (letters, digits, '_')
#   DEMO_DIR [work/demo for es-en, work/demo-SRC-TGT otherwise; relative to the project root]
#   DEMO_BLEU_TOKENIZE [""]  a sacrebleu tokenizer for BLEU instead of the target language's default
#   DEMO_UPDATES [1100]  DEMO_LR [2e-3]  DEMO_WARMUP [150]  DEMO_SCHEDULE [linear: warmup, then linear decay to 0 at
#               DEMO_UPDATES | inverse_sqrt]  DEMO_DROPOUT [0.1]
#   DEMO_MAX_TOKENS [6000]  DEMO_LAYERS [3]  DEMO_DIM [256]  DEMO_FFN [1024]  DEMO_HEADS [4]  DEMO_VOCAB [8000]
#   DEMO_EXPERTS [8]  DEMO_CLUSTERS [2]  DEMO_CLUSTER_DROPOUT [0.5]  DEMO_DROPOUT_INTERVAL [the plugin's, 250]
#   DEMO_MOE_ENCODER_LAYERS [1]  DEMO_MOE_DECODER_LAYERS [1]  DEMO_SEED [1]
#   DEMO_BEAM [4]  DEMO_GEN_BATCH [128]  DEMO_SAVE_INTERVAL [300] (updates between checkpoints and validations)
#   DEMO_TRAIN_ARGS [""]   extra fairseq-train arguments, appended as is
#   DEMO_GEN_ARGS [""]     extra fairseq-generate arguments, appended as is (e.g. "--max-len-b 20" for a smoke test)
#   DEMO_STOP_AFTER [""]   stop after this step (corpus, spm, encode, preprocess, train, generate)
# The model directory is named after a hash of the training settings, so changing one trains a new model next to
# the old one instead of mixing checkpoints.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

die() { echo "demo.sh: error: $*" >&2; exit 1; }
log() { echo "[demo] $*" >&2; }

if ! command -v fairseq-train >/dev/null 2>&1 && [ -x "$ROOT/.venv/bin/fairseq-train" ]; then
  PATH="$ROOT/.venv/bin:$PATH"
fi
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3
TOOLS="$ROOT/scripts/demo_tools.py"

# DEMO_PROFILE=long (until 2026-12) trained longer with early stopping; the schedule now decays to the end of
# DEMO_UPDATES, so a longer run is DEMO_UPDATES alone
[ -z "${DEMO_PROFILE:-}" ] || die "DEMO_PROFILE was removed: the learning rate decays to 0 at DEMO_UPDATES, so to \
train longer raise DEMO_UPDATES (e.g. DEMO_UPDATES=3000)"
SRC=${DEMO_SRC:-es}
TGT=${DEMO_TGT:-en}
CORPUS=${DEMO_CORPUS:-data/bible-es-en}
if [ "$SRC-$TGT" = es-en ]; then D_DIR=work/demo; else D_DIR=work/demo-$SRC-$TGT; fi
DIR=${DEMO_DIR:-$D_DIR}
BLEU_TOKENIZE=${DEMO_BLEU_TOKENIZE:-}
UPDATES=${DEMO_UPDATES:-1100}
LR=${DEMO_LR:-2e-3}
WARMUP=${DEMO_WARMUP:-150}
SCHEDULE=${DEMO_SCHEDULE:-linear}
DROPOUT=${DEMO_DROPOUT:-0.1}
MAX_TOKENS=${DEMO_MAX_TOKENS:-6000}
LAYERS=${DEMO_LAYERS:-3}
DIM=${DEMO_DIM:-256}
FFN=${DEMO_FFN:-1024}
HEADS=${DEMO_HEADS:-4}
VOCAB=${DEMO_VOCAB:-8000}
EXPERTS=${DEMO_EXPERTS:-8}
CLUSTERS=${DEMO_CLUSTERS:-2}
CDROP=${DEMO_CLUSTER_DROPOUT:-0.5}
CDROP_INTERVAL=${DEMO_DROPOUT_INTERVAL:-}  # unset: the plugin's default
MOE_ENC=${DEMO_MOE_ENCODER_LAYERS:-1}
MOE_DEC=${DEMO_MOE_DECODER_LAYERS:-1}
SEED=${DEMO_SEED:-1}
BEAM=${DEMO_BEAM:-4}
GEN_BATCH=${DEMO_GEN_BATCH:-128}
SAVE_INTERVAL=${DEMO_SAVE_INTERVAL:-300}
EXTRA_TRAIN_ARGS=${DEMO_TRAIN_ARGS:-}
EXTRA_GEN_ARGS=${DEMO_GEN_ARGS:-}
STOP_AFTER=${DEMO_STOP_AFTER:-}
case "$STOP_AFTER" in
  ""|corpus|spm|encode|preprocess|train|generate) ;;
  *) die "DEMO_STOP_AFTER: unknown step '$STOP_AFTER' (corpus, spm, encode, preprocess, train or generate)" ;;
esac

# --- every setting is checked here, before any work -----------------------------------------------------------
int_setting() {  # int_setting VAR VALUE MIN
  [[ $2 =~ ^[0-9]+$ ]] && [ "${#2}" -le 9 ] && [ "$2" -ge "$3" ] \
    || die "$1 must be an integer >= $3 (at most 9 digits), got '$2'"
}
for v in UPDATES:$UPDATES MAX_TOKENS:$MAX_TOKENS LAYERS:$LAYERS DIM:$DIM FFN:$FFN HEADS:$HEADS VOCAB:$VOCAB \
         EXPERTS:$EXPERTS CLUSTERS:$CLUSTERS BEAM:$BEAM GEN_BATCH:$GEN_BATCH \
         SAVE_INTERVAL:$SAVE_INTERVAL; do
  int_setting "DEMO_${v%%:*}" "${v#*:}" 1
done
[ -z "$CDROP_INTERVAL" ] || int_setting DEMO_DROPOUT_INTERVAL "$CDROP_INTERVAL" 1
int_setting DEMO_WARMUP "$WARMUP" 0
case "$SCHEDULE" in
  linear|inverse_sqrt) ;;
  *) die "DEMO_SCHEDULE must be 'linear' (warmup, then linear decay to 0 at DEMO_UPDATES) or 'inverse_sqrt', \
got '$SCHEDULE'" ;;
esac
[ "$SCHEDULE" != linear ] || [ "$WARMUP" -lt "$UPDATES" ] \
  || die "DEMO_WARMUP=$WARMUP must be below DEMO_UPDATES=$UPDATES with DEMO_SCHEDULE=linear (the rate would never decay)"
int_setting DEMO_SEED "$SEED" 0
prob_setting() {  # prob_setting VAR VALUE: a number in [0, 1)
  [[ $2 =~ ^(0(\.[0-9]*)?|\.[0-9]+)$ ]] || die "$1 must be a number in [0, 1), got '$2'"
}
prob_setting DEMO_DROPOUT "$DROPOUT"
prob_setting DEMO_CLUSTER_DROPOUT "$CDROP"
[[ $LR =~ ^([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$ ]] && [[ ! $LR =~ ^[0.]+([eE].*)?$ ]] \
  || die "DEMO_LR must be a positive number (e.g. 2e-3), got '$LR'"
"$PY" "$TOOLS" check-langs --src "$SRC" --tgt "$TGT" ${BLEU_TOKENIZE:+--tokenize "$BLEU_TOKENIZE"} || exit 1
# sentencepiece and fairseq-preprocess split file lists on ',', fairseq splits data and checkpoint paths on ':'
case "$DIR" in /*) ABS_DIR=$DIR ;; *) ABS_DIR=$ROOT/$DIR ;; esac
case "$ABS_DIR" in
  *,*|*:*|*$'\n'*) die "the demo directory '$ABS_DIR' (DEMO_DIR) contains ',', ':' or a newline, which fairseq \
and sentencepiece read as list separators: choose a path without them" ;;
esac
[ -d "$CORPUS" ] || die "corpus directory $CORPUS not found (DEMO_CORPUS)"
# the key of the corpus step; also fails here, before any work, when a corpus file is missing
KEY_CORPUS=$("$PY" "$TOOLS" corpus-key "$CORPUS" --src "$SRC" --tgt "$TGT") || exit 1

mkdir -p "$DIR/stamps"
DIR=$(cd "$DIR" && pwd)
STAMPS="$DIR/stamps"
# one demo at a time per directory (two fairseq-train runs must not share checkpoints)
if command -v flock >/dev/null 2>&1; then
  exec 9>"$DIR/lock"
  flock -n 9 || die "another demo is running in $DIR (lock $DIR/lock); wait for it or set DEMO_DIR"
fi
hash() { sha1sum | cut -c1-12; }

# --- stamp logic: a step is done iff its stamp exists and holds the key of the inputs it was made from ---
is_done() { [ -f "$STAMPS/$1.done" ] && [ "$(cat "$STAMPS/$1.done")" = "$2" ]; }
mark_done() { printf '%s\n' "$2" > "$STAMPS/$1.done.tmp" && mv -f "$STAMPS/$1.done.tmp" "$STAMPS/$1.done"; }
T_START=$(date +%s)
LOAD_START=$(cut -d" " -f1-3 /proc/loadavg 2>/dev/null || echo "?")
CURRENT_STEP=""
on_exit() {
  local rc=$?
  if [ "$rc" -ne 0 ] && [ -n "$CURRENT_STEP" ]; then
    echo "demo.sh: error: step $CURRENT_STEP failed (exit $rc); it is not marked done: fix the cause and rerun" >&2
  fi
}
trap on_exit EXIT
TIMES=()
STEP_NO=0
N_STEPS=7
# run_step NAME KEY FUNCTION: skip if done, else run FUNCTION and stamp; print wall time.
run_step() {
  local name=$1 key=$2 fn=$3 t0
  STEP_NO=$((STEP_NO + 1))
  if is_done "$name" "$key"; then
    log "step $STEP_NO/$N_STEPS $name: already done (stamp $STAMPS/$name.done), skipping"
    TIMES+=("$name skipped")
  else
    rm -f "$STAMPS/$name.done"
    log "step $STEP_NO/$N_STEPS $name: running"
    t0=$(date +%s)
    CURRENT_STEP=$name
    "$fn"
    mark_done "$name" "$key"
    CURRENT_STEP=""
    local dt=$(( $(date +%s) - t0 ))
    log "step $STEP_NO/$N_STEPS $name: done in ${dt}s"
    TIMES+=("$name ${dt}s")
  fi
  if [ "$STOP_AFTER" = "$name" ]; then
    log "stopping after step $name (DEMO_STOP_AFTER)"
    exit 0
  fi
}

SPLITS="train valid test"

# --- 1. corpus -------------------------------------------------------------------------------------------
do_corpus() {
  rm -rf "$DIR/corpus" "$DIR/corpus.tmp"
  "$PY" "$TOOLS" prepare-corpus "$CORPUS" "$DIR/corpus.tmp" --src "$SRC" --tgt "$TGT" \
    || die "the corpus in $CORPUS is not usable (see above)"
  mv "$DIR/corpus.tmp" "$DIR/corpus"
}
run_step corpus "$KEY_CORPUS" do_corpus

# --- 2. sentencepiece model -----------------------------------------------------------------------------
KEY_SPM=$(echo "$KEY_CORPUS spm unigram $VOCAB" | hash)
do_spm() {
  rm -rf "$DIR/spm" "$DIR/spm.tmp"
  mkdir -p "$DIR/spm.tmp"
  log "training a joint $VOCAB-piece unigram sentencepiece model on train.$SRC + train.$TGT"
  "$PY" "$TOOLS" spm-train "$DIR/spm.tmp/spm" "$VOCAB" "$DIR/corpus/train.$SRC" "$DIR/corpus/train.$TGT"
  mv "$DIR/spm.tmp" "$DIR/spm"
}
run_step spm "$KEY_SPM" do_spm

# --- 3. encode ------------------------------------------------------------------------------------------
KEY_ENC=$(echo "$KEY_SPM encode" | hash)
do_encode() {
  rm -rf "$DIR/tok" "$DIR/tok.tmp"
  mkdir -p "$DIR/tok.tmp"
  local pairs=()
  for s in $SPLITS; do for l in "$SRC" "$TGT"; do pairs+=("$DIR/corpus/$s.$l" "$DIR/tok.tmp/$s.$l"); done; done
  "$PY" "$TOOLS" spm-encode "$DIR/spm/spm.model" "${pairs[@]}"
  mv "$DIR/tok.tmp" "$DIR/tok"
}
run_step encode "$KEY_ENC" do_encode

# --- 4. binarise ----------------------------------------------------------------------------------------
KEY_BIN=$(echo "$KEY_ENC preprocess joined" | hash)
do_preprocess() {
  rm -rf "$DIR/bin" "$DIR/bin.tmp"
  "$PY" "$TOOLS" preprocess "$DIR/tok" "$DIR/bin.tmp" --src "$SRC" --tgt "$TGT"
  mv "$DIR/bin.tmp" "$DIR/bin"
}
run_step preprocess "$KEY_BIN" do_preprocess

# --- 5. train -------------------------------------------------------------------------------------------
case "$SCHEDULE" in
  # warmup, then linear decay to 0 at the last update: a short run ends at a low rate instead of mid-descent
  linear) SCHEDULE_ARGS=(--lr-scheduler polynomial_decay --power 1 --end-learning-rate 0
                         --total-num-update "$UPDATES") ;;
  inverse_sqrt) SCHEDULE_ARGS=(--lr-scheduler inverse_sqrt --warmup-init-lr 1e-07) ;;
esac
TRAIN_ARGS=(
  --user-dir "$ROOT/fairseq_moec" --task translation_moec --source-lang "$SRC" --target-lang "$TGT"
  --arch moec_transformer --share-all-embeddings
  --encoder-layers "$LAYERS" --decoder-layers "$LAYERS" --encoder-embed-dim "$DIM" --decoder-embed-dim "$DIM"
  --encoder-ffn-embed-dim "$FFN" --decoder-ffn-embed-dim "$FFN"
  --encoder-attention-heads "$HEADS" --decoder-attention-heads "$HEADS" --dropout "$DROPOUT"
  --moe-encoder-layers "$MOE_ENC" --moe-decoder-layers "$MOE_DEC" --moe-expert-count "$EXPERTS"
  --moe-clusters "$CLUSTERS" --cluster-dropout "$CDROP" ${CDROP_INTERVAL:+--cluster-dropout-interval "$CDROP_INTERVAL"}
  --criterion moec_label_smoothed_cross_entropy --label-smoothing 0.1
  --optimizer torch_adam --adam-betas "(0.9, 0.98)" --lr "$LR" --warmup-updates "$WARMUP" "${SCHEDULE_ARGS[@]}"
  --max-tokens "$MAX_TOKENS" --max-update "$UPDATES" --seed "$SEED" --cpu --num-workers 0
  --save-interval-updates "$SAVE_INTERVAL" --keep-interval-updates 1 --no-epoch-checkpoints
  # validation (995 sentences, a few seconds) at the interval checkpoints and at the end, for the log
  --validate-interval-updates "$SAVE_INTERVAL" --validate-interval 1000
)
CKPT=checkpoint_last.pt
# shellcheck disable=SC2206
[ -n "$EXTRA_TRAIN_ARGS" ] && TRAIN_ARGS+=($EXTRA_TRAIN_ARGS)
# the key leaves out the arguments that name the checkout (--user-dir), so a moved checkout keeps its models
KEY_TRAIN=$( { echo "$KEY_BIN"
              for a in "${TRAIN_ARGS[@]}"; do [[ $a == "$ROOT"* ]] || printf '%s\n' "$a"; done; } | hash)
MODEL="$DIR/model-$KEY_TRAIN"
mkdir -p "$MODEL/stamps"
STAMPS="$MODEL/stamps"  # train, generate and score are stamped per model: switching settings back and forth reuses them
do_train() {
  mkdir -p "$MODEL/checkpoints"
  if [ -f "$MODEL/checkpoints/$CKPT" ] && grep -q "done training" "$MODEL/train.log" 2>/dev/null; then
    # finished, but interrupted before the stamp: fairseq would train one more update on restart
    log "training had finished already ($MODEL/train.log says 'done training'); not restarting it"
    return 0
  fi
  if [ -f "$MODEL/checkpoints/checkpoint_last.pt" ]; then
    log "resuming from $MODEL/checkpoints/checkpoint_last.pt"
  fi
  log "fairseq-train: $UPDATES updates of $MAX_TOKENS tokens on CPU; log in $MODEL/train.log"
  printf '%q ' fairseq-train "$DIR/bin" "${TRAIN_ARGS[@]}" --save-dir "$MODEL/checkpoints" > "$MODEL/train.cmd"
  # glibc: keep freed gradient buffers in the heap instead of page-faulting them in again every update (faster
  # on CPU, benchmarks/README.md)
  MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 fairseq-train "$DIR/bin" "${TRAIN_ARGS[@]}" \
    --save-dir "$MODEL/checkpoints" --log-format simple --log-interval 10 2>&1 | tee -a "$MODEL/train.log" >&2
  [ -f "$MODEL/checkpoints/$CKPT" ] || die "training finished without $MODEL/checkpoints/$CKPT"
}
run_step train "$KEY_TRAIN" do_train

# --- 6. generate ----------------------------------------------------------------------------------------
N_TEST=$(wc -l < "$DIR/corpus/test.$SRC")
HYP="$MODEL/hyp.test.$TGT"
# at most 1.5 x source + 10 pieces: a bound that 14 of the 28,091 training pairs exceed, it stops a degenerate
# repetition early instead of at fairseq's 200
MAX_LEN=(--max-len-a 1.5 --max-len-b 10)
KEY_GEN=$(echo "$KEY_TRAIN $CKPT beam $BEAM ${MAX_LEN[*]} batch $GEN_BATCH${EXTRA_GEN_ARGS:+ $EXTRA_GEN_ARGS}" | hash)
do_generate() {
  rm -f "$MODEL/generate-test.txt" "$MODEL/generate-test.txt.tmp" "$HYP"
  log "fairseq-generate: beam $BEAM, $N_TEST test sentences, batch $GEN_BATCH"
  fairseq-generate "$DIR/bin" --user-dir "$ROOT/fairseq_moec" --task translation_moec --source-lang "$SRC" \
    --target-lang "$TGT" --gen-subset test --path "$MODEL/checkpoints/$CKPT" --beam "$BEAM" \
    --batch-size "$GEN_BATCH" --required-batch-size-multiple 1 --cpu --log-format simple --log-interval 1 \
    "${MAX_LEN[@]}" $EXTRA_GEN_ARGS > "$MODEL/generate-test.txt.tmp"
  "$PY" "$TOOLS" collect "$MODEL/generate-test.txt.tmp" "$DIR/spm/spm.model" "$N_TEST" "$HYP" \
    || die "fairseq-generate did not translate every test line (see $MODEL/generate-test.txt.tmp)"
  mv "$MODEL/generate-test.txt.tmp" "$MODEL/generate-test.txt"
}
run_step generate "$KEY_GEN" do_generate

# --- 7. score -------------------------------------------------------------------------------------------
KEY_SCORE=$(echo "$KEY_GEN score${BLEU_TOKENIZE:+ tokenize $BLEU_TOKENIZE}" | hash)
do_score() {
  local updates
  updates=$(grep -oE "num_updates[ =][0-9]+" "$MODEL/train.log" 2>/dev/null | tail -1 | grep -oE "[0-9]+$" || true)
  # each value is its own argument: a path may hold any character (a '"' once broke a hand-made JSON here)
  "$PY" "$TOOLS" score "$HYP" "$DIR/corpus/test.$TGT" "$MODEL/results.txt" "$MODEL/results.json" \
    --tgt-lang "$TGT" ${BLEU_TOKENIZE:+--tokenize "$BLEU_TOKENIZE"} --meta "seed=$SEED" \
    --meta "load_average_at_start=$LOAD_START" --meta "checkpoint=$CKPT" --meta "beam=$BEAM" --meta "updates=${updates:-?}" --meta "model_dir=$MODEL" \
    --meta "corpus=$CORPUS" --meta "source_lang=$SRC" --meta "target_lang=$TGT" > /dev/null
}
run_step score "$KEY_SCORE" do_score

T_TOTAL=$(( $(date +%s) - T_START ))
echo
echo "== MoEC demo, $SRC -> $TGT, $N_TEST test lines of $CORPUS (seed $SEED) =="
cat "$MODEL/results.txt"
echo "steps: ${TIMES[*]/%/;} total ${T_TOTAL}s"
echo "model: $MODEL/checkpoints/$CKPT"
echo "results: $MODEL/results.txt, $MODEL/results.json; translations: $HYP"
echo "translate a sentence of your own:"
# the sentence in single quotes (readable; %q would escape every space), the paths with %q
EXAMPLE=$(head -n 1 "$DIR/corpus/test.$SRC")
printf "  echo '%s' | fairseq-interactive %q --user-dir %q --task translation_moec --source-lang %q --target-lang %q \\\\\n" \
  "${EXAMPLE//\'/\'\\\'\'}" "$DIR/bin" "$ROOT/fairseq_moec" "$SRC" "$TGT"
printf '      --path %q --bpe sentencepiece --sentencepiece-model %q --cpu --beam %q\n' \
  "$MODEL/checkpoints/$CKPT" "$DIR/spm/spm.model" "$BEAM"
