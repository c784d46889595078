"""The real command-line path: preprocess (fixture) -> train -> stop -> resume identically -> generate -> sacrebleu;
resuming from the end of an epoch and inside the next one."""

import json
import re

import pytest
import sacrebleu
import torch
from conftest import FIXTURE, TINY_MOEC_ARGS, cli, run

import fairseq_moec  # noqa: F401  (allowlists the globals of fairseq checkpoints for torch.load)

pytestmark = pytest.mark.slow


def train(data_bin, save_dir, max_update, *extra):
    proc = run(
        [
            cli("fairseq-train"),
            data_bin,
            *TINY_MOEC_ARGS,
            "--max-update",
            max_update,
            "--save-interval-updates",
            "4",
            "--save-dir",
            save_dir,
            *extra,
        ]
    )
    return {
        int(rec["num_updates"]): rec
        for rec in (json.loads(m) for m in re.findall(r"\| train_inner \| (\{.*\})", proc.stdout + proc.stderr))
    }


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
    proc = run(
        [
            cli("fairseq-generate"),
            data_bin,
            "--user-dir",
            TINY_MOEC_ARGS[1],
            "--task",
            "translation_moec",
            "--path",
            tmp_path / "resumed" / "checkpoint_last.pt",
            "--beam",
            "2",
            "--batch-size",
            "16",
            "--remove-bpe",
            "sentencepiece",
            "--cpu",
        ]
    )
    hyps = dict(re.findall(r"^D-(\d+)\t[^\t]*\t(.*)$", proc.stdout, flags=re.M))
    refs = (FIXTURE / "test.en").read_text(encoding="utf-8").splitlines()
    assert len(hyps) == len(refs) == 37
    ordered = [hyps[str(i)] for i in range(len(refs))]
    bleu, chrf = sacrebleu.BLEU(), sacrebleu.CHRF()
    assert 0.0 <= bleu.corpus_score(ordered, [refs]).score <= 100.0
    assert chrf.corpus_score(ordered, [refs]).score > 0.0
    assert "tok:13a" in str(bleu.get_signature())


def test_resume_from_an_epoch_end_and_inside_the_next_epoch(tiny_corpus, tmp_path):
    """fairseq-fixed builds a run's batches with the seed of the epoch the run starts in: a run resumed in epoch 2
    put sentences of equal length in other places than the uninterrupted run (patches/first_epoch_batches.py)."""
    _, _, data_bin = tiny_corpus
    short_epochs = ["--max-tokens", "6000", "--disable-validation"]  # 8 updates an epoch
    first = train(data_bin, tmp_path / "resumed", "1000", "--max-epoch", "1", *short_epochs)
    n = max(first)  # the updates of one epoch
    state = torch.load(tmp_path / "resumed" / "checkpoint_last.pt", weights_only=True)["extra_state"]
    assert state["train_iterator"]["epoch"] == 2 and state["train_iterator"]["iterations_in_epoch"] == 0
    assert n >= 3, n

    straight = train(data_bin, tmp_path / "straight", str(n + 2), *short_epochs)
    after_epoch_end = train(data_bin, tmp_path / "resumed", str(n + 1), *short_epochs)
    inside_epoch_2 = train(data_bin, tmp_path / "resumed", str(n + 2), *short_epochs)
    assert sorted(after_epoch_end) == [n + 1] and sorted(inside_epoch_2) == [n + 2]
    for update, resumed in ((n + 1, after_epoch_end), (n + 2, inside_epoch_2)):
        for key in ("loss", "moe_loss", "moe_enc1_rerouted_frac", "moe_dec1_balance", "gnorm", "wpb"):
            assert resumed[update][key] == straight[update][key], (update, key)
    a = torch.load(tmp_path / "straight" / "checkpoint_last.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "resumed" / "checkpoint_last.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
