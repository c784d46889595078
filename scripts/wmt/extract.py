"""Read the WMT'14 en-de corpora out of the verified archives into plain parallel text files.

    extract.py --orig DIR --out DIR [--nc-version 9|12] [--holdout-every N]

Writes OUT/{train,valid,test}.{en,de} and OUT/counts.json. Train: Europarl v7 + Common Crawl + News
Commentary v9 (v12 for the WMT'17 variant), concatenated in that order. Valid: newstest2013 from dev.tgz, or
with --holdout-every N every N-th training pair (and those pairs leave train), as fairseq's script does.
Test: newstest2014 ("full", 3003 sentences) from the sgm files of test-full.tgz, cleaned exactly like
sacrebleu's wmt14/full, so the raw test.de is the reference that sacrebleu scores against.

Archives are streamed once each (only the needed members are read; nothing is unpacked to disk), and the bytes
read are hashed on the way: they must match the sha256 that fetch.py recorded in ORIG/FILE.sha256 when it
verified the file, so an archive replaced after verification (ORIG/FILE may be a link to an --archives copy)
is refused rather than used unverified. Lines are split on '\\n' only. Any inconsistency is an error: a
missing member, a source/target line-count mismatch, an empty corpus, a malformed sgm file, or a truncated
archive.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import tarfile
import zlib
from typing import Dict, List, Tuple

from wmt_common import count_lines, die, iter_lines, log, main_guard, progress, read_lines, write_lines

SRC, TGT = "en", "de"


def train_corpora(nc_version: int) -> List[Tuple[str, str, str]]:
    """(name, archive, member prefix): the member is PREFIX.en / PREFIX.de."""
    nc = {
        9: ("news-commentary-v9", "training-parallel-nc-v9.tgz", "training/news-commentary-v9.de-en"),
        12: ("news-commentary-v12", "training-parallel-nc-v12.tgz", "training/news-commentary-v12.de-en"),
    }
    return [
        ("europarl-v7", "training-parallel-europarl-v7.tgz", "training/europarl-v7.de-en"),
        ("commoncrawl", "training-parallel-commoncrawl.tgz", "commoncrawl.de-en"),
        nc[nc_version],
    ]


DEV = ("newstest2013", "dev.tgz", "dev/newstest2013")
TEST = (
    "newstest2014",
    "test-full.tgz",
    {SRC: "test-full/newstest2014-deen-src.en.sgm", TGT: "test-full/newstest2014-deen-ref.de.sgm"},
)


def archives_needed(nc_version: int, holdout_every: int) -> List[str]:
    names = [a for _, a, _ in train_corpora(nc_version)]
    if not holdout_every:
        names.append(DEV[1])
    return names + [TEST[1]]


# ---------------------------------------------------------------------------------------------- archives


class HashingReader:
    """A binary file read through ``read``, hashing every byte it returns (what tarfile's stream mode needs)."""

    def __init__(self, f):
        self.f, self.sha256 = f, hashlib.sha256()

    def read(self, size=-1):
        data = self.f.read(size)
        self.sha256.update(data)
        return data

    def hexdigest_to_end(self) -> str:
        """The sha256 of the whole file: read (and hash) what the reader has not consumed yet."""
        for _ in iter(lambda: self.read(1 << 22), b""):
            pass
        return self.sha256.hexdigest()


def verified_sha256(archive: str) -> str:
    """The sha256 recorded by fetch.py when it verified ``archive`` (ORIG/FILE.sha256, 'HEX  FILE')."""
    record = archive + ".sha256"
    if not os.path.isfile(record):
        die(
            f"archive {archive} was never verified (no {os.path.basename(record)} beside it): fetch it with "
            f"scripts/prepare-wmt14en2de.sh, which verifies its checksum"
        )
    with open(record, encoding="utf-8") as f:
        return f.read().split()[0]


def check_unchanged(archive: str, got: str, want: str) -> None:
    if got != want:
        target = os.path.realpath(archive)
        die(
            f"archive {archive}{f' (a link to {target})' if target != os.path.abspath(archive) else ''} changed "
            f"after it was verified: its sha256 is now {got}, verified {want}. Put the verified file back, or "
            f"delete {archive} and {archive}.sha256 and rerun to verify the new one"
        )


def read_members(archive: str, wanted: Dict[str, str], parts: str) -> Dict[str, str]:
    """Stream ``archive`` once and copy each wanted member (member -> label) to PARTS/label, one line per
    line; return {member: path of the copy}. Lines are split on '\\n' only; invalid UTF-8 is replaced (and
    counted) rather than fatal, because the real Common Crawl release has a few such bytes."""
    found: Dict[str, str] = {}
    names: List[str] = []
    want_sha = verified_sha256(archive)
    raw_file = open(archive, "rb")
    reader = HashingReader(raw_file)
    try:
        with tarfile.open(fileobj=reader, mode="r|*") as tar:
            for m in tar:
                name = m.name[2:] if m.name.startswith("./") else m.name
                names.append(name)
                if name not in wanted or not m.isfile():
                    continue
                dest, bad = os.path.join(parts, wanted[name]), 0
                with (
                    open(dest, "w", encoding="utf-8", newline="\n") as out,
                    progress(total=m.size, unit="B", unit_scale=True, desc=f"read {wanted[name]}", leave=False) as bar,
                ):
                    for raw in tar.extractfile(m):
                        bar.update(len(raw))
                        raw = raw.rstrip(b"\n")
                        if raw.endswith(b"\r"):  # CRLF line end; a '\r' inside a line stays (tokenizing removes it)
                            raw = raw[:-1]
                        try:
                            line = raw.decode("utf-8")
                        except UnicodeDecodeError:
                            bad += 1
                            line = raw.decode("utf-8", errors="replace")
                        out.write(line)
                        out.write("\n")
                if bad:
                    log(f"[extract] {name}: {bad} lines with invalid UTF-8 (bytes replaced by U+FFFD)")
                found[name] = dest
        check_unchanged(archive, reader.hexdigest_to_end(), want_sha)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        check_unchanged(archive, reader.hexdigest_to_end(), want_sha)  # a replaced file explains the error best
        die(
            f"archive {archive} is truncated or corrupt ({type(e).__name__}: {e}). Delete it and rerun "
            f"to fetch it again"
        )
    finally:
        raw_file.close()
    missing = [w for w in wanted if w not in found]
    if missing:
        stem = os.path.basename(missing[0]).split(".")[0]
        near = [n for n in names if stem in n][:5]
        die(
            f"archive {archive} has no member {missing[0]}"
            + (f" (similar: {', '.join(near)})" if near else "")
            + "; is it the right archive?"
        )
    return found


def read_pair(orig: str, label: str, archive: str, members: Dict[str, str], parts: str) -> Dict[str, str]:
    """members: lang -> member path. Returns lang -> path of the copied text, with equal, non-zero counts."""
    path = os.path.join(orig, archive)
    if not os.path.exists(path):
        die(f"archive not fetched: {path}")
    got = read_members(path, {m: f"{label}.{lang}" for lang, m in members.items()}, parts)
    out = {lang: got[m] for lang, m in members.items()}
    n_src, n_tgt = count_lines(out[SRC]), count_lines(out[TGT])
    if n_src != n_tgt:
        die(
            f"{label}: {n_src} {SRC} lines but {n_tgt} {TGT} lines in {archive} ({members[SRC]} vs "
            f"{members[TGT]}): the corpus is misaligned"
        )
    if n_src == 0:
        die(f"{label}: {members[SRC]} and {members[TGT]} in {archive} are empty")
    return out


# ---------------------------------------------------------------------------------------------- sgm

_SEG = re.compile(r"^<seg\b([^>]*)>(.*)</seg>\s*$")
_SEG_ID = re.compile(r"""\bid\s*=\s*["']?([^"'\s>]+)""")
_DOCID = re.compile(r"""\bdocid\s*=\s*["']([^"']*)["']""")


def clean_segment(text: str) -> str:
    """sacrebleu's cleaning of WMT's fake-SGML segments: strip, collapse whitespace (no entity decoding)."""
    return re.sub(r"\s+", " ", text.strip())


def parse_sgm(lines: List[str], where: str) -> List[Tuple[Tuple[str, str], str]]:
    """[((docid, segid), text)] of a WMT test-set sgm file, checked strictly (one <seg> per line, inside a
    <doc docid=...>, unique ids). Errors name the file and line."""
    segs, seen = [], set()
    docid = None
    for n, line in enumerate(lines, 1):
        s = line.strip()
        if s.startswith("<doc"):
            m = _DOCID.search(s)
            if not m:
                die(f"{where}:{n}: <doc> without a docid attribute: {s[:80]!r}")
            docid = m.group(1)
        elif s.startswith("</doc"):
            docid = None
        elif "<seg" in s or "</seg>" in s:
            m = _SEG.match(s)
            if not m or "<seg" in m.group(2) or "</seg>" in m.group(2):
                die(f"{where}:{n}: malformed segment, expected '<seg id=\"N\">text</seg>' on one line: {s[:80]!r}")
            if docid is None:
                die(f"{where}:{n}: <seg> outside of a <doc>")
            idm = _SEG_ID.search(m.group(1))
            if not idm:
                die(f"{where}:{n}: <seg> without an id: {s[:80]!r}")
            key = (docid, idm.group(1))
            if key in seen:
                die(f"{where}:{n}: duplicate segment id {idm.group(1)} in document {docid}")
            seen.add(key)
            segs.append((key, clean_segment(m.group(2))))
    if not segs:
        die(f"{where}: no <seg> lines (empty or not a WMT sgm file)")
    return segs


def read_test(orig: str, parts: str) -> Dict[str, List[str]]:
    label, archive, members = TEST
    path = os.path.join(orig, archive)
    if not os.path.exists(path):
        die(f"archive not fetched: {path}")
    got = read_members(path, {m: f"{label}.{lang}.sgm" for lang, m in members.items()}, parts)
    parsed = {lang: parse_sgm(read_lines(got[m], m, allow_empty=True), f"{archive}:{m}") for lang, m in members.items()}
    src, ref = parsed[SRC], parsed[TGT]
    if len(src) != len(ref):
        die(
            f"{label}: {len(src)} source segments ({members[SRC]}) but {len(ref)} reference segments "
            f"({members[TGT]}): the test set is misaligned"
        )
    for (ks, _), (kr, _) in zip(src, ref):
        if ks != kr:
            die(f"{label}: source segment {ks} is paired with reference segment {kr}: the sgm files disagree")
    return {lang: [text for _, text in parsed[lang]] for lang in (SRC, TGT)}


# ---------------------------------------------------------------------------------------------- main


def concatenate(parts: List[Dict[str, str]], out: str, holdout_every: int) -> Tuple[int, int]:
    """Write OUT/train.{en,de} (and with holdout, OUT/valid.{en,de}) from the corpus copies, streaming."""
    n_train = n_valid = 0
    for lang in (SRC, TGT):
        i = n_train = n_valid = 0
        with (
            open(os.path.join(out, f"train.{lang}"), "w", encoding="utf-8", newline="\n") as train,
            open(
                os.path.join(out, f"valid.{lang}") if holdout_every else os.devnull, "w", encoding="utf-8", newline="\n"
            ) as valid,
        ):
            for corpus in parts:
                for line in iter_lines(corpus[lang]):
                    i += 1
                    if holdout_every and i % holdout_every == 0:
                        valid.write(line + "\n")
                        n_valid += 1
                    else:
                        train.write(line + "\n")
                        n_train += 1
    return n_train, n_valid


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--orig", required=True, help="directory holding the verified archives")
    ap.add_argument("--out", required=True, help="output directory (must exist)")
    ap.add_argument("--nc-version", type=int, choices=(9, 12), default=9)
    ap.add_argument(
        "--holdout-every",
        type=int,
        default=0,
        help="valid = every N-th training pair instead of newstest2013 (fairseq's script uses 100)",
    )
    args = ap.parse_args()
    if args.holdout_every < 0 or args.holdout_every == 1:
        die(f"--holdout-every must be 0 (off) or >= 2, got {args.holdout_every}")
    parts = os.path.join(args.out, "parts")
    os.makedirs(parts, exist_ok=True)

    counts = {"train_corpora": {}}
    copies = []
    for label, archive, prefix in train_corpora(args.nc_version):
        pair = read_pair(args.orig, label, archive, {SRC: f"{prefix}.{SRC}", TGT: f"{prefix}.{TGT}"}, parts)
        counts["train_corpora"][label] = count_lines(pair[SRC])
        log(f"[extract] {label}: {counts['train_corpora'][label]} sentence pairs")
        copies.append(pair)
    # The test set first: a bad sgm file should fail before minutes of concatenating the training data.
    test = read_test(args.orig, parts)
    counts["test_source"] = TEST[0] + " (test-full)"
    if args.holdout_every:
        counts["valid_source"] = f"every {args.holdout_every}th training pair"
    else:
        label, archive, prefix = DEV
        dev = read_pair(args.orig, label, archive, {SRC: f"{prefix}.{SRC}", TGT: f"{prefix}.{TGT}"}, parts)
        for lang in (SRC, TGT):
            os.replace(dev[lang], os.path.join(args.out, f"valid.{lang}"))
        counts["valid_source"] = label
    counts["train"], n_valid = concatenate(copies, args.out, args.holdout_every)
    counts["valid"] = n_valid if args.holdout_every else count_lines(os.path.join(args.out, f"valid.{SRC}"))
    for lang in (SRC, TGT):
        write_lines(os.path.join(args.out, f"test.{lang}"), test[lang])
    counts["test"] = len(test[SRC])
    for split in ("train", "valid", "test"):
        log(f"[extract] {split}: {counts[split]} sentence pairs")
    shutil.rmtree(parts)
    with open(os.path.join(args.out, "counts.json"), "w") as f:
        json.dump(counts, f, indent=2)


if __name__ == "__main__":
    main_guard(main)
