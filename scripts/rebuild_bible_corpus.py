#!/usr/bin/env python3
"""Extract the Spanish-English verse pairs from two SWORD modules (see data/bible-es-en/README.md).

    python scripts/rebuild_bible_corpus.py SWORD_DIR OUT_DIR [--refs-from DIR]

SWORD_DIR is a SWORD data path (holding mods.d/ and modules/) with spaRV1909eb (Reina-Valera 1909, Debian package
sword-text-sparv) and engWEB2015eb (World English Bible, sword-text-web). Writes OUT_DIR/{train,valid,test}.{es,en,ref}
and prints what it kept and dropped. Needs pysword (PyPI). scripts/rebuild-bible-corpus.sh does the downloading.

Splits: with --refs-from DIR (a directory with {train,valid,test}.ref or .ref.xz, e.g. the shipped data/bible-es-en)
each split holds exactly the verses listed there, in that order (this reproduces the shipped corpus, including the
verses it holds back); without it every kept verse is assigned by split_of(), a hash of its reference.
"""

import argparse
import hashlib
import html
import lzma
import os
import re
import sys

ES_MODULE, EN_MODULE = "spaRV1909eb", "engWEB2015eb"
MAX_RATIO = 3.0  # pairs whose word counts differ by more than this factor are dropped
VALID_SLOTS, TEST_SLOTS = 33, 33  # out of 1000 hash slots, see split_of()

_NOTE = re.compile(r"<note\b[^>]*/>|<note\b.*?</note>", re.S)
_TITLE = re.compile(r"<title\b[^>]*/>|<title\b.*?</title>", re.S)
_TAG = re.compile(r"<[^>]+>")
_GLOSSARY = re.compile(r'<div\b[^>]*type="glossary"')  # the WEB module appends its glossary to Rev.22.21
_SPACE = re.compile(r"\s+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+(?=[?!,.;:])")


def clean(raw: str) -> str:
    """OSIS verse markup -> plain text: notes and titles removed with their content, all other tags stripped
    (their content kept), HTML entities unescaped, whitespace collapsed. A removed note separates words
    ("Lord,<note/>for" -> "Lord, for"); no space is left before ? ! , . ; : ("coins <note/> ?" -> "coins?",
    "walk'</q> ?" -> "walk'?")."""
    m = _GLOSSARY.search(raw)
    if m:
        raw = raw[: m.start()]
    text = _TITLE.sub(" ", _NOTE.sub(" ", raw))
    text = _TAG.sub("", text)
    text = html.unescape(text)
    text = _SPACE_BEFORE_PUNCT.sub("", text)
    return _SPACE.sub(" ", text).strip()


def split_of(ref: str) -> str:
    """Deterministic split from the verse reference alone: sha1 of 'Book.C.V', first 8 hex digits, mod 1000."""
    slot = int(hashlib.sha1(ref.encode("utf-8")).hexdigest()[:8], 16) % 1000
    if slot < VALID_SLOTS:
        return "valid"
    if slot < VALID_SLOTS + TEST_SLOTS:
        return "test"
    return "train"


def verses(bible):
    """(reference, raw OSIS text) for every verse of the module's versification, in canonical order."""
    books = bible.get_structure().get_books()
    for testament in ("ot", "nt"):
        for book in books.get(testament, []):
            for chapter, n_verses in enumerate(book.chapter_lengths, 1):
                for verse in range(1, n_verses + 1):
                    try:
                        raw = bible.get(books=[book.osis_name], chapters=[chapter], verses=[verse], clean=False)
                    except Exception:  # a verse the module lacks
                        continue
                    yield f"{book.osis_name}.{chapter}.{verse}", raw


def read_refs(d):
    """{split: [refs]} from DIR/{split}.ref or DIR/{split}.ref.xz."""
    out = {}
    for split in ("train", "valid", "test"):
        path = os.path.join(d, f"{split}.ref")
        opener = open
        if not os.path.isfile(path):
            path, opener = path + ".xz", lzma.open
        with opener(path, "rt", encoding="utf-8") as f:
            out[split] = [line.strip() for line in f if line.strip()]
    return out


def main(sword_dir: str, out_dir: str, refs_from=None) -> int:
    from pysword.modules import SwordModules

    modules = SwordModules(sword_dir)
    found = modules.parse_modules()
    for name in (ES_MODULE, EN_MODULE):
        if name not in found:
            print(
                f"error: module {name} not found in {sword_dir} (found: {', '.join(found) or 'none'})", file=sys.stderr
            )
            return 1
    es = {ref: clean(raw) for ref, raw in verses(modules.get_bible_from_module(ES_MODULE))}
    en_bible = modules.get_bible_from_module(EN_MODULE)
    en = {ref: clean(raw) for ref, raw in verses(en_bible)}

    pairs, empty, ratio_dropped = [], 0, []
    for ref, s in es.items():  # Spanish (KJV versification) order; WEB has more books (deuterocanon)
        t = en.get(ref)
        if t is None:
            continue
        if not s or not t:
            empty += 1
            continue
        a, b = len(s.split()), len(t.split())
        if max(a, b) > MAX_RATIO * min(a, b):
            ratio_dropped.append(ref)
            continue
        pairs.append((ref, s, t))

    if refs_from:
        wanted = read_refs(refs_from)
        by_ref = {ref: (ref, s, t) for ref, s, t in pairs}
        lost = [r for refs in wanted.values() for r in refs if r not in by_ref]
        if lost:
            print(f"error: {len(lost)} listed verses were not extracted, e.g. {lost[:5]}", file=sys.stderr)
            return 1
        listed = {r for refs in wanted.values() for r in refs}
        held = [ref for ref, _, _ in pairs if ref not in listed]
        print(f"splits from {refs_from}: {len(held)} extracted pairs are in none of its splits (held back)")
        split_pairs = [(split, by_ref[r]) for split, refs in wanted.items() for r in refs]
    else:
        split_pairs = [(split_of(p[0]), p) for p in pairs]

    os.makedirs(out_dir, exist_ok=True)
    out = {
        split: {
            side: open(os.path.join(out_dir, f"{split}.{side}"), "w", encoding="utf-8") for side in ("es", "en", "ref")
        }
        for split in ("train", "valid", "test")
    }
    counts = {"train": 0, "valid": 0, "test": 0}
    for split, (ref, s, t) in split_pairs:
        counts[split] += 1
        for side, text in (("es", s), ("en", t), ("ref", ref)):
            out[split][side].write(text + "\n")
    for files in out.values():
        for f in files.values():
            f.close()
    print(f"verses: {len(es)} Spanish, {len(en)} English, {sum(1 for r in es if r in en)} with the same reference")
    print(
        f"dropped: {empty} pairs with an empty side, {len(ratio_dropped)} with word-count ratio > {MAX_RATIO:g}"
        + (f" ({', '.join(ratio_dropped)})" if ratio_dropped else "")
    )
    print(f"kept {len(pairs)} pairs; written: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sword_dir")
    ap.add_argument("out_dir")
    ap.add_argument("--refs-from", help="take the split membership and order from DIR/{train,valid,test}.ref[.xz]")
    a = ap.parse_args()
    sys.exit(main(a.sword_dir, a.out_dir, a.refs_from))
