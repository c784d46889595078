"""Scores with known values: the demo's scorer, the WMT scorer (detokenization, sacreBLEU, tokenized
compound-split BLEU) and checkpoint averaging, each on a fixed example whose result is worked out here by hand
(BLEU from its n-gram counts, chrF by a written-out implementation of its definition)."""

import io
import json
import math
import sys
from collections import Counter

import pytest
import torch
from conftest import ROOT, run

import fairseq_moec  # noqa: F401  (allowlists the globals of fairseq checkpoints for torch.load)

WMT = ROOT / "scripts" / "wmt"


def naive_chrf(hyps, refs, order=6, beta=2.0):
    """chrF (sacrebleu's defaults: character 1..6-grams without spaces, beta 2): per order, matches, hypothesis
    and reference n-grams summed over the corpus; precision and recall averaged over the orders; F_beta."""
    stats = [[0, 0, 0] for _ in range(order)]
    for hyp, ref in zip(hyps, refs):
        h, r = "".join(hyp.split()), "".join(ref.split())
        for n in range(1, order + 1):
            hc = Counter(h[i : i + n] for i in range(len(h) - n + 1))
            rc = Counter(r[i : i + n] for i in range(len(r) - n + 1))
            stats[n - 1][0] += sum((hc & rc).values())
            stats[n - 1][1] += sum(hc.values())
            stats[n - 1][2] += sum(rc.values())
    used = [(m / nh, m / nr) for m, nh, nr in stats if nh and nr]
    p = sum(u[0] for u in used) / len(used)
    r = sum(u[1] for u in used) / len(used)
    return 100 * (1 + beta**2) * p * r / (beta**2 * p + r)


def test_naive_chrf_by_hand():
    # "ab" vs "abc": 1-grams 2 of 2 hypothesis, 2 of 3 reference; 2-grams 1 of 1, 1 of 2; orders 3..6 have no
    # hypothesis n-gram and are left out. P = 1, R = (2/3 + 1/2) / 2 = 7/12; F2 = 5 P R / (4 P + R) = 35/55
    assert naive_chrf(["a b"], ["abc"]) == pytest.approx(100 * 35 / 55)


# ---- the demo's scorer ------------------------------------------------------------------------------------------
HYPS = ["the cat sat on the mat", "a dog ran"]
REFS = ["the cat sat on a mat", "a dog ran away"]
# corpus BLEU (13a tokens are the words here): clipped n-gram matches over both sentences
#   1-grams 5/6 + 3/3 = 8/9   2-grams 3/5 + 2/2 = 5/7   3-grams 2/4 + 1/1 = 3/5   4-grams 1/3 + 0/0 = 1/3
#   hypothesis 9 words, reference 10: brevity penalty exp(1 - 10/9)
DEMO_BLEU = 100 * math.exp(1 - 10 / 9) * (8 / 9 * 5 / 7 * 3 / 5 * 1 / 3) ** 0.25  # 53.4174


def test_demo_scorer_values(tmp_path):
    (tmp_path / "hyp").write_text("".join(h + "\n" for h in HYPS), encoding="utf-8")
    (tmp_path / "ref").write_text("".join(r + "\n" for r in REFS), encoding="utf-8")
    run(
        [
            sys.executable,
            ROOT / "scripts" / "demo_tools.py",
            "score",
            tmp_path / "hyp",
            tmp_path / "ref",
            tmp_path / "res.txt",
            tmp_path / "res.json",
        ]
    )
    res = json.loads((tmp_path / "res.json").read_text(encoding="utf-8"))
    assert res["bleu"] == 53.42 == round(DEMO_BLEU, 2)
    assert res["chrf"] == 66.18 == round(naive_chrf(HYPS, REFS), 2)
    assert res["lines"] == 2 and "tok:13a" in res["bleu_signature"] and "nc:6|nw:0" in res["chrf_signature"]


# ---- the WMT scorer ---------------------------------------------------------------------------------------------
WMT_HYPS = ["Das rich-text Format ist schlecht.", "Er kommt heute."]
WMT_REFS = ["Das rich-text Format ist gut.", "Er kommt heute."]
# sacreBLEU (13a keeps "rich-text", splits the final period), 10 words each side:
#   1-grams 5/6 + 4/4   2-grams 3/5 + 3/3   3-grams 2/4 + 2/2   4-grams 1/3 + 1/1
WMT_SACREBLEU = 100 * (9 / 10 * 6 / 8 * 4 / 6 * 2 / 4) ** 0.25  # 68.87
# tokenized, compound split: "Das rich ##AT##-##AT## text Format ist schlecht|gut ." (8) + "Er kommt heute ." (4)
#   1-grams 7/8 + 4/4   2-grams 5/7 + 3/3   3-grams 4/6 + 2/2   4-grams 3/5 + 1/1
WMT_TOKENIZED = 100 * (11 / 12 * 8 / 10 * 6 / 8 * 4 / 6) ** 0.25  # 77.82


def wmt_generate_output(tmp_path):
    """What fairseq-generate prints for the two hypotheses after the recipe's preprocessing (Moses-tokenized with
    aggressive dash splits, then sentencepiece pieces), in the order generate finishes them; an <unk> piece in
    the second. Returns (generate file, sentencepiece model)."""
    import sentencepiece as spm
    from normalize_tokenize import Preprocessor  # scripts/wmt/ (on the tests' path: pyproject.toml)

    pre = Preprocessor("de")
    tokenized = [pre(line) for line in WMT_HYPS + WMT_REFS]
    assert tokenized[0] == "Das rich @-@ text Format ist schlecht ."  # what the detokenizer has to undo
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(tokenized),
        model_writer=model,
        vocab_size=40,
        hard_vocab_limit=False,
        character_coverage=1.0,
        minloglevel=2,
        num_threads=1,
    )
    (tmp_path / "spm.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spm.model"))
    pieces = [" ".join(sp.encode(t, out_type=str)) for t in tokenized[:2]]
    lines = [
        f"S-1\tx\nT-1\tx\nH-1\t-0.3\t<unk> {pieces[1]}\nD-1\t-0.3\tx\nP-1\t-0.1 -0.2",
        f"S-0\tx\nH-0\t-0.5\t{pieces[0]}\nD-0\t-0.5\tx",
    ]
    (tmp_path / "gen.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return tmp_path / "gen.txt", tmp_path / "spm.model"


def test_wmt_scorer_values(tmp_path):
    gen, spm_model = wmt_generate_output(tmp_path)
    (tmp_path / "ref.de").write_text("".join(r + "\n" for r in WMT_REFS), encoding="utf-8")
    run(
        [
            sys.executable,
            WMT / "score.py",
            "--generate",
            gen,
            "--ref",
            tmp_path / "ref.de",
            "--spm",
            spm_model,
            "--lang",
            "de",
            "--out-dir",
            tmp_path / "out",
        ]
    )
    # detokenized: in sentence order, dash split undone, space before the period removed, <unk> dropped
    assert (tmp_path / "out" / "hyps.detok.txt").read_text(encoding="utf-8").splitlines() == WMT_HYPS
    res = json.loads((tmp_path / "out" / "results.json").read_text(encoding="utf-8"))
    assert res["sacrebleu"]["score"] == 68.87 == round(WMT_SACREBLEU, 2)
    assert "tok:13a" in res["sacrebleu"]["signature"]
    assert res["tokenized_bleu_compound_split"]["score"] == 77.82 == round(WMT_TOKENIZED, 2)
    assert res["chrf"]["score"] == 86.45 == round(naive_chrf(WMT_HYPS, WMT_REFS), 2)
    assert res["sentences"] == 2


# ---- checkpoint averaging ---------------------------------------------------------------------------------------
def test_average_of_two_checkpoints_is_their_elementwise_mean(tiny_moec_checkpoint, tmp_path):
    first = torch.load(tiny_moec_checkpoint[0], map_location="cpu", weights_only=True)
    second = torch.load(tiny_moec_checkpoint[0], map_location="cpu", weights_only=True)
    second["model"] = {k: 3 * v + 1 if v.is_floating_point() else v for k, v in second["model"].items()}
    # fp16: 59968 + 64000 overflows fp16 (max 65504), so the sum must be taken in fp32: mean 61984 (= 1937 * 32,
    # exact in fp16). int64: state, not a weight: taken from the newest (last) checkpoint, not averaged
    first["model"]["half"], second["model"]["half"] = (
        torch.tensor([59968.0, 2.0], dtype=torch.float16),
        torch.tensor([64000.0, 3.0], dtype=torch.float16),
    )
    first["model"]["count"], second["model"]["count"] = torch.tensor([1, 10]), torch.tensor([3, 20])
    survivors = [k for k in first["model"] if k.endswith("cluster_dropout.survivors")]
    assert survivors
    for k in survivors:
        second["model"][k] = ~first["model"][k]
    torch.save(first, tmp_path / "a.pt")
    torch.save(second, tmp_path / "b.pt")

    run(
        [
            sys.executable,
            WMT / "average_checkpoints.py",
            "--inputs",
            tmp_path / "a.pt",
            tmp_path / "b.pt",
            "--output",
            tmp_path / "avg.pt",
        ]
    )
    avg = torch.load(tmp_path / "avg.pt", map_location="cpu", weights_only=True)
    model = avg["model"]
    assert set(model) == set(first["model"])
    for k, v in first["model"].items():
        if v.is_floating_point() and k != "half":  # (w + 3 w + 1) / 2 = 2 w + 0.5
            assert model[k].dtype == v.dtype
            torch.testing.assert_close(model[k], 2 * v + 0.5, rtol=1e-6, atol=1e-6, msg=k)
    assert model["half"].dtype == torch.float16 and model["half"].tolist() == [61984.0, 2.5]
    assert model["count"].tolist() == [3, 20]
    assert all(torch.equal(model[k], second["model"][k]) for k in survivors)
    assert "last_optimizer_state" not in avg
    assert avg["extra_state"]["averaged_checkpoints"] == ["a.pt", "b.pt"]
