#!/usr/bin/env python3
"""Helpers of scripts/demo.sh (each a subcommand; all write their outputs atomically or not at all).

    check-corpus DIR                 every split present, .es/.en/.ref aligned, no empty line, unique refs,
                                     SHA256SUMS (if DIR has one) matched
    spm-train MODEL_PREFIX VOCAB FILE...   joint sentencepiece unigram model on the given files
    spm-encode MODEL IN OUT          one line in, one line of pieces out
    collect GENERATE_OUT SPM_MODEL N OUT   hypotheses of fairseq-generate, decoded, in input order; fails
                                     unless there is exactly one hypothesis for each of the N input lines
    score HYP REF OUT_TXT OUT_JSON   sacrebleu BLEU and chrF (default settings: 13a tokenisation) with signatures
"""
import hashlib
import json
import lzma
import os
import sys
from pathlib import Path

SPLITS = ("train", "valid", "test")
BUNDLED_CORPUS = Path(__file__).resolve().parent.parent / "data" / "bible-es-en"
SIDES = ("es", "en", "ref")


class DemoError(Exception):
    pass


def read_lines(path):
    """The lines of PATH, or of PATH.xz when only the compressed copy exists (the bundled corpus ships as .xz).
    Also imported by scripts/study.py and benchmarks/bench_e2e.py."""
    path = Path(path)
    if not path.exists() and Path(str(path) + ".xz").exists():
        with lzma.open(str(path) + ".xz", "rt", encoding="utf-8") as f:
            return f.read().splitlines()
    return path.read_text(encoding="utf-8").splitlines()


def _count_lines(path):
    n, empty = 0, []
    with open(path, encoding="utf-8", newline="\n") as f:
        for i, line in enumerate(f, 1):
            n += 1
            if not line.strip():
                empty.append(i)
            elif not line.endswith("\n"):
                raise DemoError(f"{path}: last line has no newline")
    return n, empty


def check_corpus(d):
    """Raise DemoError describing every problem found; return {split: line count}."""
    problems, counts, refs = [], {}, {}
    for split in SPLITS:
        n_side = {}
        for side in SIDES:
            path = os.path.join(d, f"{split}.{side}")
            if not os.path.isfile(path):
                problems.append(f"missing file {path}")
                continue
            try:
                n, empty = _count_lines(path)
            except (UnicodeDecodeError, DemoError) as e:
                problems.append(f"{path}: {e}")
                continue
            if n == 0:
                problems.append(f"{path}: empty file")
            if empty:
                problems.append(f"{path}: {len(empty)} empty line(s), first at line {empty[0]}")
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
                        problems.append(f"verse {r} appears twice ({refs[r]} and {split})")
                        break
                    refs[r] = split
    sums = os.path.join(d, "SHA256SUMS")
    if not problems and os.path.isfile(sums):
        with open(sums) as f:
            for line in f:
                if not line.strip():
                    continue
                want, name = line.split()
                name = name.lstrip("*")
                with open(os.path.join(d, name), "rb") as g:
                    got = hashlib.sha256(g.read()).hexdigest()
                if got != want:
                    problems.append(f"{name}: sha256 {got} differs from SHA256SUMS ({want})")
    if problems:
        raise DemoError("corpus check failed in " + d + ":\n  " + "\n  ".join(problems))
    return counts


def spm_train(prefix, vocab, files):
    import sentencepiece as spm
    spm.SentencePieceTrainer.train(
        input=",".join(files), model_prefix=prefix, vocab_size=int(vocab), model_type="unigram",
        character_coverage=1.0, input_sentence_size=0, shuffle_input_sentence=False,
        num_threads=os.cpu_count() or 1, minloglevel=1)


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


def score(hyp, ref, out_txt, out_json, extra_json="{}"):
    from sacrebleu.metrics import BLEU, CHRF
    with open(hyp, encoding="utf-8") as f:
        hyps = [l.rstrip("\n") for l in f]
    with open(ref, encoding="utf-8") as f:
        refs = [l.rstrip("\n") for l in f]
    if len(hyps) != len(refs):
        raise DemoError(f"{hyp}: {len(hyps)} lines, reference {ref}: {len(refs)} lines")
    bleu, chrf = BLEU(), CHRF()
    b, c = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    result = dict(json.loads(extra_json), lines=len(hyps),
                  bleu=round(b.score, 2), bleu_signature=str(bleu.get_signature()), bleu_full=str(b),
                  chrf=round(c.score, 2), chrf_signature=str(chrf.get_signature()), chrf_full=str(c))
    text = f"BLEU {b.score:.2f}  {bleu.get_signature()}\n{b}\nchrF {c.score:.2f}  {chrf.get_signature()}\n{c}\n"
    for path, content in ((out_txt, text), (out_json, json.dumps(result, indent=2) + "\n")):
        with open(path + ".tmp", "w", encoding="utf-8") as g:
            g.write(content)
        os.replace(path + ".tmp", path)
    print(text, end="")


def main(argv):
    cmd, args = argv[0], argv[1:]
    try:
        if cmd == "check-corpus":
            counts = check_corpus(args[0])
            print("[demo] corpus ok: " + ", ".join(f"{s} {n}" for s, n in counts.items()) + " lines")
        elif cmd == "spm-train":
            spm_train(args[0], args[1], args[2:])
        elif cmd == "spm-encode":
            spm_encode(*args)
        elif cmd == "collect":
            collect(*args)
        elif cmd == "score":
            score(*args)
        else:
            raise DemoError(f"unknown command {cmd!r}")
    except DemoError as e:
        print(f"[demo] ERROR: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
