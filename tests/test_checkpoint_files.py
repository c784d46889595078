"""Checkpoint files that cannot be read, and checkpoint writes that fail. Every unreadable checkpoint (bytes
flipped inside the pickle, a damaged zip directory, a directory or a text file in its place, a missing --path)
is named in one line, with the newest intact checkpoint next to it, by every entry point: fairseq-train,
-generate, -interactive, the hub interface, consolidate_checkpoint.py, average_checkpoints.py and the analysis.
A write that fails for want of space (simulated, after a good save) names the file, leaves no partial file and
the last good checkpoint intact: it still loads."""

import argparse
import collections
import errno
import importlib.util
import os
import pickle
import re
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PLUGIN, TINY_MOEC_ARGS, cli, run
from fairseq import checkpoint_utils
from test_reliability import assert_one_line_error

import fairseq_moec  # noqa: F401  (installs the patches)
from fairseq_moec import input_checks
from fairseq_moec.modules.config import ConfigError
from fairseq_moec.patches import failed_checkpoint_save, unreadable_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def fairseq_state(value=1.0):
    """What fairseq's loader needs of a checkpoint, with the globals fairseq checkpoints hold."""
    return {
        "cfg": {"model": argparse.Namespace(arch="moec_transformer_tiny", moe_expert_count=4)},
        "model": collections.OrderedDict(w=torch.full((1000,), value)),
        "optimizer_history": [{"num_updates": 3, "optimizer_name": "Adam", "lr_scheduler_state": {"best": 2.5}}],
        "extra_state": {"best": np.float64(2.5), "train_iterator": {"epoch": 1}},
    }


def pickle_span(data: bytes, path) -> slice:
    """Where the archive's data.pkl lies in the file (torch writes it uncompressed)."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data.pkl"))
    name, extra = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name + extra
    return slice(start, start + info.compress_size)


def damaged(intact, path, how):
    data = bytearray(intact.read_bytes())
    span = pickle_span(data, intact)
    if how == "zeros in the pickle":
        middle = (span.start + span.stop) // 2
        data[middle : middle + 4] = b"\0\0\0\0"
    elif how == "ones in the pickle":
        data[span.stop - 40 : span.stop - 36] = b"\xff\xff\xff\xff"
    elif how == "a global renamed":
        at = data.index(b"collections\nOrderedDict", span.start)
        data[at : at + 23] = b"collections\nOrderedDicx"
    elif how == "zip directory":  # the signature of its end record
        at = data.rindex(b"PK\x05\x06")
        data[at : at + 4] = b"\0\0\0\0"
    path.write_bytes(bytes(data))
    return path


DAMAGE = {  # how the file is damaged: the start of the reason in the line
    "zeros in the pickle": "truncated or corrupt (torch.load: UnpicklingError: Unsupported operand 0)",
    "ones in the pickle": "truncated or corrupt (torch.load: ",
    "a global renamed": "refused, not loaded: it pickles collections.OrderedDicx, which no fairseq checkpoint holds",
    "zip directory": "truncated or corrupt (torch.load: OSError: [Errno 22] Invalid argument)",
}


@pytest.fixture
def intact(tmp_path):
    path = tmp_path / "checkpoint_1_3.pt"
    torch.save(fairseq_state(), path)
    return path


@pytest.mark.parametrize("how", DAMAGE)
def test_a_damaged_checkpoint_is_named_in_one_line(intact, how):
    bad = damaged(intact, intact.parent / "checkpoint_last.pt", how)
    with pytest.raises(Exception) as torch_error:  # the damage is real: torch.load fails, naming no file
        torch.load(bad, weights_only=True)
    assert not isinstance(torch_error.value, ConfigError) and str(bad) not in str(torch_error.value)
    with pytest.raises(Exception) as fairseq:  # fairseq's loader, which the patch keeps
        unreadable_checkpoint.fairseq_load_checkpoint_to_cpu(str(bad))
    assert not isinstance(fairseq.value, ConfigError)
    with pytest.raises(ConfigError) as error:
        checkpoint_utils.load_checkpoint_to_cpu(str(bad))
    message = str(error.value)
    assert message.startswith(f"{bad}: {DAMAGE[how]}") and "\n" not in message
    if how != "a global renamed":
        assert message.endswith(
            f"not a readable checkpoint (a save cut short, e.g. by a full disk, or a damaged copy). Delete it; the "
            f"newest intact checkpoint next to it is {intact} (fairseq-train: --restore-file {intact}; "
            f"fairseq-generate/-interactive: --path {intact})"
        )
    checkpoint_utils.load_checkpoint_to_cpu(str(intact))  # the intact one still loads


def test_what_is_not_a_checkpoint_file_is_named(tmp_path):
    text = tmp_path / "dict.en.txt"
    text.write_text("hello 1\n")
    with pytest.raises(ConfigError, match=re.escape(f"{text}: not a checkpoint (neither of the file formats")):
        checkpoint_utils.load_checkpoint_to_cpu(str(text))
    torch.save(fairseq_state(), tmp_path / "checkpoint_last.pt")
    with pytest.raises(
        ConfigError,
        match=re.escape(f"{tmp_path}: a directory, not a checkpoint file (its newest checkpoint is {tmp_path}/"),
    ):
        checkpoint_utils.load_checkpoint_to_cpu(str(tmp_path))
    missing = tmp_path / "checkpoint_best.pt"
    with pytest.raises(ConfigError) as error:  # fairseq-generate, -interactive, the hub: --path
        checkpoint_utils.load_model_ensemble_and_task([str(missing)])
    assert str(error.value) == (
        f"{missing}: no such checkpoint file (the newest checkpoint in {tmp_path} is {tmp_path}/checkpoint_last.pt)"
    )


def test_an_error_that_is_not_about_the_file_keeps_its_traceback(intact):
    def buggy_loader(path):
        raise KeyError("best_loss")  # e.g. fairseq's upgrade of a state it does not know

    with pytest.raises(KeyError):
        input_checks.load_checkpoint_file(str(intact), buggy_loader)


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_scripts_and_the_hub_name_a_damaged_checkpoint_in_the_same_line(intact, tiny_corpus):
    bad = damaged(intact, intact.parent / "checkpoint_last.pt", "zeros in the pickle")
    with pytest.raises(ConfigError) as error:
        checkpoint_utils.load_checkpoint_to_cpu(str(bad))
    line = str(error.value)
    from fairseq.models.transformer import TransformerModel

    from fairseq_moec.analyze import analyze

    data_bin = str(tiny_corpus[2])
    calls = {
        "hub": lambda: TransformerModel.from_pretrained(str(bad.parent), checkpoint_file=bad.name),
        "analyze": lambda: analyze(str(bad), data_bin, progress=False),
        "consolidate": lambda: load_script(ROOT / "scripts" / "consolidate_checkpoint.py").merged(str(bad)),
        "average": lambda: load_script(ROOT / "scripts" / "wmt" / "average_checkpoints.py").load_state(str(bad)),
    }
    for name, call in calls.items():
        with pytest.raises(Exception) as error:
            call()
        assert str(error.value) == line, name


@pytest.mark.slow
@pytest.mark.parametrize("command", ["fairseq-train", "fairseq-generate", "fairseq-interactive"])
def test_the_commands_name_a_damaged_checkpoint_in_one_line(intact, tiny_corpus, command):
    bad = damaged(intact, intact.parent / "checkpoint_last.pt", "zeros in the pickle")
    data_bin = tiny_corpus[2]
    if command == "fairseq-train":  # resuming from it
        argv = [data_bin, *TINY_MOEC_ARGS, "--max-update", "6", "--save-dir", bad.parent]
    else:
        argv = [data_bin, "--user-dir", PLUGIN, "--task", "translation_moec", "--path", bad, "--cpu"]
    proc = run([cli(command), *argv], check=False)
    assert_one_line_error(proc, command, f"{bad}: {DAMAGE['zeros in the pickle']}, not a readable checkpoint")
    assert sorted(p.name for p in bad.parent.iterdir()) == sorted([bad.name, intact.name])


# ------------------------------------------------------------------------------------------ a full disk
def full_disk(kind="os"):
    """A torch.save that writes part of the file, then fails as it does when the disk is full: with the OSError
    of the write, or with the RuntimeError of torch's zip writer (the OSError as its context)."""
    real_save = torch.save

    def save(obj, f):
        real_save(obj, f)
        f.truncate(f.tell() // 2)
        if kind == "os":
            raise OSError(errno.ENOSPC, "No space left on device")
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from None

    return save


def failed_save_line(path, last):
    return (
        rf"^{re.escape(str(path))}: could not be written \(\[Errno 28\] No space left on device; [0-9.]+ MiB free "
        rf"in {re.escape(str(path.parent))}\); the partial file was removed\. The last good checkpoint, "
        rf"{re.escape(str(last))}, is intact: free some space and run the same command to resume$"
    )


@pytest.mark.parametrize("kind", ["os", "zip writer"])
@pytest.mark.parametrize("name", ["checkpoint_best.pt", "checkpoint_last.pt", "checkpoint_2_6.pt"])
def test_a_full_disk_after_a_good_save_keeps_the_good_checkpoint(tmp_path, monkeypatch, kind, name):
    last = tmp_path / "checkpoint_last.pt"
    checkpoint_utils.torch_persistent_save(fairseq_state(1.0), str(last))  # the good save (fairseq's Trainer call)
    good = last.read_bytes()
    monkeypatch.setattr(torch, "save", full_disk(kind))
    target = tmp_path / name
    with pytest.raises(ConfigError, match=failed_save_line(target, last)):
        checkpoint_utils.torch_persistent_save(fairseq_state(2.0), str(target))
    assert os.listdir(tmp_path) == [last.name] and last.read_bytes() == good  # no partial file next to it
    state = checkpoint_utils.load_checkpoint_to_cpu(str(last))
    assert torch.equal(state["model"]["w"], torch.full((1000,), 1.0))


def test_fairseq_itself_leaves_the_partial_file(tmp_path, monkeypatch):
    """What the patch fixes: fairseq's writer tries three times (logging a traceback) and keeps NAME.tmp."""
    monkeypatch.setattr(torch, "save", full_disk())
    monkeypatch.setattr(checkpoint_utils.time, "sleep", lambda seconds: None)
    with pytest.raises(OSError):
        failed_checkpoint_save.fairseq_torch_persistent_save(fairseq_state(), str(tmp_path / "checkpoint_last.pt"))
    assert os.listdir(tmp_path) == ["checkpoint_last.pt.tmp"]


def test_a_full_disk_before_any_save_and_an_error_of_another_kind(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", full_disk())
    with pytest.raises(ConfigError, match="No checkpoint had been saved there before: free some space and start"):
        checkpoint_utils.torch_persistent_save(fairseq_state(), str(tmp_path / "checkpoint_best.pt"))
    (tmp_path / "checkpoint_best.pt").write_bytes(pickle.dumps("an older, intact file"))  # not checkpoint_last.pt

    def unpicklable(obj, f):
        raise pickle.PicklingError("Can't pickle <function <lambda>>")  # a bug, not the disk

    monkeypatch.setattr(torch, "save", unpicklable)
    with pytest.raises(pickle.PicklingError):
        checkpoint_utils.torch_persistent_save(fairseq_state(), str(tmp_path / "checkpoint_last.pt"))
    assert os.listdir(tmp_path) == ["checkpoint_best.pt"]
