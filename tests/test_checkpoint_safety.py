"""fairseq checkpoints load under torch's weights_only unpickler; other pickled globals are refused."""

import argparse
import os
import pickle

import numpy as np
import pytest
import torch
from fairseq import checkpoint_utils

import fairseq_moec  # noqa: F401  (allowlists fairseq's globals)
from fairseq_moec.modules.config import ConfigError


class RunsACommand:
    """What a malicious checkpoint carries: unpickling it would call os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_real_training_checkpoint_loads_with_weights_only(tiny_moec_checkpoint):
    path, _ = tiny_moec_checkpoint
    state = checkpoint_utils.load_checkpoint_to_cpu(str(path))
    assert "model" in state and any("cluster_dropout.survivors" in k for k in state["model"])
    torch.load(path, weights_only=True)  # no exception: only allowlisted globals inside


def test_old_style_namespace_and_numpy_state_load(tmp_path):
    path = tmp_path / "old.pt"
    torch.save(
        {
            "args": argparse.Namespace(arch="moec_transformer", lr=[1e-3]),
            "model": {},
            "extra_state": {"val_loss": np.float64(3.5), "best": np.float32(2.0)},
        },
        path,
    )
    state = torch.load(path, weights_only=True)
    assert state["args"].arch == "moec_transformer" and float(state["extra_state"]["val_loss"]) == 3.5


def test_checkpoint_with_other_globals_is_refused_not_executed(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": RunsACommand(marker)}, path)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        torch.load(path, weights_only=True)
    with pytest.raises(ConfigError, match=r"evil\.pt: refused, not loaded: it pickles (posix|nt)\.system, which no"):
        checkpoint_utils.load_checkpoint_to_cpu(str(path))  # the refusal, named in one line
    assert not marker.exists()
