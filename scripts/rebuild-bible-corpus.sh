#!/usr/bin/env bash
# Rebuild the bundled Spanish-English verse corpus (data/bible-es-en) from its sources, the Debian packages
# sword-text-sparv (Reina-Valera 1909) and sword-text-web (World English Bible), read with pysword.
#
#   bash scripts/rebuild-bible-corpus.sh [OUT_DIR]        (default OUT_DIR: work/bible-es-en-rebuilt)
#
# Needs apt-get (Debian/Ubuntu package lists; no root: the packages are fetched with `apt-get download` and
# unpacked with `dpkg -x` into a temporary directory) and pip access for pysword if it is not importable.
# Environment:
#   FRESH_SPLIT=1   assign every extracted verse to a split by a hash of its reference instead of taking the
#                   split lists of the shipped corpus (the shipped corpus also holds some verses back; see
#                   data/bible-es-en/README.md)
#   COMPRESS=1      also write OUT_DIR/*.xz (xz -9e) and OUT_DIR/SHA256SUMS, the shipped form
#   SPARV_VERSION, WEB_VERSION   Debian versions to fetch (default: whatever apt offers; the shipped corpus
#                   was made from sword-text-sparv 2.60-1 and sword-text-web 426.0-1)
# At the end the result is compared with the shipped files, file by file.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=${1:-$ROOT/work/bible-es-en-rebuilt}
SHIPPED="$ROOT/data/bible-es-en"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

echo "[rebuild] fetching the SWORD modules from Debian" >&2
pkgs=("sword-text-sparv${SPARV_VERSION:+=$SPARV_VERSION}" "sword-text-web${WEB_VERSION:+=$WEB_VERSION}")
if ! (cd "$tmp" && apt-get download "${pkgs[@]}" >&2); then
  echo "[rebuild] ERROR: apt-get download ${pkgs[*]} failed (run 'apt-get update' first?)" >&2
  exit 1
fi
for deb in "$tmp"/*.deb; do
  echo "[rebuild]   $(basename "$deb")" >&2
  dpkg -x "$deb" "$tmp/root"
done
case "$(ls "$tmp"/*.deb | xargs -n1 basename | tr '\n' ' ')" in
  *sword-text-sparv_2.60-1_*sword-text-web_426.0-1_*) ;;
  *) echo "[rebuild] note: these are not the package versions the shipped corpus was made from" \
          "(sword-text-sparv 2.60-1, sword-text-web 426.0-1): expect differences" >&2 ;;
esac

if ! "$PY" -c "import pysword" 2>/dev/null; then
  echo "[rebuild] installing pysword into a temporary virtualenv" >&2
  python3 -m venv "$tmp/venv"
  "$tmp/venv/bin/python" -m pip install -q --disable-pip-version-check "pysword==0.2.8" >&2
  PY="$tmp/venv/bin/python"
fi

args=("$tmp/root/usr/share/sword" "$OUT")
[ "${FRESH_SPLIT:-0}" = 1 ] || args+=(--refs-from "$SHIPPED")
echo "[rebuild] extracting (a few minutes)" >&2
"$PY" "$ROOT/scripts/rebuild_bible_corpus.py" "${args[@]}"

if [ "${COMPRESS:-0}" = 1 ]; then
  (cd "$OUT" && sha256sum {train,valid,test}.{es,en,ref} > SHA256SUMS.tmp && mv SHA256SUMS.tmp SHA256SUMS)
  for f in "$OUT"/{train,valid,test}.{es,en,ref}; do xz -9e -T1 -k -f "$f"; done
fi

echo "[rebuild] comparison with the shipped corpus ($SHIPPED):"
same=0
for f in {train,valid,test}.{es,en,ref}; do
  n=$(wc -l < "$OUT/$f")
  m=$(xz -dc "$SHIPPED/$f.xz" | wc -l)
  if xz -dc "$SHIPPED/$f.xz" | cmp -s - "$OUT/$f"; then
    echo "  $f: identical ($n lines)"; same=$((same + 1))
  else
    echo "  $f: DIFFERS (rebuilt $n lines, shipped $m lines; $(xz -dc "$SHIPPED/$f.xz" | diff - "$OUT/$f" | grep -c '^[<>]') differing lines)"
  fi
done
echo "[rebuild] $same of 9 files identical; output in $OUT"
