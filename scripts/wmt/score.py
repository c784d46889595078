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

from wmt_common import die, log, main_guard, read_lines, write_text_atomic

_COMPOUND = re.compile(r"(\S)-(\S)")


class Detokenizer:
    def __init__(self, spm_model: str, lang: str):
        from sacremoses import MosesDetokenizer

        from fairseq_moec.pipeline import subwords

        self.sp = subwords.load(spm_model)
        self.moses = MosesDetokenizer(lang=lang)

    def __call__(self, pieces: str) -> str:
        # <unk> cannot match any reference word; left in, Moses would split it into '< unk >'.
        kept = [p for p in pieces.split() if p != "<unk>"]
        text = self.sp.decode_pieces(kept)
        return self.moses.detokenize(text.split(), unescape=False)


def compound_split_tokens(lines, lang: str):
    from sacremoses import MosesTokenizer

    tok = MosesTokenizer(lang=lang)
    return [_COMPOUND.sub(r"\1 ##AT##-##AT## \2", tok.tokenize(line, escape=False, return_str=True)) for line in lines]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generate", required=True, help="fairseq-generate output")
    ap.add_argument("--ref", required=True, help="raw (untokenized) reference, one sentence a line")
    ap.add_argument("--spm", required=True, help="sentencepiece model used to prepare the data")
    ap.add_argument("--lang", default="de", help="target language (Moses rules)")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--meta", action="append", default=[], help="KEY=VALUE recorded in results.json")
    args = ap.parse_args()
    from sacrebleu.metrics import BLEU

    from fairseq_moec.pipeline import files, hypotheses, scores

    refs = read_lines(args.ref, "reference")
    if not refs:
        die(f"reference is empty: {args.ref}")
    hyps = hypotheses.read_hypotheses(args.generate, len(refs), "reference lines")
    detok = Detokenizer(args.spm, args.lang)
    hyps_detok = [detok(h) for h in hyps]
    files.write_lines_atomic(os.path.join(args.out_dir, "hyps.detok.txt"), hyps_detok)

    s = scores.bleu_chrf(hyps_detok, refs)  # sacrebleu's defaults: BLEU with 13a, chrF
    sacre, chrf = s["bleu"], s["chrf"]
    tok_bleu = BLEU(tokenize="none", force=True).corpus_score(
        compound_split_tokens(hyps_detok, args.lang), [compound_split_tokens(refs, args.lang)]
    )

    meta = {}
    for kv in args.meta:
        if "=" not in kv:
            die(f"--meta expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        meta[k] = v
    results = {
        "sacrebleu": {"score": round(sacre.score, 2), "signature": s["bleu_signature"], "detail": str(sacre)},
        "tokenized_bleu_compound_split": {
            "score": round(tok_bleu.score, 2),
            "detail": str(tok_bleu),
            "method": "Moses tokenizer + ##AT##-##AT## compound splitting, corpus BLEU on tokens (multi-bleu style)",
        },
        "chrf": {"score": round(chrf.score, 2), "signature": s["chrf_signature"]},
        "sentences": len(refs),
        "reference": os.path.abspath(args.ref),
        "hypotheses": os.path.abspath(os.path.join(args.out_dir, "hyps.detok.txt")),
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        **meta,
    }
    text = (
        f"BLEU (sacrebleu, detokenized):   {sacre.score:.2f}   {s['bleu_signature']}\n"
        f"BLEU (tokenized, compound split): {tok_bleu.score:.2f}   (Moses tokenizer, ##AT##-##AT##, multi-bleu style)\n"
        f"chrF:                             {chrf.score:.2f}   {s['chrf_signature']}\n"
        f"sentences: {len(refs)}\n" + "".join(f"{k}: {v}\n" for k, v in meta.items())
    )
    write_text_atomic(os.path.join(args.out_dir, "results.json"), json.dumps(results, indent=2) + "\n")
    write_text_atomic(os.path.join(args.out_dir, "results.txt"), text)
    print(text, end="")
    log(f"[score] wrote {os.path.join(args.out_dir, 'results.json')} and results.txt")


if __name__ == "__main__":
    main_guard(main)
