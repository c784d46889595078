#!/usr/bin/env bash
# The demo: train and evaluate a small MoEC Transformer (Spanish -> English) on the bundled Bible corpus, on CPU,
# with no download. One command (`make demo`, or `bash scripts/demo.sh` with the project venv on PATH).
#
# Steps (each one writes under temporary names and writes its stamp file last, so a finished step is skipped by
# the next run and an interrupted one is redone; training resumes from checkpoint_last.pt). Stamps: the data steps
# in $DEMO_DIR/stamps/, the model steps in $DEMO_DIR/<profile>-<hash of the training settings>/stamps/.
#   corpus      decompress data/bible-es-en/*.xz to $DEMO_DIR/corpus and check it (aligned, no empty line, sha256)
#   spm         joint sentencepiece unigram model (DEMO_VOCAB pieces) on train.es + train.en
#   encode      sentencepiece-encode every split
#   preprocess  fairseq-preprocess --joined-dictionary
#   train       fairseq-train, a fixed number of updates (DEMO_UPDATES)
#   generate    fairseq-generate on EVERY test line (fails unless #hypotheses == #test lines), spm-decode, reorder
#   score       sacrebleu BLEU and chrF (13a tokenisation) with signatures -> results.txt / results.json
#
# Settings (environment variables; defaults in brackets, "long" profile values after the slash):
#   DEMO_DIR [work/demo]   DEMO_CORPUS [data/bible-es-en: *.xz or plain files {train,valid,test}.{es,en,ref}]
#   DEMO_PROFILE [default | long: trains to convergence, validation every 250 updates, early stopping]
#   DEMO_UPDATES [430 / 2000]  DEMO_LR [2e-3 / 2e-3]  DEMO_WARMUP [150 / 300]  DEMO_DROPOUT [0.1 / 0.2]
#   DEMO_MAX_TOKENS [6000]  DEMO_LAYERS [3]  DEMO_DIM [256]  DEMO_FFN [1024]  DEMO_HEADS [4]  DEMO_VOCAB [8000]
#   DEMO_EXPERTS [8]  DEMO_CLUSTERS [2]  DEMO_CLUSTER_DROPOUT [0.25]  DEMO_DROPOUT_INTERVAL [50]
#   DEMO_MOE_ENCODER_LAYERS [1]  DEMO_MOE_DECODER_LAYERS [1]  DEMO_SEED [1]
#   DEMO_BEAM [4 / 5]  DEMO_GEN_BATCH [128]  DEMO_SAVE_INTERVAL [150 / 250] (updates between checkpoints)
#   DEMO_TRAIN_ARGS [""]   extra fairseq-train arguments, appended as is
#   DEMO_GEN_ARGS [""]     extra fairseq-generate arguments, appended as is (e.g. "--max-len-b 20" for a smoke test)
#   DEMO_STOP_AFTER [""]   stop after this step (corpus, spm, encode, preprocess, train, generate)
# The model directory is named after a hash of the training settings, so changing one trains a new model next to
# the old one instead of mixing checkpoints.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"

die() { echo "[demo] ERROR: $*" >&2; exit 1; }
log() { echo "[demo] $*" >&2; }

if ! command -v fairseq-train >/dev/null 2>&1 && [ -x "$ROOT/.venv/bin/fairseq-train" ]; then
  PATH="$ROOT/.venv/bin:$PATH"
fi
PY=${PYTHON:-python}
command -v "$PY" >/dev/null 2>&1 || PY=python3
TOOLS="$ROOT/scripts/demo_tools.py"

PROFILE=${DEMO_PROFILE:-default}
case "$PROFILE" in
  default) D_UPDATES=430;   D_LR=2e-3; D_WARMUP=150;  D_DROPOUT=0.1; D_BEAM=4; D_SAVE=150 ;;
  long)    D_UPDATES=2000;  D_LR=2e-3; D_WARMUP=300;  D_DROPOUT=0.2; D_BEAM=5; D_SAVE=250 ;;
  *) die "DEMO_PROFILE must be 'default' or 'long', got '$PROFILE'" ;;
esac
DIR=${DEMO_DIR:-work/demo}
CORPUS=${DEMO_CORPUS:-data/bible-es-en}
UPDATES=${DEMO_UPDATES:-$D_UPDATES}
LR=${DEMO_LR:-$D_LR}
WARMUP=${DEMO_WARMUP:-$D_WARMUP}
DROPOUT=${DEMO_DROPOUT:-$D_DROPOUT}
MAX_TOKENS=${DEMO_MAX_TOKENS:-6000}
LAYERS=${DEMO_LAYERS:-3}
DIM=${DEMO_DIM:-256}
FFN=${DEMO_FFN:-1024}
HEADS=${DEMO_HEADS:-4}
VOCAB=${DEMO_VOCAB:-8000}
EXPERTS=${DEMO_EXPERTS:-8}
CLUSTERS=${DEMO_CLUSTERS:-2}
CDROP=${DEMO_CLUSTER_DROPOUT:-0.25}
CDROP_INTERVAL=${DEMO_DROPOUT_INTERVAL:-50}
MOE_ENC=${DEMO_MOE_ENCODER_LAYERS:-1}
MOE_DEC=${DEMO_MOE_DECODER_LAYERS:-1}
SEED=${DEMO_SEED:-1}
BEAM=${DEMO_BEAM:-$D_BEAM}
GEN_BATCH=${DEMO_GEN_BATCH:-128}
SAVE_INTERVAL=${DEMO_SAVE_INTERVAL:-$D_SAVE}
EXTRA_TRAIN_ARGS=${DEMO_TRAIN_ARGS:-}
EXTRA_GEN_ARGS=${DEMO_GEN_ARGS:-}
STOP_AFTER=${DEMO_STOP_AFTER:-}
case "$STOP_AFTER" in ""|corpus|spm|encode|preprocess|train|generate) ;; *) die "DEMO_STOP_AFTER: unknown step '$STOP_AFTER'" ;; esac
[ -d "$CORPUS" ] || die "corpus directory $CORPUS not found (DEMO_CORPUS)"

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
CURRENT_STEP=""
on_exit() {
  local rc=$?
  if [ "$rc" -ne 0 ] && [ -n "$CURRENT_STEP" ]; then
    echo "[demo] ERROR: step $CURRENT_STEP failed (exit $rc); it is not marked done: fix the cause and rerun" >&2
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
FILES=""
for s in $SPLITS; do for l in es en ref; do FILES="$FILES $s.$l"; done; done

# --- 1. corpus -------------------------------------------------------------------------------------------
corpus_source() {  # the path of one corpus file: NAME.xz or NAME
  if [ -f "$CORPUS/$1.xz" ]; then echo "$CORPUS/$1.xz"; elif [ -f "$CORPUS/$1" ]; then echo "$CORPUS/$1"; fi
}
missing=""
for f in $FILES; do [ -n "$(corpus_source "$f")" ] || missing="$missing $f"; done
[ -z "$missing" ] || die "corpus $CORPUS lacks$missing (want {train,valid,test}.{es,en,ref}, plain or .xz)"
KEY_CORPUS=$( { for f in $FILES; do echo "$f"; cat "$(corpus_source "$f")"; done; \
                [ -f "$CORPUS/SHA256SUMS" ] && cat "$CORPUS/SHA256SUMS"; true; } | hash)
do_corpus() {
  rm -rf "$DIR/corpus" "$DIR/corpus.tmp"
  mkdir -p "$DIR/corpus.tmp"
  for f in $FILES; do
    src=$(corpus_source "$f")
    case "$src" in
      *.xz) xz -dc "$src" > "$DIR/corpus.tmp/$f" || die "cannot decompress $src" ;;
      *) cp "$src" "$DIR/corpus.tmp/$f" ;;
    esac
  done
  [ -f "$CORPUS/SHA256SUMS" ] && cp "$CORPUS/SHA256SUMS" "$DIR/corpus.tmp/"
  "$PY" "$TOOLS" check-corpus "$DIR/corpus.tmp" || die "the corpus in $CORPUS is not usable (see above)"
  mv "$DIR/corpus.tmp" "$DIR/corpus"
}
run_step corpus "$KEY_CORPUS" do_corpus

# --- 2. sentencepiece model -----------------------------------------------------------------------------
KEY_SPM=$(echo "$KEY_CORPUS spm unigram $VOCAB" | hash)
do_spm() {
  rm -rf "$DIR/spm" "$DIR/spm.tmp"
  mkdir -p "$DIR/spm.tmp"
  log "training a joint $VOCAB-piece unigram sentencepiece model on train.es + train.en"
  "$PY" "$TOOLS" spm-train "$DIR/spm.tmp/spm" "$VOCAB" "$DIR/corpus/train.es" "$DIR/corpus/train.en"
  mv "$DIR/spm.tmp" "$DIR/spm"
}
run_step spm "$KEY_SPM" do_spm

# --- 3. encode ------------------------------------------------------------------------------------------
KEY_ENC=$(echo "$KEY_SPM encode" | hash)
do_encode() {
  rm -rf "$DIR/tok" "$DIR/tok.tmp"
  mkdir -p "$DIR/tok.tmp"
  for s in $SPLITS; do for l in es en; do
    log "  encoding $s.$l"
    "$PY" "$TOOLS" spm-encode "$DIR/spm/spm.model" "$DIR/corpus/$s.$l" "$DIR/tok.tmp/$s.$l"
  done; done
  mv "$DIR/tok.tmp" "$DIR/tok"
}
run_step encode "$KEY_ENC" do_encode

# --- 4. binarise ----------------------------------------------------------------------------------------
KEY_BIN=$(echo "$KEY_ENC preprocess joined" | hash)
do_preprocess() {
  rm -rf "$DIR/bin" "$DIR/bin.tmp"
  fairseq-preprocess --source-lang es --target-lang en --joined-dictionary \
    --trainpref "$DIR/tok/train" --validpref "$DIR/tok/valid" --testpref "$DIR/tok/test" \
    --destdir "$DIR/bin.tmp" --workers 2 >&2
  mv "$DIR/bin.tmp" "$DIR/bin"
}
run_step preprocess "$KEY_BIN" do_preprocess

# --- 5. train -------------------------------------------------------------------------------------------
TRAIN_ARGS=(
  --user-dir "$ROOT/fairseq_moec" --task translation_moec --source-lang es --target-lang en
  --arch moec_transformer --share-all-embeddings
  --encoder-layers "$LAYERS" --decoder-layers "$LAYERS" --encoder-embed-dim "$DIM" --decoder-embed-dim "$DIM"
  --encoder-ffn-embed-dim "$FFN" --decoder-ffn-embed-dim "$FFN"
  --encoder-attention-heads "$HEADS" --decoder-attention-heads "$HEADS" --dropout "$DROPOUT"
  --moe-encoder-layers "$MOE_ENC" --moe-decoder-layers "$MOE_DEC" --moe-expert-count "$EXPERTS"
  --moe-clusters "$CLUSTERS" --cluster-dropout "$CDROP" --cluster-dropout-interval "$CDROP_INTERVAL"
  --criterion moec_label_smoothed_cross_entropy --label-smoothing 0.1
  --optimizer adam --adam-betas "(0.9, 0.98)" --lr "$LR" --lr-scheduler inverse_sqrt --warmup-updates "$WARMUP"
  --warmup-init-lr 1e-07 --max-tokens "$MAX_TOKENS" --max-update "$UPDATES" --seed "$SEED" --cpu
  --save-interval-updates "$SAVE_INTERVAL" --keep-interval-updates 1 --no-epoch-checkpoints
)
if [ "$PROFILE" = long ]; then
  # to convergence: validate every SAVE_INTERVAL updates, stop when valid loss has not improved 4 times in a row
  TRAIN_ARGS+=(--validate-interval-updates "$SAVE_INTERVAL" --validate-interval 1000 --patience 4
              --best-checkpoint-metric loss)
  CKPT=checkpoint_best.pt
else
  # fixed number of updates; validation only at the interval checkpoints and at the end (995 sentences)
  TRAIN_ARGS+=(--validate-interval 1000)
  CKPT=checkpoint_last.pt
fi
# shellcheck disable=SC2206
[ -n "$EXTRA_TRAIN_ARGS" ] && TRAIN_ARGS+=($EXTRA_TRAIN_ARGS)
KEY_TRAIN=$( { echo "$KEY_BIN $PROFILE"; printf '%s\n' "${TRAIN_ARGS[@]}" | grep -v "^$ROOT"; } | hash)
MODEL="$DIR/$PROFILE-$KEY_TRAIN"
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
  fairseq-train "$DIR/bin" "${TRAIN_ARGS[@]}" --save-dir "$MODEL/checkpoints" \
    --log-format simple --log-interval 10 2>&1 | tee -a "$MODEL/train.log" >&2
  [ -f "$MODEL/checkpoints/$CKPT" ] || die "training finished without $MODEL/checkpoints/$CKPT"
}
run_step train "$KEY_TRAIN" do_train

# --- 6. generate ----------------------------------------------------------------------------------------
N_TEST=$(wc -l < "$DIR/corpus/test.es")
KEY_GEN=$(echo "$KEY_TRAIN $CKPT beam $BEAM batch $GEN_BATCH${EXTRA_GEN_ARGS:+ $EXTRA_GEN_ARGS}" | hash)
do_generate() {
  rm -f "$MODEL/generate-test.txt" "$MODEL/generate-test.txt.tmp" "$MODEL/hyp.test.en"
  log "fairseq-generate: beam $BEAM, $N_TEST test sentences, batch $GEN_BATCH"
  fairseq-generate "$DIR/bin" --user-dir "$ROOT/fairseq_moec" --task translation_moec --source-lang es \
    --target-lang en --gen-subset test --path "$MODEL/checkpoints/$CKPT" --beam "$BEAM" \
    --batch-size "$GEN_BATCH" --required-batch-size-multiple 1 --cpu --log-format simple --log-interval 1 \
    $EXTRA_GEN_ARGS > "$MODEL/generate-test.txt.tmp"
  "$PY" "$TOOLS" collect "$MODEL/generate-test.txt.tmp" "$DIR/spm/spm.model" "$N_TEST" "$MODEL/hyp.test.en" \
    || die "fairseq-generate did not translate every test line (see $MODEL/generate-test.txt.tmp)"
  mv "$MODEL/generate-test.txt.tmp" "$MODEL/generate-test.txt"
}
run_step generate "$KEY_GEN" do_generate

# --- 7. score -------------------------------------------------------------------------------------------
KEY_SCORE=$(echo "$KEY_GEN score" | hash)
do_score() {
  local updates
  updates=$(grep -oE "num_updates[ =][0-9]+" "$MODEL/train.log" 2>/dev/null | tail -1 | grep -oE "[0-9]+$" || true)
  "$PY" "$TOOLS" score "$MODEL/hyp.test.en" "$DIR/corpus/test.en" "$MODEL/results.txt" "$MODEL/results.json" \
    "{\"profile\": \"$PROFILE\", \"checkpoint\": \"$CKPT\", \"beam\": $BEAM, \"updates\": \"${updates:-?}\", \"model_dir\": \"$MODEL\"}" \
    > /dev/null
}
run_step score "$KEY_SCORE" do_score

T_TOTAL=$(( $(date +%s) - T_START ))
echo
echo "== MoEC demo, Spanish -> English, $N_TEST test verses ($PROFILE profile; $MODEL) =="
cat "$MODEL/results.txt"
echo "steps: ${TIMES[*]/%/;} total ${T_TOTAL}s"
echo "results: $MODEL/results.txt, $MODEL/results.json; translations: $MODEL/hyp.test.en"
