"""Score fairseq-generate output against the raw reference: sacreBLEU and the tokenized compound-split BLEU.

    score.py --generate GEN.txt --ref test.raw.de --spm spm.model --lang de --out-dir DIR [--meta KEY=VALUE ...]

1. Read the H-<id> lines; there must be exactly one per reference line (ids 0..N-1), else an error: a silently
   dropped sentence inflates or deflates BLEU.
2. Detokenize: sentencepiece decode, then the Moses detokenizer (the inverse of the preprocessing).
3. sacreBLEU on detokenized text (13a, mixed case) with its signature, plus chrF.
4. The "tokenized BLEU" most MT papers report for WMT'14 en-de (tensor2tensor's get_ende_bleu.sh): Moses-
   tokenize hypothesis and reference, split hyphenated compounds as "a ##AT##-##AT## b", multi-bleu-style
   corpus BLEU on those tokens (sacrebleu with tokenize=none).
Writes DIR/hyps.detok.txt, DIR/results.json and DIR/results.txt, each atomically.
"""
import argparse
import json
import os
import re
import time

from wmt_common import atomic_path, die, log, main_guard, read_lines, require_file, write_text_atomic

_COMPOUND = re.compile(r"(\S)-(\S)")


def read_hypotheses(path: str, expected: int):
    require_file(path, "fairseq-generate output", allow_empty=True)
    hyps = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.startswith("H-"):
                continue
            fields = line.rstrip("\n").split("\t", 2)
            try:
                idx = int(fields[0][2:])
            except ValueError:
                die(f"{path}: malformed hypothesis line: {line[:80]!r}")
            if idx in hyps:
                die(f"{path}: two hypotheses for sentence {idx}: generate with --nbest 1")
            hyps[idx] = fields[2] if len(fields) > 2 else ""
    if len(hyps) != expected or (hyps and (min(hyps) != 0 or max(hyps) != expected - 1)):
        missing = sorted(set(range(expected)) - set(hyps))
        die(f"{path}: {len(hyps)} hypotheses for {expected} reference lines"
            + (f" (missing ids: {missing[:10]}{'...' if len(missing) > 10 else ''})" if missing else "")
            + ": fairseq-generate skipped or added sentences; refusing to score a partial test set")
    return [hyps[i] for i in range(expected)]


class Detokenizer:
    def __init__(self, spm_model: str, lang: str):
        import sentencepiece as spm
        from sacremoses import MosesDetokenizer
        require_file(spm_model, "sentencepiece model")
        self.sp = spm.SentencePieceProcessor(model_file=spm_model)
        self.moses = MosesDetokenizer(lang=lang)

    def __call__(self, pieces: str) -> str:
        # <unk> cannot match any reference word; left in, Moses would split it into '< unk >'.
        kept = [p for p in pieces.split() if p != "<unk>"]
        text = self.sp.decode_pieces(kept)
        return self.moses.detokenize(text.split(), unescape=False)


def compound_split_tokens(lines, lang: str):
    from sacremoses import MosesTokenizer
    tok = MosesTokenizer(lang=lang)
    return [_COMPOUND.sub(r"\1 ##AT##-##AT## \2", tok.tokenize(line, escape=False, return_str=True))
            for line in lines]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generate", required=True, help="fairseq-generate output")
    ap.add_argument("--ref", required=True, help="raw (untokenized) reference, one sentence a line")
    ap.add_argument("--spm", required=True, help="sentencepiece model used to prepare the data")
    ap.add_argument("--lang", default="de", help="target language (Moses rules)")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--meta", action="append", default=[], help="KEY=VALUE recorded in results.json")
    args = ap.parse_args()
    from sacrebleu.metrics import BLEU, CHRF

    refs = read_lines(args.ref, "reference")
    if not refs:
        die(f"reference is empty: {args.ref}")
    hyps = read_hypotheses(args.generate, len(refs))
    detok = Detokenizer(args.spm, args.lang)
    hyps_detok = [detok(h) for h in hyps]
    os.makedirs(args.out_dir, exist_ok=True)
    with atomic_path(os.path.join(args.out_dir, "hyps.detok.txt")) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(h + "\n" for h in hyps_detok)

    bleu = BLEU()
    sacre = bleu.corpus_score(hyps_detok, [refs])
    chrf_metric = CHRF()
    chrf = chrf_metric.corpus_score(hyps_detok, [refs])
    tok_bleu = BLEU(tokenize="none", force=True).corpus_score(
        compound_split_tokens(hyps_detok, args.lang), [compound_split_tokens(refs, args.lang)])

    meta = {}
    for kv in args.meta:
        if "=" not in kv:
            die(f"--meta expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        meta[k] = v
    results = {
        "sacrebleu": {"score": round(sacre.score, 2), "signature": str(bleu.get_signature()), "detail": str(sacre)},
        "tokenized_bleu_compound_split": {
            "score": round(tok_bleu.score, 2), "detail": str(tok_bleu),
            "method": "Moses tokenizer + ##AT##-##AT## compound splitting, corpus BLEU on tokens (multi-bleu style)"},
        "chrf": {"score": round(chrf.score, 2), "signature": str(chrf_metric.get_signature())},
        "sentences": len(refs),
        "reference": os.path.abspath(args.ref),
        "hypotheses": os.path.abspath(os.path.join(args.out_dir, "hyps.detok.txt")),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        **meta,
    }
    text = (f"BLEU (sacrebleu, detokenized):   {sacre.score:.2f}   {bleu.get_signature()}\n"
            f"BLEU (tokenized, compound split): {tok_bleu.score:.2f}   (Moses tokenizer, ##AT##-##AT##, multi-bleu style)\n"
            f"chrF:                             {chrf.score:.2f}   {chrf_metric.get_signature()}\n"
            f"sentences: {len(refs)}\n"
            + "".join(f"{k}: {v}\n" for k, v in meta.items()))
    write_text_atomic(os.path.join(args.out_dir, "results.json"), json.dumps(results, indent=2) + "\n")
    write_text_atomic(os.path.join(args.out_dir, "results.txt"), text)
    print(text, end="")
    log(f"[score] wrote {os.path.join(args.out_dir, 'results.json')} and results.txt")


if __name__ == "__main__":
    main_guard(main)
