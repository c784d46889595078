"""The real command-line path: preprocess (fixture) -> train -> stop -> resume identically -> generate -> sacrebleu."""
import json
import re

import pytest
import sacrebleu
import torch

import fairseq_moec  # noqa: F401  (allowlists the globals of fairseq checkpoints for torch.load)

from conftest import FIXTURE, TINY_MOEC_ARGS, cli, run

pytestmark = pytest.mark.slow


def train(data_bin, save_dir, max_update):
    proc = run([cli("fairseq-train"), data_bin, *TINY_MOEC_ARGS, "--max-update", max_update,
                "--save-interval-updates", "4", "--save-dir", save_dir])
    return {int(rec["num_updates"]): rec for rec in
            (json.loads(m) for m in re.findall(r"\| train_inner \| (\{.*\})", proc.stdout + proc.stderr))}


def test_train_resume_generate_score(tiny_corpus, tmp_path):
    _, _, data_bin = tiny_corpus
    straight = train(data_bin, tmp_path / "straight", "8")
    first = train(data_bin, tmp_path / "resumed", "4")
    resumed = train(data_bin, tmp_path / "resumed", "8")  # picks up checkpoint_last.pt at update 4

    assert sorted(first) == [1, 2, 3, 4] and sorted(resumed) == [5, 6, 7, 8]
    for update in (5, 6, 7, 8):  # masks are resampled every 2 updates: the resume crosses a resample
        for key in ("loss", "moe_loss", "moe_enc1_rerouted_frac", "moe_dec1_balance", "gnorm"):
            assert resumed[update][key] == straight[update][key], (update, key)
    a = torch.load(tmp_path / "straight" / "checkpoint_last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint_last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    # generate: every test line (37: the last batch is not a multiple of 8), then detokenised sacrebleu
    proc = run([cli("fairseq-generate"), data_bin, "--user-dir", TINY_MOEC_ARGS[1], "--task", "translation_moec",
                "--path", tmp_path / "resumed" / "checkpoint_last.pt", "--beam", "2", "--batch-size", "16",
                "--remove-bpe", "sentencepiece", "--cpu"])
    hyps = dict(re.findall(r"^D-(\d+)\t[^\t]*\t(.*)$", proc.stdout, flags=re.M))
    refs = (FIXTURE / "test.en").read_text(encoding="utf-8").splitlines()
    assert len(hyps) == len(refs) == 37
    ordered = [hyps[str(i)] for i in range(len(refs))]
    bleu, chrf = sacrebleu.BLEU(), sacrebleu.CHRF()
    assert 0.0 <= bleu.corpus_score(ordered, [refs]).score <= 100.0
    assert chrf.corpus_score(ordered, [refs]).score > 0.0
    assert "tok:13a" in str(bleu.get_signature())
