#!/usr/bin/env python3
"""Helpers of scripts/demo.sh (each a subcommand; all write their outputs atomically or not at all).

    check-langs --src S --tgt T [--tokenize TOK]
                                     the language codes are usable in file names, and sacrebleu's BLEU tokenizer
                                     for T (or TOK) is available here
    corpus-key DIR --src S --tgt T   print the key of the corpus in DIR (its file names and bytes); fails unless
                                     every {train,valid,test}.{S,T} is there, plain, .xz or .gz
    prepare-corpus DIR OUT --src S --tgt T
                                     decompress the corpus of DIR into OUT and check it (see check_corpus)
    check-corpus DIR [--src S --tgt T]   check an already decompressed corpus
    spm-train MODEL_PREFIX VOCAB FILE...   joint sentencepiece unigram model on the given files
    spm-encode MODEL IN OUT [IN OUT ...]   one line in, one line of pieces out
    preprocess TOK_DIR BIN_DIR --src S --tgt T
                                     fairseq-preprocess of TOK_DIR/{train,valid,test}.{S,T}, one joined dictionary
    collect GENERATE_OUT SPM_MODEL N OUT   hypotheses of fairseq-generate, decoded, in input order; fails
                                     unless there is exactly one hypothesis for each of the N input lines
    score HYP REF OUT_TXT OUT_JSON [--tgt-lang T] [--tokenize TOK] [--meta KEY=VALUE ...]
                                     sacrebleu BLEU and chrF with signatures; BLEU's tokenizer is sacrebleu's
                                     choice for the target language (13a, zh for zh, ja-mecab, ko-mecab) unless
                                     --tokenize names one

A corpus directory holds {train,valid,test}.{S,T} (aligned: line i of one side translates line i of the other),
each plain or compressed (NAME.xz or NAME.gz), optionally {train,valid,test}.ref (one unique id per line, as the
bundled corpus has) and SHA256SUMS (sha256sum format, listing corpus files as decompressed or as they are).

The corpus checks are the demo's own; the other steps run the shared pipeline library (fairseq_moec.pipeline), as
scripts/study.py, benchmarks/bench_e2e.py and the tests do.
"""

import argparse
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from fairseq_moec.pipeline import binarize, hypotheses, scores, subwords
from fairseq_moec.pipeline.files import COMPRESSED, PipelineError

SPLITS = binarize.SPLITS
SIDES = ("es", "en", "ref")  # the bundled corpus
# fairseq names its files SPLIT.SRC-TGT.LANG.bin: a '-' or '.' in a code would make those names ambiguous
LANG_CODE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,19}$")
SHA256SUMS_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")
DemoError = PipelineError


# --- languages ---------------------------------------------------------------------------------------------------
def check_lang_code(code, var):
    if not LANG_CODE.match(code or ""):
        raise DemoError(
            f"{var}={code!r} is not usable as a language code: 1-20 letters, digits or '_', starting "
            f"with a letter (fairseq's file names join the two codes with '-'), e.g. de, fr, pt_BR"
        )
    if code == "ref":
        raise DemoError(f"{var}=ref: 'ref' names the corpus' id files (SPLIT.ref), not a language")


def check_langs(src, tgt, tokenize=None):
    check_lang_code(src, "DEMO_SRC")
    check_lang_code(tgt, "DEMO_TGT")
    if src == tgt:
        raise DemoError(f"DEMO_SRC and DEMO_TGT are both {src!r}: the two sides need different codes")
    scores.bleu_metric(tgt, tokenize, option="DEMO_BLEU_TOKENIZE")


# --- corpus ------------------------------------------------------------------------------------------------------
def corpus_names(src, tgt, with_ref):
    """The corpus files, in the order their bytes enter the corpus key."""
    sides = (src, tgt, "ref") if with_ref else (src, tgt)
    return [f"{split}.{side}" for split in SPLITS for side in sides]


def corpus_sources(d, src, tgt):
    """{name: path} of the corpus in directory D: NAME, NAME.xz or NAME.gz for each file (exactly one of them).
    The .ref files are optional, but all three or none."""
    d = Path(d)
    if not d.is_dir():
        raise DemoError(f"corpus directory {d} not found (DEMO_CORPUS)")

    def find(name):
        found = [d / (name + ext) for ext in ("", ".xz", ".gz") if (d / (name + ext)).is_file()]
        if len(found) > 1:
            raise DemoError(f"corpus {d} has both {' and '.join(p.name for p in found)}: keep one")
        return found[0] if found else None

    refs = {split: find(f"{split}.ref") for split in SPLITS}
    if any(refs.values()) and not all(refs.values()):
        raise DemoError(
            f"corpus {d} has .ref files for some splits only ("
            + ", ".join(f"{s}.ref {'present' if p else 'missing'}" for s, p in refs.items())
            + "): give all three or none"
        )
    names = corpus_names(src, tgt, all(refs.values()))
    sources = {name: find(name) for name in names}
    missing = [name for name, path in sources.items() if path is None]
    if missing:
        raise DemoError(
            f"corpus {d} lacks {', '.join(missing)} (want {{train,valid,test}}.{{{src},{tgt}}}, "
            f"each plain, .xz or .gz; DEMO_SRC={src} DEMO_TGT={tgt})"
        )
    return sources


def corpus_key(d, src, tgt):
    """12 hex digits that change with the corpus' file names or bytes (the same key the demo always computed:
    sha1 over 'NAME\\n' + the file's bytes as stored, for each file, then SHA256SUMS)."""
    h = hashlib.sha1()
    for name, path in corpus_sources(d, src, tgt).items():
        h.update(name.encode() + b"\n")
        h.update(path.read_bytes())
    sums = Path(d) / "SHA256SUMS"
    if sums.is_file():
        h.update(sums.read_bytes())
    return h.hexdigest()[:12]


def _count_lines(path):
    n, empty = 0, []
    with open(path, encoding="utf-8", newline="\n") as f:
        for i, line in enumerate(f, 1):
            n += 1
            if not line.strip():
                empty.append(i)
            elif not line.endswith("\n"):
                raise DemoError("last line has no newline")
    return n, empty


def check_sha256sums(sums, candidates):
    """Problems found checking the sha256sum-format file SUMS; CANDIDATES: the directories a listed name may be
    in, first match wins."""
    problems = []
    with open(sums, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            m = SHA256SUMS_LINE.match(line)
            if not m:
                problems.append(
                    f"{sums} line {n}: expected '<64 hex digits>  <file name>' (sha256sum format), got {line[:80]!r}"
                )
                continue
            want, name = m.group(1).lower(), m.group(2)
            if "/" in name or name in (".", ".."):
                problems.append(f"{sums} line {n}: {name!r} is not a file name of the corpus directory")
                continue
            path = next((Path(c) / name for c in candidates if (Path(c) / name).is_file()), None)
            if path is None:
                problems.append(f"{sums} line {n} lists {name!r}, which is not in the corpus")
                continue
            digest = hashlib.sha256()
            with open(path, "rb") as g:
                for block in iter(lambda: g.read(1 << 20), b""):
                    digest.update(block)
            got = digest.hexdigest()
            if got != want:
                problems.append(f"{name}: sha256 {got} differs from SHA256SUMS ({want}, line {n})")
    return problems


def check_corpus(d, sides=SIDES, origin=None, sums_dirs=None):
    """Raise DemoError describing every problem found in the decompressed corpus in D; return {split: lines}.
    SIDES: the two languages, then optionally 'ref' (ids: unique over all splits). ORIGIN: {name: source path}
    for the messages. SHA256SUMS in D (if any) is checked, its names looked up in D, then in SUMS_DIRS."""
    origin = origin or {}
    problems, counts, refs = [], {}, {}
    for split in SPLITS:
        n_side = {}
        for side in sides:
            name = f"{split}.{side}"
            path = os.path.join(d, name)
            shown = origin.get(name, path)
            if not os.path.isfile(path):
                problems.append(f"missing file {shown}")
                continue
            try:
                n, empty = _count_lines(path)
            except (UnicodeDecodeError, DemoError) as e:
                problems.append(f"{shown}: {e}")
                continue
            if n == 0:
                problems.append(f"{shown}: empty file")
            if empty:
                problems.append(f"{shown}: {len(empty)} empty line(s), first at line {empty[0]}")
            n_side[side] = n
        if len(set(n_side.values())) > 1:
            problems.append(
                f"split {split!r} is misaligned: line counts "
                + ", ".join(f"{split}.{s}={n}" for s, n in n_side.items())
            )
        elif n_side:
            counts[split] = next(iter(n_side.values()))
        if "ref" in n_side:
            with open(os.path.join(d, f"{split}.ref"), encoding="utf-8") as f:
                for line in f:
                    r = line.strip()
                    if r in refs:
                        problems.append(f"id {r} appears twice in the .ref files ({refs[r]} and {split})")
                        break
                    refs[r] = split
    sums = os.path.join(d, "SHA256SUMS")
    if os.path.isfile(sums):
        problems += check_sha256sums(sums, [d, *(sums_dirs or [])])
    if problems:
        raise DemoError("corpus check failed in " + str(d) + ":\n  " + "\n  ".join(problems))
    return counts


def prepare_corpus(d, out, src, tgt):
    """Decompress the corpus of D into the new directory OUT, copy its SHA256SUMS, check it (check_corpus)."""
    sources = corpus_sources(d, src, tgt)
    os.makedirs(out)
    for name, path in sources.items():
        opener = COMPRESSED.get(path.suffix, open)
        try:
            with opener(path, "rb") as f, open(os.path.join(out, name), "wb") as g:
                shutil.copyfileobj(f, g, 1 << 20)
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise DemoError(f"cannot decompress {path}: {e}") from None
    if (Path(d) / "SHA256SUMS").is_file():
        shutil.copy(Path(d) / "SHA256SUMS", out)
    sides = (src, tgt, "ref") if "train.ref" in sources else (src, tgt)
    return check_corpus(out, sides, origin={n: str(p) for n, p in sources.items()}, sums_dirs=[d])


# --- sentencepiece, binarizing, generation, scores: the pipeline library ------------------------------------------
def spm_train(prefix, vocab, files):
    try:
        subwords.train_sentencepiece(files, prefix, vocab)
    except PipelineError as e:
        raise DemoError(f"{e}{' (DEMO_VOCAB)' if 'ocabulary size' in str(e) else ''}") from None


def spm_encode(model, pairs):
    sp = subwords.load(model)
    for src, dst in pairs:
        print(f"[demo]   encoding {os.path.basename(src)}", file=sys.stderr)
        subwords.encode_file(sp, src, dst)


def preprocess(tok_dir, bin_dir, src, tgt):
    """fairseq-preprocess; its log goes to stderr (the demo's stdout is its summary)."""
    cmd = [str(c) for c in binarize.preprocess_cmd(tok_dir, bin_dir, src, tgt, workers=2)]
    if subprocess.run(cmd, stdout=sys.stderr).returncode:
        raise DemoError(f"fairseq-preprocess failed (see above): {' '.join(cmd)}")


def collect(gen_out, model, n, out):
    """The hypotheses of fairseq-generate, decoded, in input order; exactly one per test line."""
    hypotheses.collect(gen_out, model, n, out)
    print(f"[demo] {n} hypotheses for {n} test lines, in input order: {out}")


def score(hyp, ref, out_txt, out_json, meta=None, tgt_lang="", tokenize=None):
    """BLEU (tokenizer: sacrebleu's for the target language unless TOKENIZE) and chrF of HYP against REF."""
    _, text = scores.score_files(hyp, ref, out_txt, out_json, meta, tgt_lang, tokenize, option="DEMO_BLEU_TOKENIZE")
    print(text, end="")


# --- command line ------------------------------------------------------------------------------------------------
def meta_item(text):
    """KEY=VALUE for the results JSON; an integer VALUE is stored as a number."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, int(value) if re.fullmatch(r"-?\d+", value) else value


def positive_int(text):
    if not re.fullmatch(r"\d+", text) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def parser():
    ap = argparse.ArgumentParser(
        prog="demo_tools.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def langs(p, required=True, default_src=None, default_tgt=None):
        p.add_argument("--src", required=required, default=default_src, help="source language code")
        p.add_argument("--tgt", required=required, default=default_tgt, help="target language code")

    p = sub.add_parser("check-langs")
    langs(p)
    p.add_argument("--tokenize", default=None, help="sacrebleu tokenizer for BLEU (default: by target language)")
    p = sub.add_parser("corpus-key")
    p.add_argument("dir")
    langs(p)
    p = sub.add_parser("prepare-corpus")
    p.add_argument("dir")
    p.add_argument("out", help="new directory for the decompressed corpus")
    langs(p)
    p = sub.add_parser("check-corpus")
    p.add_argument("dir")
    langs(p, required=False, default_src=SIDES[0], default_tgt=SIDES[1])
    p = sub.add_parser("spm-train")
    p.add_argument("prefix")
    p.add_argument("vocab", type=positive_int)
    p.add_argument("files", nargs="+")
    p = sub.add_parser("spm-encode")
    p.add_argument("model")
    p.add_argument("files", nargs="+", metavar="IN OUT", help="pairs of input and output paths")
    p = sub.add_parser("preprocess")
    p.add_argument("tok_dir")
    p.add_argument("bin_dir")
    langs(p)
    p = sub.add_parser("collect")
    p.add_argument("generate_out")
    p.add_argument("spm_model")
    p.add_argument("n", type=positive_int)
    p.add_argument("out")
    p = sub.add_parser("score")
    for a in ("hyp", "ref", "out_txt", "out_json"):
        p.add_argument(a)
    p.add_argument("--tgt-lang", default="", help="target language: chooses sacrebleu's BLEU tokenizer")
    p.add_argument("--tokenize", default=None, help="sacrebleu tokenizer for BLEU instead")
    p.add_argument(
        "--meta",
        type=meta_item,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an extra entry of the results JSON (repeatable)",
    )
    return ap


def main(argv):
    ap = parser()
    args = ap.parse_args(argv)
    try:
        if args.cmd == "check-langs":
            check_langs(args.src, args.tgt, args.tokenize)
        elif args.cmd == "corpus-key":
            print(corpus_key(args.dir, args.src, args.tgt))
        elif args.cmd in ("prepare-corpus", "check-corpus"):
            if args.cmd == "prepare-corpus":
                counts = prepare_corpus(args.dir, args.out, args.src, args.tgt)
            else:
                ref = os.path.isfile(os.path.join(args.dir, "train.ref"))
                counts = check_corpus(args.dir, (args.src, args.tgt, "ref") if ref else (args.src, args.tgt))
            print("[demo] corpus ok: " + ", ".join(f"{s} {n}" for s, n in counts.items()) + " lines")
        elif args.cmd == "spm-train":
            spm_train(args.prefix, args.vocab, args.files)
        elif args.cmd == "spm-encode":
            if len(args.files) % 2:
                ap.error("spm-encode: expected pairs of input and output paths")
            spm_encode(args.model, list(zip(args.files[::2], args.files[1::2])))
        elif args.cmd == "preprocess":
            preprocess(args.tok_dir, args.bin_dir, args.src, args.tgt)
        elif args.cmd == "collect":
            collect(args.generate_out, args.spm_model, args.n, args.out)
        elif args.cmd == "score":
            score(args.hyp, args.ref, args.out_txt, args.out_json, dict(args.meta), args.tgt_lang, args.tokenize)
    except (DemoError, OSError) as e:
        ap.exit(1, f"{ap.prog}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
