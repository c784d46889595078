"""sacrebleu BLEU and chrF of detokenized hypotheses against raw references, with their signatures."""

from .files import PipelineError


def bleu_metric(tgt_lang="", tokenize=None, option="--tokenize"):
    """sacrebleu's BLEU for target language TGT_LANG: its tokenizer is TOKENIZE, or sacrebleu's default for the
    language (what `sacrebleu -l SRC-TGT` picks: zh, ja-mecab, ko-mecab, else 13a). OPTION: the setting that
    chose TOKENIZE, named in the messages."""
    from sacrebleu.metrics import BLEU

    if tokenize and tokenize not in BLEU.TOKENIZERS:
        raise PipelineError(
            f"{option}={tokenize!r} is not a sacrebleu tokenizer; one of: " + ", ".join(BLEU.TOKENIZERS)
        )
    chosen = tokenize or BLEU._TOKENIZER_MAP.get(tgt_lang, BLEU.TOKENIZER_DEFAULT)
    try:
        return BLEU(trg_lang=tgt_lang, tokenize=tokenize or None)
    except Exception as e:  # a missing optional dependency (MeCab) or a model sacrebleu would download
        detail = " ".join(str(e).split())
        raise PipelineError(
            f"sacrebleu's BLEU tokenizer {chosen!r} (for target language {tgt_lang!r}) cannot run "
            f"here: {detail}. Install what it needs, or choose another with {option} "
            f"(e.g. char or intl)"
        ) from None


def bleu_chrf(hyps, refs, tgt_lang="", tokenize=None, option="--tokenize"):
    """{'bleu', 'chrf': sacrebleu score objects, 'bleu_signature', 'chrf_signature': str} of HYPS against REFS
    (one reference per line)."""
    from sacrebleu.metrics import CHRF

    if len(hyps) != len(refs):
        raise PipelineError(f"{len(hyps)} hypotheses for {len(refs)} reference lines")
    bleu, chrf = bleu_metric(tgt_lang, tokenize, option), CHRF()
    return {
        "bleu": bleu.corpus_score(hyps, [refs]),
        "bleu_signature": str(bleu.get_signature()),
        "chrf": chrf.corpus_score(hyps, [refs]),
        "chrf_signature": str(chrf.get_signature()),
    }


def score_files(hyp, ref, out_txt, out_json, meta=None, tgt_lang="", tokenize=None, option="--tokenize"):
    """BLEU (tokenizer: see bleu_metric) and chrF of the file HYP against the file REF, written as text to OUT_TXT
    and as JSON to OUT_JSON (META: extra JSON entries), each atomically. Returns (JSON dict, text)."""
    import json

    from .files import read_lines, write_text_atomic

    hyps, refs = read_lines(hyp), read_lines(ref)
    if len(hyps) != len(refs):
        raise PipelineError(f"{hyp}: {len(hyps)} lines, reference {ref}: {len(refs)} lines")
    s = bleu_chrf(hyps, refs, tgt_lang, tokenize, option)
    b, c = s["bleu"], s["chrf"]
    result = dict(
        meta or {},
        lines=len(hyps),
        bleu=round(b.score, 2),
        bleu_signature=s["bleu_signature"],
        bleu_full=str(b),
        chrf=round(c.score, 2),
        chrf_signature=s["chrf_signature"],
        chrf_full=str(c),
    )
    text = f"BLEU {b.score:.2f}  {s['bleu_signature']}\n{b}\nchrF {c.score:.2f}  {s['chrf_signature']}\n{c}\n"
    write_text_atomic(out_txt, text)
    write_text_atomic(out_json, json.dumps(result, indent=2) + "\n")
    return result, text
