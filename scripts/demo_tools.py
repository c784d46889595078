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
    spm-encode MODEL IN OUT          one line in, one line of pieces out
    collect GENERATE_OUT SPM_MODEL N OUT   hypotheses of fairseq-generate, decoded, in input order; fails
                                     unless there is exactly one hypothesis for each of the N input lines
    score HYP REF OUT_TXT OUT_JSON [--tgt-lang T] [--tokenize TOK] [--meta KEY=VALUE ...]
                                     sacrebleu BLEU and chrF with signatures; BLEU's tokenizer is sacrebleu's
                                     choice for the target language (13a, zh for zh, ja-mecab, ko-mecab) unless
                                     --tokenize names one

A corpus directory holds {train,valid,test}.{S,T} (aligned: line i of one side translates line i of the other),
each plain or compressed (NAME.xz or NAME.gz), optionally {train,valid,test}.ref (one unique id per line, as the
bundled corpus has) and SHA256SUMS (sha256sum format, listing corpus files as decompressed or as they are).
"""
import argparse
import gzip
import hashlib
import json
import lzma
import os
import re
import shutil
import sys
from pathlib import Path

SPLITS = ("train", "valid", "test")
BUNDLED_CORPUS = Path(__file__).resolve().parent.parent / "data" / "bible-es-en"
SIDES = ("es", "en", "ref")  # the bundled corpus
COMPRESSED = {".xz": lzma.open, ".gz": gzip.open}
# fairseq names its files SPLIT.SRC-TGT.LANG.bin: a '-' or '.' in a code would make those names ambiguous
LANG_CODE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,19}$")
SHA256SUMS_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


class DemoError(Exception):
    pass


def read_lines(path):
    """The lines of PATH, or of PATH.xz / PATH.gz when only a compressed copy exists (the bundled corpus ships
    as .xz). Also imported by scripts/study.py and benchmarks/bench_e2e.py."""
    path = Path(path)
    if not path.exists():
        for ext, opener in COMPRESSED.items():
            if Path(str(path) + ext).exists():
                with opener(str(path) + ext, "rt", encoding="utf-8") as f:
                    return f.read().splitlines()
    return path.read_text(encoding="utf-8").splitlines()


# --- languages ---------------------------------------------------------------------------------------------------
def check_lang_code(code, var):
    if not LANG_CODE.match(code or ""):
        raise DemoError(f"{var}={code!r} is not usable as a language code: 1-20 letters, digits or '_', starting "
                        f"with a letter (fairseq's file names join the two codes with '-'), e.g. de, fr, pt_BR")
    if code == "ref":
        raise DemoError(f"{var}=ref: 'ref' names the corpus' id files (SPLIT.ref), not a language")


def bleu_metric(tgt_lang, tokenize=None):
    """sacrebleu's BLEU for target language TGT_LANG: its tokenizer is TOKENIZE, or sacrebleu's default for the
    language (what `sacrebleu -l SRC-TGT` picks: zh, ja-mecab, ko-mecab, else 13a)."""
    from sacrebleu.metrics import BLEU
    if tokenize and tokenize not in BLEU.TOKENIZERS:
        raise DemoError(f"DEMO_BLEU_TOKENIZE={tokenize!r} is not a sacrebleu tokenizer; one of: "
                        + ", ".join(BLEU.TOKENIZERS))
    chosen = tokenize or BLEU._TOKENIZER_MAP.get(tgt_lang, BLEU.TOKENIZER_DEFAULT)
    try:
        return BLEU(trg_lang=tgt_lang, tokenize=tokenize or None)
    except Exception as e:  # a missing optional dependency (MeCab) or a model sacrebleu would download
        detail = " ".join(str(e).split())
        raise DemoError(f"sacrebleu's BLEU tokenizer {chosen!r} (for target language {tgt_lang!r}) cannot run "
                        f"here: {detail}. Install what it needs, or choose another with DEMO_BLEU_TOKENIZE "
                        f"(e.g. char or intl)") from None


def check_langs(src, tgt, tokenize=None):
    check_lang_code(src, "DEMO_SRC")
    check_lang_code(tgt, "DEMO_TGT")
    if src == tgt:
        raise DemoError(f"DEMO_SRC and DEMO_TGT are both {src!r}: the two sides need different codes")
    bleu_metric(tgt, tokenize)


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
        raise DemoError(f"corpus {d} has .ref files for some splits only (" + ", ".join(
            f"{s}.ref {'present' if p else 'missing'}" for s, p in refs.items()) + "): give all three or none")
    names = corpus_names(src, tgt, all(refs.values()))
    sources = {name: find(name) for name in names}
    missing = [name for name, path in sources.items() if path is None]
    if missing:
        raise DemoError(f"corpus {d} lacks {', '.join(missing)} (want {{train,valid,test}}.{{{src},{tgt}}}, "
                        f"each plain, .xz or .gz; DEMO_SRC={src} DEMO_TGT={tgt})")
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
                problems.append(f"{sums} line {n}: expected '<64 hex digits>  <file name>' (sha256sum format), "
                                f"got {line[:80]!r}")
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
            problems.append(f"split {split!r} is misaligned: line counts "
                            + ", ".join(f"{split}.{s}={n}" for s, n in n_side.items()))
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


# --- sentencepiece, generation, scores ---------------------------------------------------------------------------
def spm_train(prefix, vocab, files):
    import sentencepiece as spm
    try:
        spm.SentencePieceTrainer.train(
            input=",".join(files), model_prefix=prefix, vocab_size=int(vocab), model_type="unigram",
            character_coverage=1.0, input_sentence_size=0, shuffle_input_sentence=False,
            num_threads=os.cpu_count() or 1, minloglevel=1)
    except RuntimeError as e:  # sentencepiece's message ends in the fix ("Please set it to a value <= N")
        raise DemoError(f"sentencepiece training on {', '.join(files)} failed: {' '.join(str(e).split())}"
                        + (" (DEMO_VOCAB)" if "ocabulary size" in str(e) else "")) from None


def spm_encode(model, src, dst):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=model)
    tmp = dst + ".tmp"
    with open(src, encoding="utf-8") as f, open(tmp, "w", encoding="utf-8") as g:
        for line in f:
            g.write(" ".join(sp.encode(line.rstrip("\n"), out_type=str)) + "\n")
    os.replace(tmp, dst)


def collect(gen_out, model, n, out):
    """Parse the H-<id> lines of fairseq-generate, decode the pieces, write them in input order."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=model)
    n = int(n)
    hyps = {}
    with open(gen_out, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("H-"):
                continue
            head, _score, *text = line.rstrip("\n").split("\t")
            i = int(head[2:])
            if i in hyps:
                raise DemoError(f"{gen_out}: two hypotheses for sentence {i}")
            hyps[i] = sp.decode_pieces(text[0].split()) if text else ""
    missing = [i for i in range(n) if i not in hyps]
    extra = sorted(set(hyps) - set(range(n)))
    if missing or extra:
        raise DemoError(f"{gen_out}: {len(hyps)} hypotheses for {n} test lines"
                        + (f"; missing ids {missing[:10]}{' ...' if len(missing) > 10 else ''}" if missing else "")
                        + (f"; unexpected ids {extra[:10]}" if extra else ""))
    tmp = out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as g:
        for i in range(n):
            g.write(hyps[i] + "\n")
    os.replace(tmp, out)
    print(f"[demo] {n} hypotheses for {n} test lines, in input order: {out}")


def score(hyp, ref, out_txt, out_json, meta=None, tgt_lang="", tokenize=None):
    """BLEU (tokenizer: see bleu_metric) and chrF of HYP against REF; META: extra entries of the JSON."""
    from sacrebleu.metrics import CHRF
    with open(hyp, encoding="utf-8") as f:
        hyps = [l.rstrip("\n") for l in f]
    with open(ref, encoding="utf-8") as f:
        refs = [l.rstrip("\n") for l in f]
    if len(hyps) != len(refs):
        raise DemoError(f"{hyp}: {len(hyps)} lines, reference {ref}: {len(refs)} lines")
    bleu, chrf = bleu_metric(tgt_lang, tokenize), CHRF()
    b, c = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    result = dict(meta or {}, lines=len(hyps),
                  bleu=round(b.score, 2), bleu_signature=str(bleu.get_signature()), bleu_full=str(b),
                  chrf=round(c.score, 2), chrf_signature=str(chrf.get_signature()), chrf_full=str(c))
    text = f"BLEU {b.score:.2f}  {bleu.get_signature()}\n{b}\nchrF {c.score:.2f}  {chrf.get_signature()}\n{c}\n"
    for path, content in ((out_txt, text), (out_json, json.dumps(result, indent=2) + "\n")):
        with open(path + ".tmp", "w", encoding="utf-8") as g:
            g.write(content)
        os.replace(path + ".tmp", path)
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
    ap = argparse.ArgumentParser(prog="demo_tools.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
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
    for a in ("model", "input", "output"):
        p.add_argument(a)
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
    p.add_argument("--meta", type=meta_item, action="append", default=[], metavar="KEY=VALUE",
                   help="an extra entry of the results JSON (repeatable)")
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
            spm_encode(args.model, args.input, args.output)
        elif args.cmd == "collect":
            collect(args.generate_out, args.spm_model, args.n, args.out)
        elif args.cmd == "score":
            score(args.hyp, args.ref, args.out_txt, args.out_json, dict(args.meta), args.tgt_lang, args.tokenize)
    except (DemoError, OSError) as e:
        ap.exit(1, f"{ap.prog}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
