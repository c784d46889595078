"""The patches of fairseq's internals (fairseq_moec/patches/): for each, the failure it fixes, run through
fairseq's own function (which the patch keeps) and through the patched one; and the refusal of a patch whose
target is not the one it was written against."""

import argparse
import errno
import gc
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TINY_MOEC_ARGS, run
from fairseq import checkpoint_utils, file_io
from fairseq.data import Dictionary, LanguagePairDataset, data_utils, indexed_dataset
from fairseq.dataclass.configs import CheckpointConfig, DistributedTrainingConfig
from fairseq.distributed import utils as distributed_utils
from fairseq.logging import progress_bar
from fairseq.models.transformer import TransformerConfig
from fairseq.tasks import FairseqTask
from fairseq.trainer import Trainer
from omegaconf import OmegaConf

import fairseq_moec  # noqa: F401  (installs the patches)
from fairseq_moec import patches
from fairseq_moec.modules import ExpertParallel
from fairseq_moec.modules.config import ConfigError
from fairseq_moec.patches import (
    atomic_checkpoint_copy,
    bf16_without_tpu,
    checkpoint_allowlist,
    empty_data,
    expert_parallel_trainer,
    first_epoch_batches,
    fresh_start,
    hydra_legacy_arch,
    last_batch,
    log_file_once,
    one_line_errors,
    peer_broadcast,
    torchrun_cpu,
    unreadable_checkpoint,
)
from fairseq_moec.patches.target import PatchRefused

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- checkpoint_allowlist
def test_checkpoint_allowlist_lets_torch_load_a_fairseq_checkpoint(tmp_path):
    path = tmp_path / "checkpoint_last.pt"  # what fairseq stores besides tensors: old-style args, numpy scalars
    torch.save(
        {
            "args": argparse.Namespace(arch="transformer", lr=[5e-4]),
            "model": {"w": torch.ones(2)},
            "extra_state": {"best": np.float64(3.25), "val_loss": np.float32(3.5)},
        },
        path,
    )
    allowed = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:
        torch.serialization.add_safe_globals(
            [g for g in allowed if g not in checkpoint_allowlist.FAIRSEQ_CHECKPOINT_GLOBALS]
        )
        with pytest.raises(pickle.UnpicklingError, match="weights_only"):
            torch.load(path, weights_only=True)
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(allowed)
    state = torch.load(path, weights_only=True)
    assert state["args"].lr == [5e-4] and state["extra_state"]["best"] == 3.25


# ------------------------------------------------------------------------------------------- peer_broadcast
def broadcast_from_process_0(obj, monkeypatch):
    """fairseq's broadcast_object run as process 0 (src) and then as process 1, the tensors passing through a
    list instead of a process group: what process 1 gets."""
    sent, rank = [], [0]
    monkeypatch.setattr(distributed_utils, "get_rank", lambda group: rank[0])

    def broadcast(tensor, src, group):
        if rank[0] == src:
            sent.append(tensor.clone())
        else:
            tensor.copy_(sent.pop(0))

    monkeypatch.setattr(distributed_utils, "broadcast", broadcast)
    distributed_utils.broadcast_object(obj, src_rank=0, group=None, dist_device=torch.device("cpu"))
    rank[0] = 1
    return distributed_utils.broadcast_object(None, src_rank=0, group=None, dist_device=torch.device("cpu"))


def test_peer_broadcast_lets_other_processes_unpickle_the_checkpoint_process_0_sends(monkeypatch):
    # what Trainer.load_checkpoint broadcasts on resume: load_checkpoint_to_cpu's state, cfg as a DictConfig
    state = {"cfg": OmegaConf.create({"common": {"seed": 3}}), "model": {"w": torch.arange(4.0)}}
    with monkeypatch.context() as m:
        m.setattr(distributed_utils, "_broadcast_object_slow", peer_broadcast.fairseq_broadcast_object_slow)
        with pytest.raises(pickle.UnpicklingError, match="weights_only"):
            broadcast_from_process_0(state, m)
    received = broadcast_from_process_0(state, monkeypatch)
    assert received["cfg"].common.seed == 3 and torch.equal(received["model"]["w"], torch.arange(4.0))


# ---------------------------------------------------------------------------------------------- last_batch
def test_last_batch_keeps_the_batch_the_fork_drops():
    """13 sentences, batches of at most 8 in multiples of 8: 8 + 5."""
    args = {
        "num_tokens_fn": None,
        "num_tokens_vec": np.full(13, 4),
        "max_sentences": 8,
        "required_batch_size_multiple": 8,
    }
    fork = last_batch.fork_batch_by_size(np.arange(13), **args)
    assert sum(len(b) for b in fork) == 8  # 5 sentences never translated or validated
    kept = data_utils.batch_by_size(np.arange(13), **args)
    assert sorted(np.concatenate(kept).tolist()) == list(range(13)) and [len(b) for b in kept] == [8, 5]


# -------------------------------------------------------------------------------------- first_epoch_batches
def pairs():
    """40 sentence pairs of two lengths: the seed decides where sentences of equal length go."""
    d = Dictionary()
    words = [d.add_symbol(w) for w in "abcd"]
    src = [torch.LongTensor([words[i % 4]] * (3 + i % 2) + [d.eos()]) for i in range(40)]
    return LanguagePairDataset(src, [len(s) for s in src], d, src, [len(s) for s in src], d, shuffle=True)


def batches(get_batch_iterator, epoch):
    itr = get_batch_iterator(FairseqTask(None), pairs(), max_sentences=4, seed=7, epoch=epoch)
    assert itr.epoch == epoch
    return [b.tolist() for b in itr.frozen_batches]


def test_first_epoch_batches_resume_with_the_batches_of_the_uninterrupted_run():
    uninterrupted = batches(first_epoch_batches.fork_get_batch_iterator, 1)  # reused for every later epoch
    assert batches(first_epoch_batches.fork_get_batch_iterator, 3) != uninterrupted  # the fork resumed in epoch 3
    assert batches(FairseqTask.get_batch_iterator, 3) == uninterrupted


# --------------------------------------------------------------------------------------------- torchrun_cpu
@pytest.fixture
def torchrun_process_1(monkeypatch):
    """The environment torchrun gives process 1 of 2, on a machine without GPUs."""
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500", "WORLD_SIZE": "2", "RANK": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    return monkeypatch


def distributed_cfg(world_size):
    """fairseq-train's distributed_training config on a CPU (the dataclass alone holds tpu='${common.tpu}')."""
    return DistributedTrainingConfig(distributed_world_size=world_size, tpu=False)


def test_torchrun_cpu_joins_the_processes_of_torchrun(torchrun_process_1):
    with torchrun_process_1.context() as m:
        m.setattr(distributed_utils, "_infer_torch_distributed_launch_init", torchrun_cpu.fairseq_torchrun_init)
        cfg = distributed_cfg(1)  # the default of --distributed-world-size: the number of GPUs, at least 1
        torchrun_cpu.fairseq_infer_init_method(cfg)
        assert cfg.distributed_init_method is None and cfg.distributed_world_size == 1  # trains alone, as rank 0
        with pytest.raises(ZeroDivisionError):  # given the world size: rank % torch.cuda.device_count()
            torchrun_cpu.fairseq_infer_init_method(distributed_cfg(2))
    for world_size in (1, 2):
        cfg = distributed_cfg(world_size)
        distributed_utils.infer_init_method(cfg)
        assert (
            cfg.distributed_init_method,
            cfg.distributed_world_size,
            cfg.distributed_rank,
            cfg.device_id,
            cfg.ddp_backend,
        ) == ("env://", 2, 1, 0, "legacy_ddp")


# ----------------------------------------------------------------------------------------- bf16_without_tpu
def test_bf16_without_tpu_trains_in_bf16_instead_of_looking_for_a_tpu():
    if bf16_without_tpu.importlib.util.find_spec("torch_xla") is not None:
        pytest.skip("torch_xla is installed: --bf16 may mean a TPU")
    from fairseq import options, utils
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    def cfg():
        args = options.parse_args_and_arch(
            options.get_training_parser(), ["data", "--arch", "transformer", "--bf16", "--cpu"]
        )
        return convert_namespace_to_omegaconf(args)

    trained = []

    def main(cfg):  # what fairseq's Trainer does first with cfg.common.tpu
        trained.append(utils.get_tpu_device() if cfg.common.tpu else ("bf16", cfg.common.bf16))

    with pytest.raises(AttributeError, match="xla_device"):
        bf16_without_tpu.fairseq_call_main(cfg(), main)
    distributed_utils.call_main(cfg(), main)
    assert trained == [("bf16", True)]


# ---------------------------------------------------------------------------------------- hydra_legacy_arch
def test_hydra_legacy_arch_keeps_the_options_transformer_config_does_not_declare():
    args = OmegaConf.create({"encoder_layers": 3, "moe_encoder_layers": "1", "moe_expert_count": 4})
    fairseq = hydra_legacy_arch.fairseq_from_namespace(TransformerConfig, args)
    with pytest.raises(AttributeError, match="invalid argument moe_encoder_layers"):
        _ = fairseq.moe_encoder_layers
    config = TransformerConfig.from_namespace(args)
    assert (config.encoder.layers, config.moe_encoder_layers, config.moe_expert_count) == (3, "1", 4)


# -------------------------------------------------------------------------------------------- fresh_start
def fake_trainer(suffix="", calls=None):
    """What checkpoint_utils.load_checkpoint asks of the Trainer; load_checkpoint returns None for a missing
    file, as fairseq's Trainer does."""
    calls = [] if calls is None else calls
    return SimpleNamespace(
        checkpoint_suffix=suffix,
        lr_step=lambda epoch: None,
        task=None,
        load_checkpoint=lambda path, *a, **k: (
            calls.append(path) or ({"train_iterator": {"epoch": 2}} if os.path.isfile(path) else None)
        ),
        get_train_iterator=lambda epoch, **k: SimpleNamespace(epoch=epoch, load_state_dict=lambda s: None),
    )


def test_fresh_start_is_refused_where_fairseq_would_overwrite_checkpoints(tmp_path):
    (tmp_path / "checkpoint_best.pt").write_bytes(b"the better model")
    cfg = CheckpointConfig(save_dir=str(tmp_path))
    calls = []
    _, epoch_itr = fresh_start.fairseq_load_checkpoint(cfg, fake_trainer(calls=calls))
    assert epoch_itr.epoch == 1 and calls == [str(tmp_path / "checkpoint_last.pt")]  # from scratch
    for suffix in ("", "-expert-rank1"):  # process 1 of an expert-parallel run checks the main file too
        with pytest.raises(
            ConfigError,
            match=r"holds 1 checkpoint file\(s\) \(checkpoint_best.pt\) but no "
            r"checkpoint_last.pt",
        ):
            checkpoint_utils.load_checkpoint(cfg, fake_trainer(suffix))
    (tmp_path / "checkpoint_last.pt").write_bytes(b"x")
    for suffix in ("", "-expert-rank1"):  # a resume: no refusal
        checkpoint_utils.load_checkpoint(cfg, fake_trainer(suffix))


# ------------------------------------------------------------------------------------- unreadable_checkpoint
def test_unreadable_checkpoint_is_named(tmp_path):
    empty = tmp_path / "checkpoint_last.pt"
    empty.write_bytes(b"")
    with pytest.raises(Exception) as fairseq:
        unreadable_checkpoint.fairseq_load_checkpoint_to_cpu(str(empty))
    assert str(empty) not in str(fairseq.value) and not isinstance(fairseq.value, ConfigError)
    with pytest.raises(ConfigError, match=f"^{empty}: empty file"):
        checkpoint_utils.load_checkpoint_to_cpu(str(empty))


# ----------------------------------------------------------------------------------------------- empty_data
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # fairseq's __del__ of the failed
def test_empty_data_file_is_named(tmp_path):
    prefix = str(tmp_path / "train.es-en.es")  # what fairseq-preprocess writes for an empty split
    indexed_dataset.make_builder(prefix + ".bin", impl="mmap").finalize(prefix + ".idx")
    assert os.path.getsize(prefix + ".bin") == 0
    with pytest.raises(ValueError, match="cannot mmap an empty file") as fairseq:
        empty_data.fairseq_load_indexed_dataset(prefix, None, "mmap")
    assert prefix not in str(fairseq.value)
    with pytest.raises(ConfigError, match=f"^{prefix}.bin: empty data file .*'train' split"):
        data_utils.load_indexed_dataset(prefix, None, "mmap")
    gc.collect()  # the dataset fairseq failed to open complains when collected: here, not in another test


# ------------------------------------------------------------------------------------------ one_line_errors
def test_one_line_errors_print_a_config_error_as_argparse_does(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["fairseq-train"])
    monkeypatch.setattr(one_line_errors.os, "_exit", lambda status: (_ for _ in ()).throw(SystemExit(status)))
    try:  # fairseq re-raises some errors as its own: the ConfigError is in the chain
        try:
            raise ConfigError("--moe-clusters: must divide --moe-expert-count=8, got 3")
        except ConfigError as e:
            raise RuntimeError("Cannot load model parameters from checkpoint") from e
    except RuntimeError as e:
        error = e
    sys.__excepthook__(type(error), error, error.__traceback__)  # what Python does without the patch
    printed = capsys.readouterr().err
    assert "Traceback" in printed and len(printed.splitlines()) > 5
    assert sys.excepthook is one_line_errors.excepthook
    with pytest.raises(SystemExit) as exit:
        sys.excepthook(type(error), error, error.__traceback__)
    assert exit.value.code == 2
    assert capsys.readouterr().err == "fairseq-train: error: --moe-clusters: must divide --moe-expert-count=8, got 3\n"
    seen = []  # any other exception keeps its traceback
    monkeypatch.setattr(one_line_errors, "previous_excepthook", lambda *a: seen.append(a[1]))
    sys.excepthook(KeyError, KeyError("bug"), None)
    assert [str(e) for e in seen] == ["'bug'"]


def test_one_line_errors_under_fairseq_hydra_train(monkeypatch, capsys):
    from hydra.core.utils import JobReturn, JobStatus

    monkeypatch.setattr(sys, "argv", ["fairseq-hydra-train"])
    job = JobReturn(status=JobStatus.FAILED, _return_value=ConfigError("--moe-cluster-weight: got nan"))
    with pytest.raises(ConfigError):  # hydra re-raises it and prints the traceback
        one_line_errors.hydra_return_value.fget(job)
    assert "Error executing job" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit:
        _ = job.return_value
    assert (
        exit.value.code == 2
        and capsys.readouterr().err == "fairseq-hydra-train: error: --moe-cluster-weight: got nan\n"
    )
    assert JobReturn(status=JobStatus.COMPLETED, _return_value=5).return_value == 5


# ----------------------------------------------------------------------------------- atomic_checkpoint_copy
def test_atomic_checkpoint_copy_keeps_checkpoint_last_when_the_copy_is_cut_short(tmp_path, monkeypatch):
    src, last = tmp_path / "checkpoint_3_600.pt", tmp_path / "checkpoint_last.pt"
    src.write_bytes(b"new" * 1000)
    last.write_bytes(b"old checkpoint")
    assert file_io.PathManager.copy(str(src), str(last), overwrite=True) is True
    assert last.read_bytes() == src.read_bytes() and sorted(os.listdir(tmp_path)) == sorted([last.name, src.name])
    last.write_bytes(b"old checkpoint")

    def copy_cut_short(a, b, **kwargs):  # a full disk, or a run killed, halfway through the copy
        with open(a, "rb") as f, open(b, "wb") as g:
            g.write(f.read(1500))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", copy_cut_short)
    with pytest.raises(OSError):
        atomic_checkpoint_copy.fairseq_copy(str(src), str(last), overwrite=True)
    assert last.read_bytes() == src.read_bytes()[:1500]  # neither the old nor the new checkpoint
    last.write_bytes(b"old checkpoint")
    with pytest.raises(ConfigError, match=rf"^{last}: could not be written \(\[Errno 28\] No space left on device;"):
        file_io.PathManager.copy(str(src), str(last), overwrite=True)
    assert last.read_bytes() == b"old checkpoint"
    assert sorted(os.listdir(tmp_path)) == sorted([last.name, src.name])  # the partial copy is removed


# ---------------------------------------------------------------------------------- expert_parallel_trainer
def test_expert_parallel_trainer_saves_every_process_to_its_own_file(monkeypatch):
    """Process 1 of 2 in an expert-parallel run holds experts that process 0 does not: fairseq saves nothing
    on it, and would give it process 0's file name."""
    monkeypatch.setattr(distributed_utils, "get_data_parallel_rank", lambda: 1)
    trainer = Trainer.__new__(Trainer)  # the properties read cfg and the model only
    trainer.cfg = OmegaConf.create(
        {
            "distributed_training": {"distributed_world_size": 2, "ddp_backend": "c10d"},
            "model": {},
            "checkpoint": {"checkpoint_suffix": ""},
        }
    )
    trainer._model = torch.nn.Module()
    fairseq = expert_parallel_trainer.fairseq_trainer
    for ep, fairseq_saves, saves, suffix in [
        (None, False, False, ""),
        (ExpertParallel(rank=1, world_size=2), False, True, "-expert-rank1"),
    ]:
        trainer._model.expert_parallel = ep
        assert fairseq["should_save_checkpoint_on_current_rank"].fget(trainer) is fairseq_saves
        assert fairseq["checkpoint_suffix"].fget(trainer) == ""
        assert (trainer.should_save_checkpoint_on_current_rank, trainer.checkpoint_suffix) == (saves, suffix)


# -------------------------------------------------------------------------------------------- log_file_once
TRAIN_WITH_OR_WITHOUT_THE_PATCH = """import sys
import fairseq_moec
from fairseq.logging import progress_bar
from fairseq_moec.patches import log_file_once
if sys.argv.pop(1) == "without":
    progress_bar.progress_bar = log_file_once.fairseq_progress_bar
from fairseq_cli.train import cli_main
cli_main()
"""


def json_records_of_a_3_epoch_run(data_bin, work, patch):
    """fairseq-train for 3 epochs (8 updates and one validation each) with --log-file: the json records of the
    file, in order, each as (kind, epoch, update, loss): what tells them apart in a run and matches them across
    runs (their times differ)."""
    log_file = work / f"{patch}.log"
    run(
        [sys.executable, "-c", TRAIN_WITH_OR_WITHOUT_THE_PATCH, patch, data_bin, *TINY_MOEC_ARGS]
        + ["--max-tokens", "6000", "--max-epoch", "3", "--no-save", "--save-dir", work / "checkpoints"]
        + ["--log-file", log_file],
        cwd=ROOT,
    )
    text = log_file.read_text()
    assert text.count("end of epoch") == 3  # fairseq_cli.train's own FileHandler: once each (another logger)
    records = []
    for line in text.splitlines():
        if line.startswith('{"'):  # not the config's {'_name': ...
            r = json.loads(line)
            kind = "valid" if "valid_loss" in r else "train" if "train_loss" in r else "train_inner"
            records.append((kind, r["epoch"], r.get("update"), r.get("loss", r.get(f"{kind}_loss"))))
    return records


def test_log_file_once_writes_each_record_of_every_epoch_once(tiny_corpus, tmp_path):
    _, _, data_bin = tiny_corpus
    fairseq = Counter(json_records_of_a_3_epoch_run(data_bin, tmp_path, "without"))
    patched = json_records_of_a_3_epoch_run(data_bin, tmp_path, "with")
    assert [r[:2] for r in patched if r[0] != "train_inner"] == [(k, e) for e in (1, 2, 3) for k in ("valid", "train")]
    assert len(patched) == len(set(patched)) == 3 * (8 + 2)
    assert fairseq == Counter({r: r[1] for r in patched})  # the same run, epoch N's records N times


def test_log_file_once_closes_the_file_handlers_it_removes(tmp_path, monkeypatch):
    opened = []

    class RecordedFileHandler(logging.FileHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            opened.append(self)

    def three_epochs(progress_bar_function):
        """The handlers opened by one progress bar an epoch: (on the logger, open) each; then removed, closed."""
        opened.clear()
        for _ in range(3):
            progress_bar_function([], log_format="json", log_file=str(tmp_path / "train.log"))
        state = [(h in progress_bar.logger.handlers, h.stream is not None) for h in opened]
        for handler in opened:
            progress_bar.logger.removeHandler(handler)
            handler.close()
        return state

    monkeypatch.setattr(logging, "FileHandler", RecordedFileHandler)
    assert three_epochs(log_file_once.fairseq_progress_bar) == [(True, True)] * 3
    assert three_epochs(progress_bar.progress_bar) == [(True, True), (False, False), (False, False)]


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("patch", patches.PATCHES, ids=lambda p: p.__name__.split(".")[-1])
def test_every_patch_refuses_another_fairseq_version(patch, monkeypatch):
    import fairseq

    monkeypatch.setattr(fairseq, "__version__", "0.12.2")
    with pytest.raises(PatchRefused) as e:
        patch.check()
    assert str(e.value).startswith(
        f"fairseq_moec: patch {patch.PATCH.name} expects fairseq 0.12.3.1 "
        f"(fairseq-fixed), found fairseq 0.12.2; without it {patch.PATCH.fixes}. "
    )


def test_a_target_of_another_shape_is_refused_and_nothing_is_replaced(monkeypatch):
    monkeypatch.setattr(data_utils, "batch_by_size", lambda indices, max_tokens=None: [indices])
    with pytest.raises(
        PatchRefused,
        match=r"^fairseq_moec: patch last_batch expects fairseq\.data\.data_utils\."
        r"batch_by_size\(indices, num_tokens_fn, .*fixed_shapes\), found "
        r"\(indices, max_tokens\); without it fairseq-generate",
    ):
        last_batch.check()
    monkeypatch.delattr(torch.serialization, "add_safe_globals")
    with pytest.raises(PatchRefused, match="expects torch.serialization.add_safe_globals, found no such attribute"):
        checkpoint_allowlist.check()

    applied, refusing = [], last_batch.check  # install() checks every pending patch before it replaces anything
    for patch in patches.PATCHES:
        monkeypatch.setattr(patch, "installed", lambda: False)
        monkeypatch.setattr(patch, "check", lambda: None)
        monkeypatch.setattr(patch, "apply", lambda patch=patch: applied.append(patch))
    monkeypatch.setattr(patches.PATCHES[-1], "check", refusing)  # the last one refuses
    with pytest.raises(PatchRefused, match="last_batch"):
        patches.install()
    assert applied == []
    monkeypatch.setattr(patches.PATCHES[-1], "check", lambda: None)
    patches.install()
    assert applied == list(patches.PATCHES)


def _patch_log_lines(level: str) -> list[str]:
    """The lines on the "fairseq_moec.patches" logger of a fresh process that installs the patches twice."""
    code = (
        f"import logging, sys; logging.basicConfig(level=logging.{level}, stream=sys.stdout, format='%(name)s | "
        "%(levelname)s | %(message)s'); import fairseq_moec; from fairseq_moec import patches; patches.install(); "
        "patches.install()"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    ).stdout
    return [line.split(" | ", 1)[1] for line in out.splitlines() if line.startswith("fairseq_moec.patches | ")]


def test_install_logs_one_info_line_naming_every_patch_once():
    names = [p.PATCH.name for p in patches.PATCHES]
    assert _patch_log_lines("INFO") == [
        f"INFO | patched fairseq {patches.FAIRSEQ_VERSION} in {len(names)} places: {', '.join(names)} "
        "(each one's reason at DEBUG)"
    ]


def test_install_logs_each_patch_reason_once_at_debug():
    lines = [line.split(" | ", 1)[1] for line in _patch_log_lines("DEBUG") if line.startswith("DEBUG | ")]
    assert [line.split(":")[0] for line in lines] == [p.PATCH.name for p in patches.PATCHES]
    assert all(" replaced " in line or " added " in line for line in lines)


def test_importing_the_plugin_leaves_the_root_logger_as_it_was():
    """fairseq's import runs logging.basicConfig(level=DEBUG); a script that imports the plugin first keeps an
    unconfigured root logger (WARNING, no handler), so its own basicConfig works, while a root configured before the
    import keeps its level and handler."""
    code = (
        "import logging, sys; {before}import fairseq_moec; root = logging.getLogger(); "
        "print(logging.getLevelName(root.level), len(root.handlers))"
    )
    outputs = []
    for before in ("", "logging.basicConfig(level=logging.INFO, stream=sys.stderr); "):
        run = subprocess.run(
            [sys.executable, "-c", code.format(before=before)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
        outputs.append(run.stdout.strip())
    assert outputs == ["WARNING 0", "INFO 1"]
