"""Translating raw text with a trained model: fairseq-interactive with --bpe sentencepiece, fairseq's hub
interface on a MoEC checkpoint and on an expert-parallel checkpoint consolidated to one file. Every input line
gets a result: batches, empty lines and lines longer than the model's source positions.

References are independent of the raw-text path: fairseq-generate on the test set that conftest encoded with
the sentencepiece library and binarized with fairseq-preprocess, one sentence a batch."""

import logging
import os
import re
import subprocess

import pytest
import sentencepiece as spm
from conftest import PLUGIN, cli, run
from test_expert_parallel import load_script

pytestmark = pytest.mark.slow

# The 4-update fixture model repeats words up to the length limit: short limits keep the tests fast.
GENERATION = ["--beam", "2", "--max-len-b", "20"]
MAX_SOURCE_POSITIONS = 1024  # moec_transformer_tiny's


@pytest.fixture(scope="module")
def test_es(tiny_corpus):
    raw, _, _ = tiny_corpus
    return (raw / "test.es").read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def long_line(test_es, tiny_corpus):
    line = " ".join(test_es)
    assert len(spm.SentencePieceProcessor(model_file=str(tiny_corpus[1])).encode(line)) > MAX_SOURCE_POSITIONS
    return line


@pytest.fixture(scope="module")
def generated(tiny_moec_checkpoint):
    """{test line number: detokenized hypothesis} from fairseq-generate."""
    checkpoint, data_bin = tiny_moec_checkpoint
    proc = run(
        [
            cli("fairseq-generate"),
            data_bin,
            "--user-dir",
            PLUGIN,
            "--task",
            "translation_moec",
            "--path",
            checkpoint,
            *GENERATION,
            "--batch-size",
            "1",
            "--remove-bpe",
            "sentencepiece",
            "--cpu",
        ]
    )
    return {int(i): text for i, text in re.findall(r"^D-(\d+)\t[^\t]*\t(.*)$", proc.stdout, flags=re.M)}


def interactive(tiny_corpus, checkpoint, lines, *extra):
    _, spm_model, data_bin = tiny_corpus
    cmd = [
        cli("fairseq-interactive"),
        data_bin,
        "--user-dir",
        PLUGIN,
        "--task",
        "translation_moec",
        "--path",
        checkpoint,
        "--source-lang",
        "es",
        "--target-lang",
        "en",
        "--bpe",
        "sentencepiece",
        "--sentencepiece-model",
        spm_model,
        *GENERATION,
        "--cpu",
        *extra,
    ]
    return subprocess.run(
        [str(c) for c in cmd],
        input="".join(line + "\n" for line in lines),
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )


def test_interactive_translates_every_raw_line(tiny_corpus, tiny_moec_checkpoint, test_es, long_line, generated):
    checkpoint, _ = tiny_moec_checkpoint
    sp = spm.SentencePieceProcessor(model_file=str(tiny_corpus[1]))
    lines = [test_es[0], test_es[1], "", long_line, test_es[2], test_es[3], test_es[4]]
    test_line = {0: 0, 1: 1, 4: 2, 5: 3, 6: 4}  # input line -> test set line
    # batches of 3 lines: the empty and the long line share batches with ordinary ones
    proc = interactive(tiny_corpus, checkpoint, lines, "--buffer-size", "3", "--batch-size", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = {
        kind: dict((int(i), rest) for i, rest in re.findall(rf"^{kind}-(\d+)\t(.*)$", proc.stdout, flags=re.M))
        for kind in "SHD"
    }
    assert sorted(out["D"]) == list(range(len(lines)))  # no line skipped

    for i, j in test_line.items():
        score, text = out["D"][i].split("\t")
        assert text == generated[j], i  # raw text in: the same translation as the binarized test line
        hyp_pieces = out["H"][i].split("\t")[1].split()
        assert text == sp.decode(hyp_pieces) and "\u2581" not in text  # detokenized text out
        assert out["S"][i].split() == sp.encode(lines[i], out_type=str)

    assert out["D"][2] == "0.0\t" and out["H"][2] == "0.0\t"  # an empty line: an empty translation

    # the long line: cut to the model's positions (its last one for the end of sentence), said on stderr
    assert out["S"][3].split() == sp.encode(long_line, out_type=str)[: MAX_SOURCE_POSITIONS - 1]
    assert out["D"][3].split("\t")[1] != ""
    assert re.search(
        rf"an input of {len(sp.encode(long_line)) + 1} tokens .* is longer than the "
        rf"{MAX_SOURCE_POSITIONS} source positions allowed .*: translating its first "
        rf"{MAX_SOURCE_POSITIONS - 1} tokens only",
        proc.stderr,
    )


def hub(tiny_corpus, checkpoint):
    from fairseq_moec.models.moec_transformer import MoECTransformerModel

    _, spm_model, data_bin = tiny_corpus
    return MoECTransformerModel.from_pretrained(
        str(checkpoint.parent),
        checkpoint_file=checkpoint.name,
        data_name_or_path=str(data_bin),
        bpe="sentencepiece",
        sentencepiece_model=str(spm_model),
        max_len_b=20,
    )


def test_hub_translates_a_batch_an_empty_and_a_long_sentence(
    tiny_corpus, tiny_moec_checkpoint, test_es, long_line, generated, caplog
):
    model = hub(tiny_corpus, tiny_moec_checkpoint[0])
    assert model.translate(test_es[0], beam=2) == generated[0]
    assert model.translate([test_es[1], "", test_es[2]], beam=2) == [generated[1], "", generated[2]]

    # a long sentence: the translation of its first 1023 tokens and the end of sentence, cut here by hand
    tokens = model.encode(long_line)
    by_hand = tokens[:MAX_SOURCE_POSITIONS].clone()
    by_hand[-1] = tokens[-1]  # the end-of-sentence token
    expected = model.decode(model.generate([by_hand], beam=2)[0][0]["tokens"])
    with caplog.at_level(logging.WARNING):
        assert model.translate(long_line, beam=2) == expected
    assert f"is longer than the {MAX_SOURCE_POSITIONS} source positions allowed" in caplog.text


def test_hub_on_an_expert_parallel_checkpoint_consolidated_to_one_file(
    tiny_corpus, tiny_moec_checkpoint, test_es, generated, tmp_path
):
    consolidate = load_script("consolidate_checkpoint")
    sharded = tmp_path / "ep" / "checkpoint_last.pt"
    consolidate.main([str(tiny_moec_checkpoint[0]), "--world-size", "2", "-o", str(sharded)])  # as 2 processes save
    assert (tmp_path / "ep" / "checkpoint_last-expert-rank1.pt").exists()
    with pytest.raises(ValueError, match=r"written by 2 processes\. Merge it with scripts/consolidate_checkpoint\.py"):
        hub(tiny_corpus, sharded)

    merged = tmp_path / "merged" / "model.pt"
    consolidate.main([str(sharded), "-o", str(merged)])
    model = hub(tiny_corpus, merged)
    assert model.translate(test_es[:5], beam=2) == [generated[i] for i in range(5)]
