"""fairseq-generate output: exactly one hypothesis per input line, in input order, and the speed it reports.

fairseq-generate prints the hypotheses of a batch in the order it finishes them, as 'H-<id>\\t<score>\\t<pieces>'.
A dropped sentence (e.g. one longer than --max-positions, skipped with a warning) would silently inflate or deflate
BLEU, so a missing, repeated or unexpected id is an error.
"""

import re
from pathlib import Path

from .files import PipelineError

SPEED = re.compile(
    r"Translated ([\d,]+) sentences \(([\d,]+) tokens\) in ([\d.]+)s "
    r"\(([\d.]+) sentences/s, ([\d.]+) tokens/s\)"
)


def hypotheses(lines, n, source="fairseq-generate output", what="input lines"):
    """The hypothesis text (pieces) of ids 0..N-1 in order, from the lines of fairseq-generate's output."""
    hyps = {}
    for line in lines:
        if not line.startswith("H-"):
            continue
        fields = line.rstrip("\n").split("\t", 2)
        try:
            i = int(fields[0][2:])
        except ValueError:
            raise PipelineError(f"{source}: malformed hypothesis line: {line[:80]!r}") from None
        if i in hyps:
            raise PipelineError(f"{source}: two hypotheses for sentence {i}: generate with --nbest 1")
        hyps[i] = fields[2] if len(fields) > 2 else ""
    missing = [i for i in range(n) if i not in hyps]
    extra = sorted(set(hyps) - set(range(n)))
    if missing or extra:
        raise PipelineError(
            f"{source}: {len(hyps)} hypotheses for {n} {what}"
            + (f"; missing ids: {missing[:10]}{' ...' if len(missing) > 10 else ''}" if missing else "")
            + (f"; unexpected ids: {extra[:10]}{' ...' if len(extra) > 10 else ''}" if extra else "")
            + ": fairseq-generate skipped or added sentences"
        )
    return [hyps[i] for i in range(n)]


def read_hypotheses(path, n, what="input lines"):
    """``hypotheses`` of the fairseq-generate output file PATH."""
    if not Path(path).is_file():
        raise PipelineError(f"fairseq-generate output not found: {path}")
    with open(path, encoding="utf-8", errors="replace", newline="\n") as f:
        return hypotheses(f, n, str(path), what)


def generation_speed(text):
    """The figures of fairseq-generate's 'Translated N sentences (M tokens) in Ts (S sentences/s, U tokens/s)'
    line in TEXT, or None when there is none."""
    m = SPEED.search(text)
    if not m:
        return None
    n, toks, secs, sps, tps = m.groups()
    return {
        "sentences": int(n.replace(",", "")),
        "tokens": int(toks.replace(",", "")),
        "seconds": float(secs),
        "sentences_per_s": float(sps),
        "tokens_per_s": float(tps),
    }


def collect(gen_out, spm_model, n, out, what="test lines"):
    """The hypotheses of the fairseq-generate output GEN_OUT for N input lines, decoded with the sentencepiece
    model, written to OUT in input order (atomically). Returns the decoded lines."""
    from . import subwords
    from .files import write_lines_atomic

    pieces = read_hypotheses(gen_out, n, what)
    sp = subwords.load(spm_model)
    lines = [sp.decode_pieces(h.split()) for h in pieces]
    write_lines_atomic(out, lines)
    return lines
