"""What a careless first week does to a run: changed cluster layouts on resume, numbers that pass validation and
fail later, lost or empty checkpoints, empty data, and the form of the error messages (one line, no traceback)."""

import math
import os
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import PLUGIN, TINY_MOEC_ARGS, cli, run
from fairseq import checkpoint_utils

import fairseq_moec  # noqa: F401  (installs the input checks and the one-line errors)
from fairseq_moec import input_checks
from fairseq_moec.criterions.moec_label_smoothed_cross_entropy import MoECLabelSmoothedCrossEntropy
from fairseq_moec.modules import ClusterDropout
from fairseq_moec.modules.config import ConfigError
from fairseq_moec.modules.dropout import SEED_MULTIPLIER, generator_seed


# ------------------------------------------------------------------------------- cluster dropout on resume
def fits(mask, clusters, dropped):
    """Every cluster keeps exactly m - dropped experts."""
    return mask.view(clusters, -1).sum(1).tolist() == [mask.numel() // clusters - dropped] * clusters


def dropout(E=8, G=2, rate=0.5, interval=100, seed=1, layer_id=1001):
    return ClusterDropout(E, G, rate, interval, seed, layer_id)


def resume(saved_module, saved_at, new, updates):
    """Save after ``saved_at`` training updates and resume into ``new`` as fairseq does (set_num_updates, then
    load_state_dict, then one set_num_updates per train step); the masks the resumed run routes with."""
    saved_module.set_num_updates(saved_at - 1)  # the last train step before the save
    new.set_num_updates(saved_at)  # fairseq's Trainer.load_checkpoint calls this before loading the state
    new.load_state_dict(saved_module.state_dict())
    masks = []
    for update in updates:
        new.set_num_updates(update)
        mask = new.train().mask()
        masks.append(None if mask is None else mask.clone())  # the module updates its mask in place
    return masks


CHANGES = {  # name: (settings of the saved run, settings of the resumed run)
    "clusters 2 -> 4": (dict(G=2), dict(G=4)),
    "clusters 4 -> 2": (dict(G=4), dict(G=2)),
    "rate 0.5 -> 0.25": (dict(rate=0.5), dict(rate=0.25)),
    "rate 0.25 -> 0.75": (dict(rate=0.25), dict(rate=0.75)),
    "rate 0 -> 0.5": (dict(rate=0.0), dict(rate=0.5)),
    "rate 0.5 -> 0": (dict(rate=0.5), dict(rate=0.0)),
    "interval 100 -> 3": (dict(interval=100), dict(interval=3)),
    "interval 3 -> 100": (dict(interval=3), dict(interval=100)),
    "seed 1 -> 2": (dict(seed=1), dict(seed=2)),
    "experts 8 -> 16": (dict(E=8), dict(E=16)),
    "unchanged": (dict(), dict()),
}


@pytest.mark.parametrize("change", CHANGES)
def test_resumed_masks_are_those_of_the_current_settings(change):
    """Whatever changed, the resumed run routes with the masks a fresh run with its settings has at those
    updates: valid for its (E, G, rate), never the stale saved mask. Saved mid-period (update 10 of 100)."""
    old, new = CHANGES[change]
    masks = resume(dropout(**old), 10, dropout(**new), range(10, 14))
    reference = dropout(**new)
    for update, mask in zip(range(10, 14), masks):
        reference.set_num_updates(update)
        expected = reference.train().mask()
        if expected is None:
            assert mask is None
            continue
        assert torch.equal(mask, expected), update
        assert fits(mask, reference.num_clusters, reference.num_dropped)


def test_a_stale_mask_would_empty_a_cluster():
    """The premise of the test above: with clusters 2 -> 4 the saved mask leaves a new cluster without experts
    (for this layer and seed), so keeping it is what made the first update NaN."""
    saved = dropout(G=2)
    saved.set_num_updates(9)
    assert not fits(saved.survivors, 4, 1) and saved.survivors.view(4, 2).sum(1).min() == 0


def test_the_mask_is_redrawn_even_when_the_saved_one_fits():
    """The decision: after loading, the mask is a function of (settings, saved period). With unchanged settings
    that is the saved mask (the 'unchanged' case above); a saved mask that differs but happens to fit the
    current layout (e.g. the old layout's, or another generator's) is replaced too."""
    saved = dropout()
    saved.set_num_updates(9)
    state = saved.state_dict()
    other = torch.tensor([True, False, True, False] * 2)
    assert fits(other, 2, 2) and not torch.equal(other, saved.survivors)
    state["survivors"] = other
    restored = dropout()
    restored.load_state_dict(state)
    assert torch.equal(restored.survivors, saved.survivors)


def test_resume_with_dropout_turned_off_saves_a_clean_state():
    saved = dropout(rate=0.5)
    saved.set_num_updates(9)
    off = dropout(rate=0.0)
    off.load_state_dict(saved.state_dict())
    assert off.train().mask() is None
    assert bool(off.survivors.all()) and int(off.period) == -1


# ------------------------------------------------------------------------------------- generator seeds
def test_generator_seed_is_unchanged_where_torch_accepted_it_and_total_elsewhere():
    P = SEED_MULTIPLIER
    for seed, layer, period in ((1, 3, 0), (7, 1001, 12), (18_446_632, 1001, 10**6), (-5, 0, 3)):
        raw = (seed * P + layer) * P + period
        assert -(2**63) <= raw < 2**64  # what torch.Generator.manual_seed accepted before
        expected = torch.Generator().manual_seed(raw).initial_seed()
        assert torch.Generator().manual_seed(generator_seed(seed, layer, period)).initial_seed() == expected
    for seed in (18_446_634, 2**40, 2**64 - 1):  # overflowed torch's seed before ("about 1.8e7")
        d = ClusterDropout(8, 2, 0.5, 1, seed, 1001)
        d.set_num_updates(10**9)
        assert fits(d.survivors, 2, 2)
    a, b = ClusterDropout(8, 2, 0.5, 1, 2**40, 1), ClusterDropout(8, 2, 0.5, 1, 2**40 + 1, 1)
    assert any(not torch.equal(a.sample(k), b.sample(k)) for k in range(8))


# ---------------------------------------------------------------------------------------- criterion weights
@pytest.mark.parametrize(
    "flag,value",
    [
        ("moe_balance_weight", -0.01),
        ("moe_balance_weight", math.inf),
        ("moe_cluster_weight", math.nan),
        ("moe_cluster_weight", -1.0),
        ("moe_z_weight", math.inf),
        ("moe_z_weight", -1e-3),
        ("label_smoothing", math.nan),
        ("label_smoothing", 1.0),
    ],
)
def test_criterion_refuses_weights_that_are_not_finite_and_non_negative(flag, value):
    kwargs = dict(task=None, sentence_avg=False, label_smoothing=0.1)
    kwargs[flag] = value
    with pytest.raises(ConfigError, match=f"--{flag.replace('_', '-')}: must be"):
        MoECLabelSmoothedCrossEntropy(**kwargs)


def test_criterion_accepts_zero_weights():
    c = MoECLabelSmoothedCrossEntropy(None, False, 0.0, moe_balance_weight=0.0, moe_cluster_weight=0.0)
    assert c.weights == {"balance": 0.0, "cluster": 0.0, "z": 0.0}


# ------------------------------------------------------------------------------ starting next to checkpoints
def checkpoint_cfg(save_dir, **kw):
    return SimpleNamespace(
        **dict(
            dict(
                save_dir=str(save_dir),
                restore_file="checkpoint_last.pt",
                no_save=False,
                finetune_from_model=None,
                continue_once=None,
            ),
            **kw,
        )
    )


def touch(path, data=b"x", age=0.0):
    path.write_bytes(data)
    t = 1_700_000_000 - age
    os.utime(path, (t, t))
    return path


def test_fresh_start_is_refused_next_to_checkpoints(tmp_path):
    touch(tmp_path / "checkpoint_best.pt", age=100)
    newest = touch(tmp_path / "checkpoint_3_600.pt", age=10)
    touch(tmp_path / "checkpoint_3_600-expert-rank1.pt", age=5)  # shards are not a resume point
    with pytest.raises(ConfigError) as e:
        input_checks.refuse_start_from_scratch(checkpoint_cfg(tmp_path))
    msg = str(e.value)
    assert msg.startswith(f"--save-dir {tmp_path}: holds 3 checkpoint file(s)")
    assert f"--restore-file {newest}" in msg and "another --save-dir" in msg and "\n" not in msg


def test_fresh_start_only_shards_or_empty_files(tmp_path):
    touch(tmp_path / "checkpoint_last-expert-rank1.pt")
    touch(tmp_path / "checkpoint_1_100.pt", data=b"")
    with pytest.raises(ConfigError, match="None of them is an intact checkpoint"):
        input_checks.refuse_start_from_scratch(checkpoint_cfg(tmp_path))


@pytest.mark.parametrize(
    "case",
    [
        "fresh dir",
        "missing dir",
        "resume",
        "expert-parallel resume",
        "no-save",
        "restore-file",
        "finetune",
        "other files",
    ],
)
def test_what_keeps_working(tmp_path, case):
    cfg = checkpoint_cfg(tmp_path)
    if case == "missing dir":
        cfg = checkpoint_cfg(tmp_path / "not-yet")
    elif case == "resume":
        touch(tmp_path / "checkpoint_last.pt"), touch(tmp_path / "checkpoint_best.pt")
    elif case == "expert-parallel resume":  # every process checks the main file's name
        touch(tmp_path / "checkpoint_last.pt"), touch(tmp_path / "checkpoint_last-expert-rank1.pt")
    elif case == "no-save":
        touch(tmp_path / "checkpoint_best.pt")
        cfg = checkpoint_cfg(tmp_path, no_save=True)
    elif case == "restore-file":
        touch(tmp_path / "checkpoint_best.pt")
        cfg = checkpoint_cfg(tmp_path, restore_file=str(touch(tmp_path / "checkpoint_best.pt")))
    elif case == "finetune":
        touch(tmp_path / "checkpoint_best.pt")
        cfg = checkpoint_cfg(tmp_path, finetune_from_model=str(tmp_path / "checkpoint_best.pt"))
    elif case == "other files":
        touch(tmp_path / "crash.pt"), touch(tmp_path / "train.log"), touch(tmp_path / "checkpoint_last.pt.tmp")
    input_checks.refuse_start_from_scratch(cfg)


def test_missing_restore_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"--restore-file .*checkpoint_9\.pt: no such file"):
        input_checks.refuse_start_from_scratch(checkpoint_cfg(tmp_path, restore_file=str(tmp_path / "checkpoint_9.pt")))


# ------------------------------------------------------------------------------------ unreadable checkpoints
def test_empty_and_truncated_checkpoints_name_the_file_and_the_way_out(tmp_path):
    intact = tmp_path / "checkpoint_2_4.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, intact)
    empty = touch(tmp_path / "checkpoint_last.pt", data=b"")
    with pytest.raises(ConfigError) as e:
        checkpoint_utils.load_checkpoint_to_cpu(str(empty))
    assert str(e.value).startswith(f"{empty}: empty file (0 bytes), not a readable checkpoint")
    assert f"--restore-file {intact}" in str(e.value)
    truncated = tmp_path / "checkpoint_best.pt"
    truncated.write_bytes(intact.read_bytes()[:2000])
    with pytest.raises(ConfigError, match=re.escape(f"{truncated}: truncated or corrupt")):
        checkpoint_utils.load_checkpoint_to_cpu(str(truncated))
    legacy = tmp_path / "old.pt"  # torch's pre-zip format: an EOFError or a storage read error when cut
    torch.save({"w": torch.zeros(1000)}, legacy, _use_new_zipfile_serialization=False)
    whole = legacy.read_bytes()
    for cut in (50, 500):
        legacy.write_bytes(whole[:cut])
        with pytest.raises(ConfigError, match=re.escape(f"{legacy}: truncated")):
            checkpoint_utils.load_checkpoint_to_cpu(str(legacy))


# ---------------------------------------------------------------------------------------------------- data
def test_empty_data_file_is_named(tmp_path):
    (tmp_path / "train.es-en.es.idx").write_bytes(b"idx")
    (tmp_path / "train.es-en.es.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}/train.es-en.es.bin: empty data file") + r".*'train'"):
        input_checks.refuse_empty_data(str(tmp_path / "train.es-en.es"))
    (tmp_path / "valid.es-en.es.bin").write_bytes(b"\0" * 8)
    input_checks.refuse_empty_data(str(tmp_path / "valid.es-en.es"))  # not empty
    (tmp_path / "valid.es-en.es1.bin").write_bytes(b"")  # an empty second shard, loaded only with combine
    input_checks.refuse_empty_data(str(tmp_path / "valid.es-en.es"))
    with pytest.raises(ConfigError, match=r"valid\.es-en\.es1\.bin: empty data file"):
        input_checks.refuse_empty_data(str(tmp_path / "valid.es-en.es"), combine=True)


# --------------------------------------------------------------------------- through the real commands


def assert_one_line_error(proc, prog, message):
    """argparse's form: exit status 2, the last line of stderr is "PROG: error: MESSAGE", no traceback."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: {message}"), last
    assert sum("error:" in line for line in out.splitlines()) == 1


TRAIN = [*TINY_MOEC_ARGS, "--max-update", "2"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags,message",
    [
        (["--moe-expert-count", "8", "--moe-clusters", "3"], "--moe-clusters: must be >= 1 and divide"),
        (["--moe-cluster-weight", "nan"], "--moe-cluster-weight: must be a finite number >= 0, got nan"),
    ],
)
def test_train_prints_a_bad_flag_as_one_line(tiny_corpus, tmp_path, flags, message):
    _, _, data_bin = tiny_corpus
    proc = run([cli("fairseq-train"), data_bin, *TRAIN, "--save-dir", tmp_path, *flags], check=False)
    assert_one_line_error(proc, "fairseq-train", message)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("command", ["fairseq-generate", "fairseq-interactive"])
def test_generate_and_interactive_print_an_empty_checkpoint_as_one_line(tiny_corpus, tmp_path, command):
    _, _, data_bin = tiny_corpus
    empty = touch(tmp_path / "checkpoint_last.pt", data=b"")
    proc = run(
        [cli(command), data_bin, "--user-dir", PLUGIN, "--task", "translation_moec", "--path", empty, "--cpu"],
        check=False,
    )
    assert_one_line_error(proc, command, f"{empty}: empty file (0 bytes), not a readable checkpoint")


@pytest.mark.slow
def test_hydra_train_prints_a_bad_flag_as_one_line(tiny_corpus, tmp_path):
    _, _, data_bin = tiny_corpus
    (tmp_path / "run.yaml").write_text(f"""\
common: {{user_dir: {PLUGIN}, cpu: true, seed: 3}}
task: {{_name: translation_moec, data: {data_bin}}}
model: {{_name: moec_transformer_tiny, share_all_embeddings: true, moe_expert_count: 8, moe_clusters: 3}}
criterion: {{_name: moec_label_smoothed_cross_entropy, label_smoothing: 0.1}}
optimizer: {{_name: adam}}
lr_scheduler: {{_name: fixed}}
optimization: {{lr: [0.002], max_update: 2}}
dataset: {{max_tokens: 1500, num_workers: 0}}
checkpoint: {{save_dir: {tmp_path / "ck"}}}
hydra: {{run: {{dir: {tmp_path / "hydra"}}}}}
""")
    proc = run([cli("fairseq-hydra-train"), "--config-dir", tmp_path, "--config-name", "run"], check=False)
    assert_one_line_error(proc, "fairseq-hydra-train", "--moe-clusters: must be >= 1 and divide")


@pytest.mark.slow
def test_train_refuses_to_start_from_scratch_next_to_a_better_checkpoint(tiny_corpus, tmp_path):
    _, _, data_bin = tiny_corpus
    best = touch(tmp_path / "checkpoint_best.pt", data=b"the better model")
    proc = run([cli("fairseq-train"), data_bin, *TRAIN, "--save-dir", tmp_path], check=False)
    assert_one_line_error(
        proc,
        "fairseq-train",
        f"--save-dir {tmp_path}: holds 1 checkpoint file(s) (checkpoint_best.pt) but no checkpoint_last.pt",
    )
    assert f"--restore-file {best}" in proc.stderr and "num_updates" not in proc.stderr
    assert best.read_bytes() == b"the better model" and sorted(p.name for p in tmp_path.iterdir()) == [best.name]


@pytest.mark.slow
def test_train_names_an_empty_checkpoint_last(tiny_corpus, tmp_path):
    _, _, data_bin = tiny_corpus
    empty = touch(tmp_path / "checkpoint_last.pt", data=b"")
    proc = run([cli("fairseq-train"), data_bin, *TRAIN, "--save-dir", tmp_path], check=False)
    assert_one_line_error(proc, "fairseq-train", f"{empty}: empty file (0 bytes), not a readable checkpoint")
    assert "there is no intact checkpoint next to it" in proc.stderr


@pytest.mark.slow
def test_train_names_an_empty_training_split(tiny_corpus, tmp_path):
    _, _, data_bin = tiny_corpus
    (tmp_path / "empty.es").write_text(""), (tmp_path / "empty.en").write_text("")
    run(
        [
            cli("fairseq-preprocess"),
            "--source-lang",
            "es",
            "--target-lang",
            "en",
            "--trainpref",
            tmp_path / "empty",
            "--validpref",
            data_bin.parent / "tok" / "valid",
            "--srcdict",
            data_bin / "dict.es.txt",
            "--joined-dictionary",
            "--destdir",
            tmp_path / "bin",
            "--workers",
            "1",
        ]
    )
    proc = run([cli("fairseq-train"), tmp_path / "bin", *TRAIN, "--save-dir", tmp_path / "ck"], check=False)
    assert_one_line_error(proc, "fairseq-train", f"{tmp_path / 'bin'}/train.es-en.es.bin: empty data file")


@pytest.mark.slow
def test_resume_with_more_clusters_trains_with_the_new_layout(tiny_corpus, tmp_path):
    """The reported case: train with 2 clusters, resume inside the dropout period with 4. Before, the saved
    mask left a cluster empty and the first update died with 'gradients are Nan/Inf'."""
    _, _, data_bin = tiny_corpus
    args = [*TINY_MOEC_ARGS, "--moe-expert-count", "8", "--cluster-dropout-interval", "100", "--save-dir", tmp_path]
    run([cli("fairseq-train"), data_bin, *args, "--max-update", "2", "--moe-clusters", "2"])
    saved = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)["model"]
    layers = {"encoder.layers.1": 1, "decoder.layers.1": 1001}  # layer ids seed the masks
    stale = {name: saved[f"{name}.fc1.moe.cluster_dropout.survivors"] for name in layers}
    assert any(not fits(mask, 4, 1) for mask in stale.values())  # the premise: the old masks do not fit

    proc = run([cli("fairseq-train"), data_bin, *args, "--max-update", "4", "--moe-clusters", "4"])
    losses = [float(x) for x in re.findall(r'"loss": "([^"]+)"', proc.stdout + proc.stderr)]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert "--moe-clusters, --cluster-dropout or --moe-seed changed since the checkpoint was saved" in proc.stdout
    resumed = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)["model"]
    for name, layer_id in layers.items():
        mask = resumed[f"{name}.fc1.moe.cluster_dropout.survivors"]
        assert torch.equal(mask, ClusterDropout(8, 4, 0.5, 100, 1, layer_id).sample(0)) and fits(mask, 4, 1)
