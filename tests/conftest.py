"""Shared fixtures: a tiny real-text corpus, its sentencepiece model and fairseq binarized data."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fairseq_moec.pipeline import binarize
from fairseq_moec.pipeline.binarize import cli  # noqa: F401  (imported by the tests from here)

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = str(ROOT / "fairseq_moec")
FIXTURE = ROOT / "tests" / "fixtures" / "tiny-es-en"
BIN = Path(sys.executable).parent  # the fairseq-* commands of this interpreter's environment


def run(cmd, cwd=None, check=True, env=None):
    """Run a command, return CompletedProcess; on failure show its output in the assertion."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd[0]} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """(raw_dir, spm_model, data_bin): the tiny corpus encoded with a 500-piece joint sentencepiece model and
    binarized with fairseq-preprocess (joined dictionary), es -> en; the encoded text is in data_bin/../tok/."""
    work = tmp_path_factory.mktemp("tiny_corpus")
    data_bin = binarize.encode_and_binarize(
        work,
        "es",
        "en",
        500,
        threads=1,
        workers=1,
        runner=run,
        raw=FIXTURE,
        spm_options=dict(bos_id=-1, eos_id=-1, log_level=2),
    )
    return FIXTURE, work / "spm" / "spm.model", data_bin


TINY_MOEC_ARGS = [
    "--user-dir",
    PLUGIN,
    "--task",
    "translation_moec",
    "--arch",
    "moec_transformer_tiny",
    "--criterion",
    "moec_label_smoothed_cross_entropy",
    "--label-smoothing",
    "0.1",
    "--share-all-embeddings",
    "--moe-expert-count",
    "4",
    "--moe-clusters",
    "2",
    "--cluster-dropout",
    "0.5",
    "--cluster-dropout-interval",
    "2",
    "--optimizer",
    "torch_adam",
    "--adam-betas",
    "(0.9, 0.98)",
    "--lr",
    "2e-3",
    "--lr-scheduler",
    "inverse_sqrt",
    "--warmup-updates",
    "4",
    "--max-tokens",
    "1500",
    "--cpu",
    "--seed",
    "3",
    "--num-workers",
    "0",
    "--log-format",
    "json",
    "--log-interval",
    "1",
    "--no-progress-bar",
    "--no-epoch-checkpoints",
]


@pytest.fixture(scope="session")
def tiny_moec_checkpoint(tiny_corpus, tmp_path_factory):
    """(checkpoint_path, data_bin): a tiny MoEC model (MoE in encoder and decoder layer 1, 4 experts in 2
    clusters, cluster dropout on) trained for 4 updates on the tiny corpus. The run also logs to TensorBoard
    (see ``tiny_moec_tensorboard``)."""
    _, _, data_bin = tiny_corpus
    save_dir = tmp_path_factory.mktemp("tiny_moec_ckpt")
    run(
        [
            cli("fairseq-train"),
            data_bin,
            *TINY_MOEC_ARGS,
            "--max-update",
            "4",
            "--save-dir",
            save_dir,
            "--tensorboard-logdir",
            save_dir / "tensorboard",
        ]
    )
    return save_dir / "checkpoint_last.pt", data_bin


@pytest.fixture(scope="session")
def tiny_moec_tensorboard(tiny_moec_checkpoint):
    """The --tensorboard-logdir of the ``tiny_moec_checkpoint`` run (subfolders train_inner/, train/, valid/)."""
    return tiny_moec_checkpoint[0].parent / "tensorboard"
