"""Moses-style preprocessing with sacremoses: normalize punctuation, remove non-printing characters, tokenize.

    normalize_tokenize.py --lang en IN OUT [IN OUT ...] [--workers N]

The same steps as fairseq's prepare-wmt14en2de.sh (normalize-punctuation.perl, remove-non-printing-char.perl,
tokenizer.perl -a), without XML escaping (escape=False): sentencepiece follows, and evaluation undoes the
tokenization with the Moses detokenizer. Output has exactly one line per input line.
"""

import argparse
import multiprocessing as mp
import os

import regex
from wmt_common import count_lines, die, iter_lines, log, main_guard, progress

_NON_PRINTING = regex.compile(r"\p{C}")  # what remove-non-printing-char.perl replaces by a space
_SPACES = regex.compile(r"\s+")
_worker = None


class Preprocessor:
    def __init__(self, lang: str):
        from sacremoses import MosesPunctNormalizer, MosesTokenizer

        self.normalizer = MosesPunctNormalizer(lang=lang)
        self.tokenizer = MosesTokenizer(lang=lang)

    def __call__(self, line: str) -> str:
        line = _NON_PRINTING.sub(" ", self.normalizer.normalize(line))
        line = _SPACES.sub(" ", line).strip()
        if not line:
            return ""
        return self.tokenizer.tokenize(line, aggressive_dash_splits=True, escape=False, return_str=True)


def _init(lang: str) -> None:
    global _worker
    _worker = Preprocessor(lang)


def _chunk(lines):
    return [_worker(line) for line in lines]


def _chunks(path: str, size: int):
    chunk = []
    for line in iter_lines(path):
        chunk.append(line)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def tokenize_file(src: str, dst: str, lang: str, workers: int, chunk_size: int, pool) -> None:
    if not os.path.isfile(src):
        die(f"input not found: {src}")
    total, written, name = count_lines(src), 0, os.path.basename(src)
    with (
        open(dst, "w", encoding="utf-8", newline="\n") as out,
        progress(total=total, unit=" lines", desc=f"tokenize {name}") as bar,
    ):
        if pool is not None and total > chunk_size:
            results = pool.imap(_chunk, _chunks(src, chunk_size))  # imap keeps the order
        else:
            results = map(_chunk, _chunks(src, chunk_size))
        for done in results:
            out.writelines(line + "\n" for line in done)
            written += len(done)
            bar.update(len(done))
    if written != total:
        die(f"tokenizing {src}: wrote {written} lines for {total} input lines")
    log(f"[tokenize] {name} ({lang}): {written} lines")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+", help="pairs of input and output paths")
    ap.add_argument("--lang", required=True)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--chunk-size", type=int, default=2000)
    args = ap.parse_args()
    if len(args.files) % 2:
        die("expected pairs of input and output paths")
    _init(args.lang)  # the main process tokenizes small files itself
    pool = mp.Pool(args.workers, initializer=_init, initargs=(args.lang,)) if args.workers > 1 else None
    try:
        for src, dst in zip(args.files[::2], args.files[1::2]):
            tokenize_file(src, dst, args.lang, args.workers, args.chunk_size, pool)
    finally:
        if pool is not None:
            pool.terminate()


if __name__ == "__main__":
    main_guard(main)
