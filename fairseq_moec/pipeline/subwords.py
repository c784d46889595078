"""sentencepiece: a joint subword model trained on both sides of a corpus, and line-by-line encoding."""

import os

from .files import PipelineError, atomic_path


def train_sentencepiece(
    files,
    prefix,
    vocab_size,
    model_type="unigram",
    character_coverage=1.0,
    input_sentence_size=0,
    shuffle=False,
    threads=None,
    log_level=1,
    **options,
):
    """Train PREFIX.model / PREFIX.vocab on FILES. The defaults are the demo's: every sentence (no sampling),
    full character coverage, all cores. OPTIONS: more sentencepiece trainer options (e.g. bos_id=-1).
    The number of threads is part of the result: the trainer sums its statistics per thread."""
    import sentencepiece as spm

    files = [str(f) for f in files]
    try:
        spm.SentencePieceTrainer.train(
            input=",".join(files),
            model_prefix=str(prefix),
            vocab_size=int(vocab_size),
            model_type=model_type,
            character_coverage=character_coverage,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=shuffle,
            num_threads=threads or os.cpu_count() or 1,
            minloglevel=log_level,
            **options,
        )
    except RuntimeError as e:  # sentencepiece's message ends in the fix ("Please set it to a value <= N")
        raise PipelineError(
            f"sentencepiece training on {', '.join(files)} failed: {' '.join(str(e).split())}"
        ) from None


def load(model):
    import sentencepiece as spm

    if not os.path.isfile(model):
        raise PipelineError(f"sentencepiece model not found: {model}")
    return spm.SentencePieceProcessor(model_file=str(model))


def encode_file(model, src, dst, threads=1, chunk=10000, progress=None):
    """Encode SRC line by line (lines split on '\\n' only) into DST as space-separated pieces, atomically; one line
    out per line in. MODEL: a path or a loaded SentencePieceProcessor. PROGRESS(n): called after each chunk of n
    lines. Returns the number of lines."""
    sp = load(model) if isinstance(model, (str, os.PathLike)) else model
    if not os.path.isfile(src):
        raise PipelineError(f"input not found: {src}")
    n = 0
    try:
        with (
            atomic_path(dst) as tmp,
            open(src, encoding="utf-8", newline="\n") as f,
            open(tmp, "w", encoding="utf-8", newline="\n") as out,
        ):
            lines = []

            def flush():
                out.writelines(" ".join(p) + "\n" for p in sp.encode(lines, out_type=str, num_threads=threads))
                if progress:
                    progress(len(lines))
                lines.clear()

            for line in f:
                lines.append(line[:-1] if line.endswith("\n") else line)
                n += 1
                if len(lines) == chunk:
                    flush()
            flush()
    except UnicodeDecodeError as e:
        raise PipelineError(f"{src} is not UTF-8 text: {e}") from None
    return n
