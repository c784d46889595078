#!/usr/bin/env bash
# Prepare WMT'14 English->German for fairseq, as in the MoEC paper's MT setting (docs/wmt14.md):
#   train  Europarl v7 + Common Crawl + News Commentary v9 (v12 with --wmt17)   ~4.5M pairs
#   valid  newstest2013 (or --valid-from-train N: every N-th training pair, like fairseq's script)
#   test   newstest2014, the full 3003-sentence version (test-full.tgz sgm files)
# Pipeline: fetch + verify archives -> extract -> Moses normalize/tokenize (sacremoses) -> joint sentencepiece
# (unigram 32k; --bpe40k for the paper's 40k joint BPE) -> length/ratio filter -> fairseq-preprocess
# --joined-dictionary. The result (DEST) also holds spm.model and the raw test files that evaluate.sh needs.
#
# Every step writes to NAME.incomplete and renames it to NAME only when it succeeded: an interrupted or failed
# step never leaves output that looks finished, and a rerun skips the finished steps and redoes the rest.
# Downloads resume from FILE.part. Run with -h for the options.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PY=${PYTHON:-python}
WMT="$HERE/wmt"

# The archives. Checksums: '-' = not known. None of these values could be checked here (no network): they
# come from public code that pins them, named in the comments. A known value that mismatches stops the run
# (fail closed); a file with no known value is used with a loud warning printing its sha256 to record here.
# Override or fill in values without editing this file: --checksums FILE (sha256sum format).
archive_table() {
  cat <<'TABLE'
# file                              url                                                                            sha256                                                            md5
# sha256: two unrelated public download scripts agree; md5: Sockeye autopilot (awslabs/sockeye)
training-parallel-europarl-v7.tgz   https://www.statmt.org/wmt13/training-parallel-europarl-v7.tgz                 0224c7c710c8a063dfd893b0cc0830202d61f4c75c17eb8e31836103d27d96e7  c52404583294a1b609e56d45b2ed06f5
# sha256: one public pipeline (stagedml); md5: Sockeye autopilot
training-parallel-commoncrawl.tgz   https://www.statmt.org/wmt13/training-parallel-commoncrawl.tgz                 c7a74e2ea01ac6c920123108627e35278d4ccb5701e15428ffa34de86fa3a9e5  7e0acbe86b0d7816300e14650f5b2bd4
# sha256: one public dataset registry; md5: Sockeye autopilot
training-parallel-nc-v9.tgz         https://www.statmt.org/wmt14/training-parallel-nc-v9.tgz                       cb8953f292298e6877ae433c98912b927cb0766b303f4540512ddd286c748485  92e42b68f9d3c2ae9722e6d1c2623e21
# sha256: one public pipeline (stagedml); md5: Sockeye autopilot
training-parallel-nc-v12.tgz        https://data.statmt.org/wmt17/translation-task/training-parallel-nc-v12.tgz    2b45f30ef1d550d302fd17dd3a5cbe19134ccc4c2cf50c2dae534aee600101a2  fc6b83b809347e64f511d291e4bc8731
# WMT'14 dev sets (newstest2013 as plain text). sha256 unknown; md5: Sockeye autopilot
dev.tgz                             https://www.statmt.org/wmt14/dev.tgz                                           -                                                                 88ba3fc60b2278d59277122e1c7dd6e7
# newstest2014 "full". sha256 unknown; md5: sacrebleu 2.6 (its wmt14/full test set)
test-full.tgz                       https://www.statmt.org/wmt14/test-full.tgz                                     -                                                                 a8cd784e006feb32ac6f3d9ec7eb389a
TABLE
}

usage() {
  cat <<EOF
usage: bash scripts/prepare-wmt14en2de.sh [options]

data
  --wmt17                   News Commentary v12 instead of v9 (the WMT'17 training data of fairseq's script)
  --valid-from-train N      valid = every N-th training pair (removed from train) instead of newstest2013
subwords and filtering
  --vocab-size N            joint sentencepiece vocabulary size, 100..1000000 (default 32000)
  --subword unigram|bpe     sentencepiece model type (default unigram)
  --bpe40k                  the paper's setting: --subword bpe --vocab-size 40000
  --character-coverage X    sentencepiece character coverage, 0.98..1 (default 0.9999)
  --spm-sentences N         sentences sampled to train sentencepiece (default 10000000)
  --min-len N --max-len N   keep train/valid pairs with N..M subword tokens per side (default 1..250)
  --ratio R                 drop train/valid pairs with a length ratio above R >= 1 (default 1.5)
where
  --workdir DIR             intermediate files (default work/wmt14_en_de, per data option)
  --dest DIR                fairseq data directory (default data-bin/wmt14_en_de, per option)
  --archives DIR            use the archives in DIR instead of downloading them (still verified)
  WMT_MIRROR=URL            environment: download FILE from URL/FILE instead of statmt.org (file:// works)
checks and control
  --checksums FILE          sha256sum-format file whose values replace the built-in table's
  --strict-checksums        refuse archives with no known checksum instead of warning
  --download-only           fetch and verify the archives, then stop
  --workers N               processes for tokenization and binarization (default: number of CPUs)
EOF
}

say() { echo "$*" >&2; }
die() { echo "prepare-wmt14en2de.sh: error: $*" >&2; exit 2; }

CORPUS=wmt14 HOLDOUT=0 SUBWORD=unigram VOCAB=32000 COVERAGE=0.9999 SPM_SENTENCES=10000000
MIN_LEN=1 MAX_LEN=250 RATIO=1.5 WORK="" DEST="" ARCHIVES="" CHECKSUMS="" STRICT="" DOWNLOAD_ONLY=0
WORKERS=$(nproc 2>/dev/null || echo 1)
need() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value (see -h)"; }
while [[ $# -gt 0 ]]; do
  case $1 in
    --wmt17) CORPUS=wmt17 ;;
    --valid-from-train) need "$@"; HOLDOUT=$2; shift ;;
    --vocab-size) need "$@"; VOCAB=$2; shift ;;
    --subword) need "$@"; SUBWORD=$2; shift ;;
    --bpe40k) SUBWORD=bpe VOCAB=40000 ;;
    --character-coverage) need "$@"; COVERAGE=$2; shift ;;
    --spm-sentences) need "$@"; SPM_SENTENCES=$2; shift ;;
    --min-len) need "$@"; MIN_LEN=$2; shift ;;
    --max-len) need "$@"; MAX_LEN=$2; shift ;;
    --ratio) need "$@"; RATIO=$2; shift ;;
    --workdir) need "$@"; WORK=$2; shift ;;
    --dest) need "$@"; DEST=$2; shift ;;
    --archives) need "$@"; ARCHIVES=$2; shift ;;
    --checksums) need "$@"; CHECKSUMS=$2; shift ;;
    --strict-checksums) STRICT=--strict ;;
    --download-only) DOWNLOAD_ONLY=1 ;;
    --workers) need "$@"; WORKERS=$2; shift ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown option: $1" ;;
  esac
  shift
done
# Every option is checked here, before any work (an out-of-range value must not surface after hours of work).
int() { [[ $2 =~ ^[0-9]{1,9}$ ]] || die "$1 must be a non-negative integer (at most 9 digits), got '$2'"; }
int --valid-from-train "$HOLDOUT"; int --min-len "$MIN_LEN"; int --max-len "$MAX_LEN"
int --workers "$WORKERS"; int --spm-sentences "$SPM_SENTENCES"
# the ranges sentencepiece accepts (scripts/wmt/subword.py checks the same: VOCAB_SIZE_RANGE, COVERAGE_RANGE)
[[ $VOCAB =~ ^[0-9]{1,9}$ ]] && (( 10#$VOCAB >= 100 && 10#$VOCAB <= 1000000 )) \
  || die "--vocab-size must be an integer from 100 to 1000000, got '$VOCAB'"
[[ $COVERAGE =~ ^(0(\.[0-9]+)?|1(\.0*)?|\.[0-9]+)$ ]] && awk -v c="$COVERAGE" 'BEGIN { exit !(c >= 0.98 && c <= 1) }' \
  || die "--character-coverage must be a number from 0.98 to 1, got '$COVERAGE'"
[[ $SUBWORD == unigram || $SUBWORD == bpe ]] || die "--subword must be unigram or bpe, got '$SUBWORD'"
[[ $HOLDOUT != 1 ]] || die "--valid-from-train 1 would leave no training data"
[[ $RATIO =~ ^[0-9]+(\.[0-9]+)?$ ]] && awk -v r="$RATIO" 'BEGIN { exit !(r >= 1) }' \
  || die "--ratio must be a number >= 1 (a longer side over a shorter one), got '$RATIO'"
(( 10#$MIN_LEN <= 10#$MAX_LEN )) || die "--min-len ($MIN_LEN) must not exceed --max-len ($MAX_LEN)"
[[ $WORKERS -ge 1 ]] || WORKERS=1
if [[ -n $ARCHIVES ]]; then
  [[ -d $ARCHIVES ]] || die "--archives directory not found: $ARCHIVES"
  ARCHIVES=$(cd "$ARCHIVES" && pwd)
fi
if [[ -n $CHECKSUMS ]]; then
  [[ -f $CHECKSUMS ]] || die "--checksums file not found: $CHECKSUMS"
  CHECKSUMS=$(cd "$(dirname "$CHECKSUMS")" && pwd)/$(basename "$CHECKSUMS")
fi

# Names and option fingerprints. Text-level options (corpus, valid split) fix the work directory; subword
# options fix a sub-directory of it, so several vocabularies share one extraction and tokenization.
NAME=${CORPUS}_en_de
[[ $HOLDOUT == 0 ]] || NAME+=_holdout$HOLDOUT
SUBTAG=$SUBWORD$VOCAB
[[ $MIN_LEN-$MAX_LEN-$RATIO == 1-250-1.5 ]] || SUBTAG+=_len$MIN_LEN-${MAX_LEN}_ratio$RATIO
[[ $SUBTAG == unigram32000 ]] && DEST_SUFFIX="" || DEST_SUFFIX=_$SUBTAG
WORK=${WORK:-work/$NAME}
DEST=${DEST:-data-bin/$NAME$DEST_SUFFIX}
SUB=$WORK/$SUBTAG
TEXT_KEY="corpus=$CORPUS valid_from_train=$HOLDOUT"
SUB_KEY="$TEXT_KEY subword=$SUBWORD vocab=$VOCAB coverage=$COVERAGE spm_sentences=$SPM_SENTENCES len=$MIN_LEN-$MAX_LEN ratio=$RATIO"
[[ $CORPUS == wmt17 ]] && NC=12 || NC=9
NEEDED=$(cd "$WMT" && "$PY" -c "import extract, sacremoses, sentencepiece, tqdm
print(' '.join(extract.archives_needed($NC, $HOLDOUT)))") \
  || die "cannot run the recipe's Python helpers with '$PY' (activate the project's virtualenv, or set PYTHON)"
read -r -a NEEDED <<< "$NEEDED"

check_key() {  # check_key FILE KEY WHAT: remember the options a directory was made with; refuse others
  if [[ -f $1 ]]; then
    [[ $(cat "$1") == "$2" ]] || die "$3 was prepared with other options:
  there: $(cat "$1")
  now:   $2
use another --workdir/--dest, or delete it to start over"
  else
    mkdir -p "$(dirname "$1")" && echo "$2" > "$1"
  fi
}

if [[ -e $DEST && $DOWNLOAD_ONLY == 0 ]]; then
  [[ -f $DEST/prepare.json ]] || die "$DEST exists but is not a finished output of this script: choose another --dest or remove it"
  check_key "$DEST/.options" "$SUB_KEY" "$DEST"
  say "[prepare] already done: $DEST"; exit 0
fi
mkdir -p "$WORK"
if command -v flock >/dev/null; then
  exec 9>"$WORK/.lock"
  flock -n 9 || die "another prepare run is using $WORK"
fi
check_key "$WORK/.options" "$TEXT_KEY" "work directory $WORK"

STEP="" STEP_TMP=""
on_exit() {
  local rc=$?
  [[ -n $STEP_TMP && -e $STEP_TMP ]] && rm -rf "$STEP_TMP"
  if [[ $rc != 0 && -n $STEP ]]; then
    if [[ -n $STEP_TMP ]]; then
      say "prepare-wmt14en2de.sh: error: step '$STEP' did not finish (exit status $rc); its partial output" \
          "was removed. Finished steps are kept: rerun the same command to resume."
    else
      say "prepare-wmt14en2de.sh: error: step '$STEP' did not finish (exit status $rc). Verified archives" \
          "are kept and partial downloads resume: rerun the same command."
    fi
  fi
}
trap on_exit EXIT
trap 'exit 130' INT TERM

run_step() {  # run_step LABEL OUTDIR FUNCTION: FUNCTION fills $OUT (a fresh temp dir), renamed to OUTDIR
  local label=$1 final=$2 fn=$3 t0=$SECONDS
  if [[ -e $final ]]; then say "[$label] already done: $final"; return 0; fi
  STEP=$label STEP_TMP=$final.incomplete OUT=$final.incomplete
  rm -rf "$OUT" && mkdir -p "$OUT"
  say "[$label] -> $final"
  "$fn"
  mv -T "$OUT" "$final"
  STEP="" STEP_TMP=""
  say "[$label] done in $((SECONDS - t0)) s"
}

do_fetch() {
  mkdir -p "$WORK/orig" && archive_table > "$WORK/orig/.archives.tsv"
  local args=(--table "$WORK/orig/.archives.tsv" --orig "$WORK/orig")
  [[ -n $ARCHIVES ]] && args+=(--archives "$ARCHIVES")
  [[ -n ${WMT_MIRROR:-} ]] && args+=(--mirror "$WMT_MIRROR")
  [[ -n $CHECKSUMS ]] && args+=(--checksums "$CHECKSUMS")
  [[ -n $STRICT ]] && args+=("$STRICT")
  STEP=fetch
  "$PY" "$WMT/fetch.py" "${args[@]}" "${NEEDED[@]}"
  STEP=""
}
do_extract() {
  "$PY" "$WMT/extract.py" --orig "$WORK/orig" --out "$OUT" --nc-version "$NC" --holdout-every "$HOLDOUT"
}
do_tokenize() {
  for lang in en de; do
    "$PY" "$WMT/normalize_tokenize.py" --lang "$lang" --workers "$WORKERS" \
      "$WORK/raw/train.$lang" "$OUT/train.$lang" "$WORK/raw/valid.$lang" "$OUT/valid.$lang" \
      "$WORK/raw/test.$lang" "$OUT/test.$lang"
  done
}
do_spm() {
  "$PY" "$WMT/subword.py" train --model-prefix "$OUT/spm" --vocab-size "$VOCAB" --model-type "$SUBWORD" \
    --character-coverage "$COVERAGE" --input-sentence-size "$SPM_SENTENCES" --threads "$WORKERS" \
    "$WORK/tok/train.en" "$WORK/tok/train.de"
}
do_encode() {
  local files=()
  for split in train valid test; do
    for lang in en de; do files+=("$WORK/tok/$split.$lang" "$OUT/$split.all.$lang"); done
  done
  "$PY" "$WMT/subword.py" encode --model "$SUB/spm/spm.model" --threads "$WORKERS" "${files[@]}"
  for split in train valid; do  # the test set is never filtered: every reference sentence is scored
    "$PY" "$WMT/subword.py" filter --min-len "$MIN_LEN" --max-len "$MAX_LEN" --ratio "$RATIO" \
      --stats "$OUT/$split.filter.json" "$OUT/$split.all.en" "$OUT/$split.all.de" "$OUT/$split.en" "$OUT/$split.de"
    rm "$OUT/$split.all.en" "$OUT/$split.all.de"
  done
  mv "$OUT/test.all.en" "$OUT/test.en" && mv "$OUT/test.all.de" "$OUT/test.de"
}
do_binarize() {
  command -v fairseq-preprocess >/dev/null || die "fairseq-preprocess not found on PATH (activate the virtualenv)"
  fairseq-preprocess --source-lang en --target-lang de --joined-dictionary --workers "$WORKERS" \
    --trainpref "$SUB/data/train" --validpref "$SUB/data/valid" --testpref "$SUB/data/test" --destdir "$OUT"
  cp "$SUB/spm/spm.model" "$SUB/spm/spm.vocab" "$OUT/"
  cp "$WORK/raw/test.en" "$OUT/test.raw.en" && cp "$WORK/raw/test.de" "$OUT/test.raw.de"
  echo "$SUB_KEY" > "$OUT/.options"
  SUB_KEY=$SUB_KEY WORK=$WORK SUB=$SUB "$PY" - "$OUT/prepare.json" <<'EOF'
import glob, json, os, sys, time
work, sub = os.environ["WORK"], os.environ["SUB"]
manifest = {
    "options": dict(kv.split("=", 1) for kv in os.environ["SUB_KEY"].split()),
    "counts_raw": json.load(open(os.path.join(work, "raw", "counts.json"))),
    "filter": {s: json.load(open(os.path.join(sub, "data", f"{s}.filter.json"))) for s in ("train", "valid")},
    "archives_sha256": {os.path.basename(p)[:-7]: open(p).read().split()[0]
                        for p in sorted(glob.glob(os.path.join(work, "orig", "*.sha256")))},
    "test_reference": "test.raw.de (newstest2014 full, cleaned like sacrebleu's wmt14/full)",
    "subword_model": "spm.model",
    "created": time.strftime("%Y-%m-%d %H:%M:%S"),
}
json.dump(manifest, open(sys.argv[1], "w"), indent=2)
EOF
}

if [[ ! -e $WORK/raw ]]; then
  do_fetch
elif [[ $DOWNLOAD_ONLY == 1 ]]; then
  say "[fetch] nothing to do: the archives are already extracted in $WORK/raw"
fi
if [[ $DOWNLOAD_ONLY == 1 ]]; then say "[prepare] archives verified in $WORK/orig"; exit 0; fi
run_step extract "$WORK/raw" do_extract
run_step tokenize "$WORK/tok" do_tokenize
check_key "$SUB/.options" "$SUB_KEY" "$SUB"
run_step sentencepiece "$SUB/spm" do_spm
run_step encode+filter "$SUB/data" do_encode
mkdir -p "$(dirname "$DEST")"
run_step binarize "$DEST" do_binarize
say "[prepare] done: $DEST ($(wc -l < "$DEST/test.raw.de") test sentences; train with scripts/train.sh)"
