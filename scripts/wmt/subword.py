"""Joint sentencepiece subwords, and the length/ratio filter of Moses' clean-corpus-n.perl.

    subword.py train --model-prefix P --vocab-size N --model-type unigram|bpe TRAIN_FILE...
    subword.py encode --model P.model IN OUT [IN OUT ...]
    subword.py filter SRC_IN TGT_IN SRC_OUT TGT_OUT [--min-len 1] [--max-len 250] [--ratio 1.5]

The filter counts subword tokens (as fairseq's script, which filters after BPE) and drops a pair when either
side has fewer than --min-len or more than --max-len tokens, or one side is more than --ratio times as long
as the other.
"""

import argparse
import json
import os
import re

from wmt_common import count_lines, die, iter_lines, log, main_guard, progress

# What sentencepiece accepts: vocab_size is an int32 and must exceed the corpus' required characters (100 is a
# floor well below any real corpus; above a million pieces the embedding matrix alone outgrows a GPU);
# character_coverage outside [0.98, 1] fails its trainer. scripts/prepare-wmt14en2de.sh checks the same ranges.
VOCAB_SIZE_RANGE = (100, 1_000_000)
COVERAGE_RANGE = (0.98, 1.0)


def vocab_size_arg(text: str) -> int:
    lo, hi = VOCAB_SIZE_RANGE
    if not re.fullmatch(r"\d{1,9}", text) or not lo <= int(text) <= hi:
        raise argparse.ArgumentTypeError(f"must be an integer from {lo} to {hi}, got {text!r}")
    return int(text)


def coverage_arg(text: str) -> float:
    lo, hi = COVERAGE_RANGE
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not lo <= value <= hi:
        raise argparse.ArgumentTypeError(f"must be a number from {lo} to {hi}, got {text!r}")
    return value


def cmd_train(args):
    from fairseq_moec.pipeline import files, subwords

    for path in args.inputs:
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            die(f"sentencepiece training input missing or empty: {path}")
    log(
        f"[subword] training a joint sentencepiece {args.model_type} model, vocabulary {args.vocab_size}, "
        f"on {', '.join(args.inputs)} (sampling at most {args.input_sentence_size} sentences)"
    )
    try:
        subwords.train_sentencepiece(
            args.inputs,
            args.model_prefix,
            args.vocab_size,
            args.model_type,
            args.character_coverage,
            args.input_sentence_size,
            shuffle=True,
            threads=args.threads,
            log_level=0 if args.verbose else 1,
        )
    except files.PipelineError as e:
        die(f"{e}" + (" (lower --vocab-size for a corpus this small)" if "ocabulary size" in str(e) else ""))


def cmd_encode(args):
    from fairseq_moec.pipeline import subwords

    if len(args.files) % 2:
        die("expected pairs of input and output paths")
    sp = subwords.load(args.model)
    for src, dst in zip(args.files[::2], args.files[1::2]):
        if not os.path.isfile(src):
            die(f"input not found: {src}")
        with progress(total=count_lines(src), unit=" lines", desc=f"encode {os.path.basename(src)}") as bar:
            subwords.encode_file(sp, src, dst, args.threads, progress=bar.update)


def keep_pair(n_src: int, n_tgt: int, min_len: int, max_len: int, ratio: float) -> bool:
    if not (min_len <= n_src <= max_len and min_len <= n_tgt <= max_len):
        return False
    return n_src <= ratio * n_tgt and n_tgt <= ratio * n_src


def cmd_filter(args):
    n_src, n_tgt = count_lines(args.src_in), count_lines(args.tgt_in)
    if n_src != n_tgt:
        die(f"cannot filter: {args.src_in} has {n_src} lines but {args.tgt_in} has {n_tgt}")
    kept = dropped = 0
    with (
        open(args.src_out, "w", encoding="utf-8", newline="\n") as fs,
        open(args.tgt_out, "w", encoding="utf-8", newline="\n") as ft,
    ):
        for s, t in progress(
            zip(iter_lines(args.src_in), iter_lines(args.tgt_in)),
            total=n_src,
            unit=" pairs",
            desc=f"filter {os.path.basename(args.src_in)}",
        ):
            if keep_pair(len(s.split()), len(t.split()), args.min_len, args.max_len, args.ratio):
                fs.write(s + "\n")
                ft.write(t + "\n")
                kept += 1
            else:
                dropped += 1
    if kept == 0:
        die(
            f"the length/ratio filter dropped every pair of {args.src_in} (--min-len {args.min_len} "
            f"--max-len {args.max_len} --ratio {args.ratio})"
        )
    log(f"[filter] {os.path.basename(args.src_in)}: kept {kept} of {n_src} pairs, dropped {dropped}")
    if args.stats:
        with open(args.stats, "w") as f:
            json.dump({"input": n_src, "kept": kept, "dropped": dropped}, f)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("inputs", nargs="+")
    t.add_argument("--model-prefix", required=True)
    t.add_argument("--vocab-size", type=vocab_size_arg, required=True)
    t.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    t.add_argument("--character-coverage", type=coverage_arg, default=0.9999)
    t.add_argument("--input-sentence-size", type=int, default=10_000_000)
    t.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    t.add_argument("--verbose", action="store_true")
    e = sub.add_parser("encode")
    e.add_argument("files", nargs="+", help="pairs of input and output paths")
    e.add_argument("--model", required=True)
    e.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    f = sub.add_parser("filter")
    f.add_argument("src_in")
    f.add_argument("tgt_in")
    f.add_argument("src_out")
    f.add_argument("tgt_out")
    f.add_argument("--min-len", type=int, default=1)
    f.add_argument("--max-len", type=int, default=250)
    f.add_argument("--ratio", type=float, default=1.5)
    f.add_argument("--stats", help="write the kept/dropped counts to this JSON file")
    args = ap.parse_args()
    {"train": cmd_train, "encode": cmd_encode, "filter": cmd_filter}[args.cmd](args)


if __name__ == "__main__":
    main_guard(main)
