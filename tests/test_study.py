"""scripts/study.py and study_report.py without training: the plan, the commands, log parsing, the allocation
numbers, the tables with real sacrebleu paired tests, and run-level resumability; the train-data loss in eval
mode through the real fairseq-validate on the tiny checkpoint of conftest."""

import json
import random
import re
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
import sacrebleu
import study
import study_report
from conftest import FIXTURE

from fairseq_moec.pipeline import machine

# stdout of the study's fairseq-validate command (study.train_eval) on conftest's tiny MoEC checkpoint, with
# --log-interval 2 added so that per-batch records (unprefixed keys, sums) come before the end-of-subset one
VALIDATE_OUTPUT = Path(__file__).parent / "fixtures" / "fairseq_validate_train_subset.log"


def args_of(tmp_path, *extra, plan="v2"):
    return study.parse_args(
        ["--plan", plan, "--out", str(tmp_path / "out"), "--device", "cpu", "--plot-dir", str(tmp_path / "img"), *extra]
    )


def flag(cmd, name):
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_plan_runs_and_their_flags(tmp_path):
    args = args_of(tmp_path)
    runs = {r.name: r for r in study.plan_v2(args.seeds)}
    assert [r.name for r in study.plan_v2((1,))][:5] == ["dense-s1", "moe32-s1", "moec32-s1", "moe8-s1", "moec8-s1"]
    assert len([r for r in runs.values() if not r.evaluate_of]) == 2 * 5 + 3
    cmd = [str(c) for c in study.train_cmd(args, runs["moec32-s2"], Path("bin"), tmp_path)]
    # MoEC: clusters of 8 (G = 4 at E = 32), dropout 0.5, and the cluster weight is the plugin's default
    assert (flag(cmd, "--moe-expert-count"), flag(cmd, "--moe-clusters"), flag(cmd, "--cluster-dropout")) == (
        "32",
        "4",
        "0.5",
    )
    assert "--moe-cluster-weight" not in cmd and flag(cmd, "--seed") == flag(cmd, "--moe-seed") == "2"
    assert (
        flag([str(c) for c in study.train_cmd(args, runs["moec8-s1"], Path("bin"), tmp_path)], "--moe-clusters") == "2"
    )  # at least 2 clusters
    moe = [str(c) for c in study.train_cmd(args, runs["moe32-s1"], Path("bin"), tmp_path)]
    assert (flag(moe, "--moe-clusters"), flag(moe, "--cluster-dropout"), flag(moe, "--moe-cluster-weight")) == (
        "1",
        "0.0",
        "0",
    )
    dense = [str(c) for c in study.train_cmd(args, runs["dense-s1"], Path("bin"), tmp_path)]
    assert flag(dense, "--arch") == "transformer" and "--moe-expert-count" not in dense
    for name, expect in (
        ("moec32-lossonly-s1", ("0.0", None, None)),
        ("moec32-droponly-s1", ("0.5", "0", None)),
        ("moec32-official-s1", ("0.5", "0.01", "official")),
    ):
        c = [str(x) for x in study.train_cmd(args, runs[name], Path("bin"), tmp_path)]
        assert (
            flag(c, "--cluster-dropout"),
            flag(c, "--moe-cluster-weight"),
            flag(c, "--moe-cluster-loss-norm"),
        ) == expect, name
    # every run trains the same number of updates with the same schedule
    assert {
        flag([str(c) for c in study.train_cmd(args, r, Path("b"), tmp_path)], "--max-update") for r in runs.values()
    } == {"1200"}
    assert runs["moec32-s1-keepmask"].evaluate_of == "moec32-s1"


def test_unknown_run_name_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        args_of(tmp_path, "--only", "dense-s1,moe64-s1")
    assert e.value.code == 2 and "moe64-s1" in capsys.readouterr().err


def write_log(path, valid, train):
    """fairseq --log-file json lines (numbers as strings, as fairseq writes them); a resumed session repeats the
    validation of update 200 with another value: the later one wins."""
    lines = ["some fairseq text line\n"]
    for u, loss in train:
        lines.append(json.dumps({"epoch": "1", "loss": str(loss), "num_updates": str(u)}) + "\n")
    for u, loss in valid:
        lines.append(json.dumps({"epoch": "1", "valid_loss": str(loss), "valid_num_updates": str(u)}) + "\n")
    lines.append(json.dumps({"train_loss": "9.9", "train_num_updates": "300"}) + "\n")  # epoch summary: ignored
    Path(path).write_text("".join(lines))


def test_summarize_by_hand(tmp_path):
    log = tmp_path / "train.log"
    write_log(
        log,
        valid=[(100, 6.0), (200, 9.0), (300, 5.5), (200, 5.0)],
        train=[(50, 7.0), (150, 6.5), (250, 4.0), (300, 3.0)],
    )
    s = study_report.summarize(log)
    assert s["curve"] == [(100, 6.0), (200, 5.0), (300, 5.5)]
    assert (s["best_valid"], s["best_update"], s["final_valid"], s["last_update"]) == (5.0, 200, 5.5, 300)
    # training-mode train losses in (200, 300]: 4.0 and 3.0 -> 3.5; their gap 5.5 - 3.5; no train_eval.json: no gap
    assert (s["train_mode_end"], s["train_mode_gap"]) == (3.5, 2.0)
    assert "gap" not in s and "train_eval" not in s
    assert study_report.summarize(tmp_path / "none.log") == {"curve": [], "last_update": 0}
    (tmp_path / "train_eval.json").write_text(json.dumps({"loss": 4.75}))
    s = study_report.summarize(log, tmp_path / "train_eval.json")
    assert (s["train_eval"], s["gap"], s["train_mode_gap"]) == (4.75, 0.75, 2.0)  # 5.5 - 4.75


def test_allocation_by_hand():
    summary = {"layers": {"enc1": {"num_experts": 4, "load": [0.5, 0.3, 0.1, 0.1]}}}
    a = study_report.allocation(summary)["enc1"]
    # mean 0.25, population std sqrt((0.0625 + 0.0025 + 0.0225 * 2) / 4) = sqrt(0.0275); half the even share 0.125
    assert (a["min"], a["max"], a["below_half_even"]) == (0.1, 0.5, 2)
    assert a["cv"] == pytest.approx(0.0275**0.5 / 0.25)


def fake_done(out, name, hyps, bleu, train_eval=None, valid=((100, 6.0), (200, 5.0))):
    """A finished run: valid losses VALID (final 5.0 by default), training-mode train loss 5.25 over (100, 200];
    TRAIN_EVAL: the loss of its train_eval.json (none when None)."""
    rdir = out / "runs" / name
    rdir.mkdir(parents=True)
    (rdir / "hyp.txt").write_text("".join(h + "\n" for h in hyps))
    write_log(rdir / "train.log", valid=list(valid), train=[(150, 6.0), (200, 4.5)])
    if train_eval is not None:
        (rdir / "train_eval.json").write_text(json.dumps({"loss": train_eval, "nll_loss": train_eval - 0.5}))
    score = {"bleu": bleu, "chrf": 50.0, "bleu_signature": "nrefs:1|tok:13a", "chrf_signature": "nrefs:1|nc:6"}
    routing = {"enc1": {"min": 0.01, "max": 0.3, "cv": 0.5, "below_half_even": 1}}
    (rdir / "DONE").write_text(json.dumps({"score": score, "routing": routing}))


def test_paired_tests_of_the_whole_plan():
    done = {r.name: (r, None, None) for r in study.plan_v2((1, 2))}
    expected = set()
    for s in (1, 2):
        for e in (8, 32):
            expected |= {
                (f"dense-s{s}", f"moe{e}-s{s}"),
                (f"dense-s{s}", f"moec{e}-s{s}"),
                (f"moe{e}-s{s}", f"moec{e}-s{s}"),
            }
    for ablation in ("lossonly", "droponly", "official"):  # seed 1 only
        expected |= {("moec32-s1", f"moec32-{ablation}-s1"), ("moe32-s1", f"moec32-{ablation}-s1")}
    expected.add(("moec32-s1", "moec32-s1-keepmask"))  # the same model translated two ways: against itself only
    expected |= {(f"{g}-s1", f"{g}-s2") for g in ("dense", "moe8", "moec8", "moe32", "moec32")}  # seed vs seed
    found = study_report.pairs(done)
    assert len(found) == len(set(found)) and set(found) == expected
    del done["moe32-s1"]  # a pair needs both sides finished
    assert not any("moe32-s1" in pair for pair in study_report.pairs(done))


def test_report_tables_and_paired_tests(tmp_path):
    out = tmp_path / "out"
    refs = [f"the {w} went to the house of the lord number {i}" for i, w in enumerate(["man", "woman", "king"] * 10)]
    (out / "data" / "raw").mkdir(parents=True)
    (out / "data" / "raw" / "test.en").write_text("".join(r + "\n" for r in refs))
    fake_done(out, "moe8-s1", [r.replace("house", "home") for r in refs], 40.0)
    fake_done(out, "moec8-s1", refs, 100.0)
    fake_done(out, "dense-s1", refs, 100.0)
    study_report.write(out, study.plan_v2((1,)), 1200, tmp_path / "img")
    text = (out / "results.md").read_text()
    assert "| moec8-s1 | done | 100.00 | 50.00 | 5.000 (200) | 5.000 | – | – | 0.010/0.300, CV 0.50, 1 |" in text
    assert "| moe32-s1 | not started |" in text
    # the pairs with both sides finished: MoEC against MoE at E = 8, each against dense; identical-to-reference
    # output wins
    tests = text.split("Paired bootstrap")[1].splitlines()[4:]  # the rows below the table's header
    tested = sorted(tuple(line.split(" | ")[:2]) for line in tests if line.startswith("| "))
    assert tested == [("| dense-s1", "moe8-s1"), ("| dense-s1", "moec8-s1"), ("| moe8-s1", "moec8-s1")]
    rows = [line for line in text.splitlines() if line.startswith("| moe8-s1 | moec8-s1 |")]
    assert len(rows) == 1 and float(rows[0].split("|")[4]) < 0.01
    rows = [line for line in text.splitlines() if line.startswith("| dense-s1 | moec8-s1 |")]
    assert len(rows) == 1 and rows[0].split("|")[3].strip() == "100.00 / 100.00"  # dense's own output, its score
    assert (tmp_path / "img" / "study_v2_valid_loss.png").stat().st_size > 0
    assert (tmp_path / "img" / "study_v2_bleu_vs_experts.png").stat().st_size > 0


def test_finished_run_is_skipped_and_changed_settings_refused(tmp_path, monkeypatch):
    args = args_of(tmp_path)
    runs = {r.name: r for r in study.plan_v2(args.seeds)}
    calls = []
    monkeypatch.setattr(study, "sh", lambda cmd, **kw: calls.append(cmd))
    done = Path(args.out) / "runs" / "dense-s1"
    done.mkdir(parents=True)
    (done / "DONE").write_text("{}")
    study.do_run(args, runs["dense-s1"], Path(args.out) / "data")
    assert calls == []
    other = Path(args.out) / "runs" / "moe8-s1"
    other.mkdir(parents=True)
    (other / "command.json").write_text(json.dumps(["fairseq-train", "--lr", "1"]))
    with pytest.raises(SystemExit, match="other settings"):
        study.do_run(args, runs["moe8-s1"], Path(args.out) / "data")
    assert calls == []


def test_a_run_resumes_from_another_checkout_and_work_dir_but_not_with_other_flags(tmp_path, monkeypatch):
    """command.json holds absolute paths; the check compares the commands with the checkout and the work directory
    read as places, so only a change of the command itself is refused."""
    args = args_of(tmp_path)
    run = {r.name: r for r in study.plan_v2(args.seeds)}["moec8-s1"]
    out = Path(args.out)
    rdir = out / "runs" / run.name
    rdir.mkdir(parents=True)
    cmd = [str(c) for c in study.train_cmd(args, run, out / "data" / "bin", rdir)]

    def elsewhere(c):  # the same run, started from a clone in /clone with its work directory in /old/work
        return c.replace(str(out), "/old/work").replace(str(study.ROOT), "/clone")

    class Started(Exception):
        pass

    def sh(cmd, **kw):
        raise Started

    monkeypatch.setattr(study, "sh", sh)
    (rdir / "command.json").write_text(json.dumps([elsewhere(c) for c in cmd]))
    with pytest.raises(Started):
        study.do_run(args, run, out / "data")
    assert json.loads((rdir / "command.json").read_text()) == cmd  # the record names where it runs now
    for changed in (
        [elsewhere(c).replace("0.002", "0.001") for c in cmd],  # --lr
        [elsewhere(c) for c in cmd if c != "--no-epoch-checkpoints"],
        [c.replace(str(out / "data"), "/other/data") for c in cmd],  # another data directory than the work dir's
    ):
        assert changed != [elsewhere(c) for c in cmd]
        (rdir / "command.json").write_text(json.dumps(changed))
        with pytest.raises(SystemExit, match="other settings"):
            study.do_run(args, run, out / "data")


def test_settings_of_a_work_dir_inside_the_checkout():
    """The default --out lies inside the checkout: the work dir is read first, so moving it out still matches."""

    def cmd(checkout, out):
        return [f"{checkout}/.venv/bin/fairseq-train", f"{out}/data/bin", "--user-dir", f"{checkout}/fairseq_moec"] + [
            "--save-dir",
            f"{out}/runs/moe8-s1/checkpoints",
            "--lr",
            "0.002",
        ]

    inside = cmd("/a/repo", "/a/repo/work/study_v2")
    assert study.settings_of(inside) == study.settings_of(cmd("/b/clone", "/elsewhere/study_v2"))
    assert study.settings_of(inside)[1] == "{out}/data/bin"
    assert study.settings_of(inside) != study.settings_of(cmd("/a/repo", "/a/repo/work/study_v2")[:-1] + ["0.001"])


def test_export_keeps_what_rebuilds_the_report(tmp_path):
    """The exported copy (no checkpoints) gives the same results.md as the working directory."""
    out, exported = tmp_path / "out", tmp_path / "exported"
    refs = [f"line {i} of the test set" for i in range(12)]
    (out / "data" / "raw").mkdir(parents=True)
    (out / "data" / "raw" / "test.en").write_text("".join(r + "\n" for r in refs))
    fake_done(out, "moe8-s1", [r.replace("test", "best") for r in refs], 40.0)
    fake_done(out, "moec8-s1", refs, 100.0, train_eval=4.0)
    (out / "runs" / "moec8-s1" / "checkpoints").mkdir()
    (out / "runs" / "moec8-s1" / "checkpoints" / "checkpoint_best.pt").write_bytes(b"big")
    (out / "runs" / "moe32-s1").mkdir()  # unfinished: nothing of it is exported
    (out / "runs" / "moe32-s1" / "train.log").write_text("")
    copied = study_report.export(out, study.plan_v2((1,)), exported)
    assert "runs/moec8-s1/hyp.txt" in copied and not any("moe32" in c or "checkpoint" in c for c in copied)
    assert "runs/moec8-s1/train_eval.json" in copied
    study_report.write(out, study.plan_v2((1,)), 1200, tmp_path / "img")
    study_report.write(exported, study.plan_v2((1,)), 1200, tmp_path / "img2")
    text = (out / "results.md").read_text()
    assert (exported / "results.md").read_text() == text
    assert "| moec8-s1 | done | 100.00 | 50.00 | 5.000 (200) | 5.000 | 4.000 | +1.000 |" in text


def test_report_gap_is_final_valid_minus_train_eval(tmp_path):
    """gap = final valid - train_eval.json's loss, by hand; "–" without train_eval.json (not the training-mode
    figure, which stays in results.json); group means over every seed or none; the kept-mask entry points to its
    source run's losses instead of copying them."""
    out = tmp_path / "out"
    (out / "data" / "raw").mkdir(parents=True)
    (out / "data" / "raw" / "test.en").write_text("a line\n")
    fake_done(out, "dense-s1", ["a line"], 100.0, train_eval=4.25)
    fake_done(out, "dense-s2", ["a line"], 100.0)
    fake_done(out, "moec32-s1", ["a line"], 100.0, train_eval=3.5)
    fake_done(out, "moec32-s2", ["a line"], 100.0, train_eval=4.0)
    fake_done(out, "moec32-s1-keepmask", ["a line"], 100.0)
    study_report.write(out, study.plan_v2((1, 2)), 1200, tmp_path / "img")
    text = (out / "results.md").read_text()
    # final valid 5.0 of every fake run: 5.0 - 4.25 = +0.75, 5.0 - 3.5 = +1.5, 5.0 - 4.0 = +1.0
    assert "| dense-s1 | done | 100.00 | 50.00 | 5.000 (200) | 5.000 | 4.250 | +0.750 |" in text
    assert "| dense-s2 | done | 100.00 | 50.00 | 5.000 (200) | 5.000 | – | – |" in text
    assert "| moec32-s1 | done | 100.00 | 50.00 | 5.000 (200) | 5.000 | 3.500 | +1.500 |" in text
    # the kept-mask entry translates with moec32-s1's model: no losses or routing of its own
    same = " | ".join(["as moec32-s1"] * 5)
    assert f"| moec32-s1-keepmask | done | 100.00 | 50.00 | {same} |" in text
    assert "| moec32-keepmask | 1 | 100.00 | 50.00 | as moec32 | as moec32 | as moec32 | as moec32 |" in text
    # group means: dense lacks one seed's train_eval.json; moec32: (3.5 + 4.0) / 2 = 3.75, (1.5 + 1.0) / 2 = 1.25
    assert "| dense | 2 | 100.00 | 50.00 | 5.000 | 5.000 | – | – |" in text
    assert "| moec32 | 2 | 100.00 | 50.00 | 5.000 | 5.000 | 3.750 | +1.250 |" in text
    assert "gap = final valid - train (eval)" in text
    summary = json.loads((out / "results.json").read_text())["dense-s2"]["summary"]
    # training-mode train loss over (100, 200]: (6.0 + 4.5) / 2 = 5.25; its gap 5.0 - 5.25
    assert (summary["train_mode_end"], summary["train_mode_gap"]) == (5.25, -0.25) and "gap" not in summary


def test_validate_stats_of_a_real_output(tmp_path):
    """The end-of-subset record of fairseq-validate's json output, not a per-batch one; a clear error without."""
    s = study.validate_stats(VALIDATE_OUTPUT, "train")
    assert (s["loss"], s["nll_loss"], s["sentences"], s["target_tokens"]) == (8.897, 8.816, 600, 28400)
    assert s["subset"] == "train" and s["fairseq"]["train_ppl"] == "450.59"
    (tmp_path / "empty.log").write_text("no json here\n")
    with pytest.raises(SystemExit, match="empty.log: no 'train_loss' record"):
        study.validate_stats(tmp_path / "empty.log", "train")


def fake_validate(calls):
    """A stand-in for study.sh: records the command, and answers fairseq-validate with the captured output."""

    def sh(cmd, **kw):
        calls.append([str(c) for c in cmd])
        if "fairseq-validate" in str(cmd[0]):
            kw["stdout"].write(VALIDATE_OUTPUT.read_text())

    return sh


def test_done_run_gets_train_eval_once(tmp_path, monkeypatch):
    """A finished run without train_eval.json gets it (dense: fairseq's own task and criterion); the next time,
    or for the kept-mask evaluation entry, or without a checkpoint, nothing runs."""
    args = args_of(tmp_path)
    runs = {r.name: r for r in study.plan_v2(args.seeds)}
    data = Path(args.out) / "data"
    calls = []
    monkeypatch.setattr(study, "sh", fake_validate(calls))
    for name in ("dense-s1", "moec32-s1", "moec32-s1-keepmask", "moe8-s1"):
        (Path(args.out) / "runs" / name).mkdir(parents=True)
        (Path(args.out) / "runs" / name / "DONE").write_text("{}")
    for name in ("dense-s1", "moec32-s1", "moec32-s1-keepmask"):  # the last: to see that it is not evaluated
        (Path(args.out) / "runs" / name / "checkpoints").mkdir()
        (Path(args.out) / "runs" / name / "checkpoints" / "checkpoint_last.pt").write_bytes(b"model")
    study.do_run(args, runs["dense-s1"], data)
    assert len(calls) == 1
    cmd = calls[0]
    ckpt = Path(args.out) / "runs" / "dense-s1" / "checkpoints" / "checkpoint_last.pt"
    assert (cmd[1], flag(cmd, "--path"), flag(cmd, "--valid-subset")) == (str(data / "bin"), str(ckpt), "train")
    assert (flag(cmd, "--task"), flag(cmd, "--criterion")) == ("translation", "label_smoothed_cross_entropy")
    assert (flag(cmd, "--max-tokens"), flag(cmd, "--num-workers"), flag(cmd, "--log-format")) == ("6000", "0", "json")
    assert "--cpu" in cmd and "--inference-experts" not in cmd
    saved = json.loads((Path(args.out) / "runs" / "dense-s1" / "train_eval.json").read_text())
    assert saved["code_state"]["git_head"] == study_report.code_state(study.ROOT)["git_head"]
    assert (saved["loss"], saved["nll_loss"], saved["checkpoint"], saved["subset"]) == (
        8.897,
        8.816,
        "checkpoint_last.pt",
        "train",
    )
    for name in ("dense-s1", "moec32-s1-keepmask", "moe8-s1"):  # done already; evaluation only; no checkpoint
        study.do_run(args, runs[name], data)
    assert len(calls) == 1 and not (Path(args.out) / "runs" / "moe8-s1" / "train_eval.json").exists()
    study.do_run(args, runs["moec32-s1"], data)
    assert (flag(calls[1], "--task"), flag(calls[1], "--criterion"), flag(calls[1], "--inference-experts")) == (
        "translation_moec",
        "moec_label_smoothed_cross_entropy",
        "all",
    )


def test_trained_run_gets_train_eval_before_done(tmp_path, monkeypatch):
    """A run trained by the driver: fairseq-train, then fairseq-validate on its last checkpoint, then DONE (the
    translation and the routing are on disk already, so they are skipped)."""
    args = args_of(tmp_path)
    run = {r.name: r for r in study.plan_v2(args.seeds)}["moe8-s1"]
    rdir = Path(args.out) / "runs" / run.name
    (rdir / "checkpoints").mkdir(parents=True)
    (rdir / "checkpoints" / "checkpoint_last.pt").write_bytes(b"model")
    (rdir / "score.json").write_text(json.dumps({"bleu": 1.0, "chrf": 2.0}))
    (rdir / "routing").mkdir()
    (rdir / "routing" / "summary.json").write_text(json.dumps({"layers": {}}))
    calls = []
    monkeypatch.setattr(study, "sh", fake_validate(calls))
    study.do_run(args, run, Path(args.out) / "data")
    assert [Path(c[0]).name for c in calls] == ["fairseq-train", "fairseq-validate"]
    assert json.loads((rdir / "train_eval.json").read_text())["loss"] == 8.897 and (rdir / "DONE").exists()


def test_train_eval_with_the_real_fairseq_validate(tiny_moec_checkpoint, tmp_path, monkeypatch):
    """study.train_eval's command through the real fairseq-validate on conftest's tiny MoEC checkpoint: every
    training sentence and target token (each sentencepiece piece of tok/train.en plus end-of-sentence) counted."""
    ckpt, data_bin = tiny_moec_checkpoint
    args = args_of(tmp_path)
    run = {r.name: r for r in study.plan_v2(args.seeds)}["moec8-s1"]
    rdir = tmp_path / "run"
    rdir.mkdir()
    (rdir / "checkpoints").symlink_to(ckpt.parent)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = study.train_eval(args, run, data_bin.parent, rdir)
    pieces = (data_bin.parent / "tok" / "train.en").read_text().splitlines()
    assert result["sentences"] == len((FIXTURE / "train.es").read_text().splitlines()) == len(pieces)
    assert result["target_tokens"] == sum(len(line.split()) + 1 for line in pieces)
    assert 0 < result["nll_loss"] < result["loss"] < 10  # bits; label smoothing adds to the nll
    assert json.loads((rdir / "train_eval.json").read_text())["loss"] == result["loss"]
    monkeypatch.setattr(study, "sh", lambda *a, **k: pytest.fail("train_eval.json exists: nothing to run"))
    assert study.train_eval(args, run, data_bin.parent, rdir) == result


def test_evaluation_entry_records_its_code_state(tmp_path, monkeypatch):
    """The kept-mask entry translates in a later session than its source run trained: it keeps its own record of
    the code it translated with."""
    args = args_of(tmp_path)
    runs = {r.name: r for r in study.plan_v2(args.seeds)}
    (Path(args.out) / "runs" / "moec32-s1").mkdir(parents=True)
    (Path(args.out) / "runs" / "moec32-s1" / "DONE").write_text("{}")
    monkeypatch.setattr(study, "evaluate", lambda *a: {"bleu": 1.0})
    study.do_run(args, runs["moec32-s1-keepmask"], Path(args.out) / "data")
    rdir = Path(args.out) / "runs" / "moec32-s1-keepmask"
    states = [json.loads(line) for line in (rdir / "code_state.jsonl").read_text().splitlines()]
    assert len(states) == 1 and states[0]["git_head"] == study_report.code_state(study.ROOT)["git_head"]
    assert json.loads((rdir / "DONE").read_text())["score"] == {"bleu": 1.0}


def test_list_names_a_finished_run_without_train_eval(tmp_path, capsys):
    args = args_of(tmp_path)
    for name in ("dense-s1", "moe32-s1", "moec32-s1-keepmask"):
        (Path(args.out) / "runs" / name).mkdir(parents=True)
        (Path(args.out) / "runs" / name / "DONE").write_text("{}")
    (Path(args.out) / "runs" / "dense-s1" / "train_eval.json").write_text("{}")
    assert study.main(["--plan", "v2", "--out", args.out, "--device", "cpu", "--list"]) == 0
    states = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert states["dense-s1"] == "done" and states["moec32-s1-keepmask"] == "done"  # the latter: nothing to add
    assert states["moe32-s1"].startswith("done, without train_eval.json")
    assert states["moec32-s1"] == "not started"


# --- study v3 ------------------------------------------------------------------------------------------------------
V2_EXPORT = study.ROOT / "docs" / "study-v2"
CANDIDATES = ["moec32-s1", "official32-s1", "token32-w0.01-s1", "token32-w0.1-s1", "token32-w1-s1"]
CANDIDATES += ["intra32-w0.1-s1", "intra32-w1-s1"]


def v3_args(tmp_path, *extra, reuse=str(V2_EXPORT)):
    return args_of(tmp_path, "--reuse", reuse, *extra, plan="v3")


def command(args, run, tmp_path):
    return [str(c) for c in study.train_cmd(args, run, tmp_path / "data" / "bin", tmp_path / "runs" / run.name)]


def every_v3_run():
    """The screening and every confirmation and E = 64 run that any choice could plan."""
    runs = study.screening()
    for family in study.FAMILIES.values():
        if family.clustered:
            runs += study.confirmation({"family": family.key}) + study.upper({"family": family.key})
    return list({r.name: r for r in runs}.values())


def test_v3_screening_runs_and_their_flags(tmp_path):
    from fairseq_moec.criterions.moec_label_smoothed_cross_entropy import MoECCriterionConfig

    args = v3_args(tmp_path)
    runs = study.screening()
    assert [r.name for r in runs] == ["dense-s1", "moe32-s1", *CANDIDATES[:2], "official-moe32-s1", *CANDIDATES[2:]]
    assert [r.name for r in runs if r.candidate] == CANDIDATES
    cmds = {r.name: command(args, r, tmp_path) for r in runs}
    official = cmds["official32-s1"]
    assert official[-len(study.OFFICIAL_RECIPE) :] == list(study.OFFICIAL_RECIPE)  # the recipe, whole
    assert [flag(official, f) for f in ("--moe-clusters", "--cluster-dropout", "--clip-norm")] == ["4", "0.5", "0.1"]
    twin = cmds["official-moe32-s1"]  # the same router, gate and clipping; no clusters, no dropout
    assert [flag(twin, f) for f in ("--moe-router", "--moe-gate", "--moe-loss-temperature", "--clip-norm")] == [
        "cosine",
        "sigmoid",
        "0.07",
        "0.1",
    ]
    assert [flag(twin, f) for f in ("--moe-clusters", "--cluster-dropout", "--moe-cluster-weight")] == ["1", "0.0", "0"]
    assert not {"--moe-cluster-loss", "--moe-cluster-loss-norm", "--cluster-dropout-reroute"} & set(twin)
    default_weight = MoECCriterionConfig().moe_cluster_weight
    for kind, weights in (("token", ("0.01", "0.1", "1")), ("intra", ("0.1", "1"))):
        for w in weights:
            c = cmds[f"{kind}32-w{w}-s1"]
            assert [flag(c, f) for f in ("--moe-clusters", "--cluster-dropout", "--moe-cluster-weight")] == [
                "4",
                "0.5",
                w,
            ]
            assert flag(c, "--moe-cluster-loss") == ("token" if kind == "token" else None)  # intra: the default
            # the linear router, gate `auto` (with the token loss: the cluster gate), in-cluster reroute, no clipping
            assert not {"--moe-router", "--moe-gate", "--cluster-dropout-reroute", "--clip-norm"} & set(c)
    assert float(study.TOKEN_WEIGHTS[-1]) / float(study.TOKEN_WEIGHTS[0]) == pytest.approx(100)
    assert [float(w) / default_weight for w in study.INTRA_WEIGHTS] == pytest.approx([10, 100])
    assert {flag(c, "--max-update") for c in cmds.values()} == {"1200"} and {
        flag(c, "--seed") for c in cmds.values()
    } == {"1"}


def test_official_recipe_is_docs_method_fragment():
    """The script's flags of the official recipe are those that docs/method.md gives, in the same order."""
    section = (study.ROOT / "docs" / "method.md").read_text().split("### The official recipe as a whole", 1)[1]
    block = re.search(r"\n\n((?:    .*\n)+)", section).group(1)  # the first indented block of the section
    assert block.replace("\\\n", " ").split() == list(study.OFFICIAL_RECIPE)


def test_every_v3_command_passes_fairseqs_parser_and_the_plugins_checks(tmp_path):
    """Every run that v3 can plan is accepted before training: fairseq's parser and the plugin's validation of the
    MoE options (a refused combination would stop the study hours in)."""
    from fairseq import options

    from fairseq_moec.models.options import validate

    args = v3_args(tmp_path)
    runs = every_v3_run()
    assert {r.name for r in runs} >= {"official64-s1", "official-moe64-s1", "moec64-s1", "moe64-s1", "dense-s3"}
    for run in runs:
        parsed = options.parse_args_and_arch(options.get_training_parser(), command(args, run, tmp_path)[1:])
        assert parsed.clip_norm == (0.1 if run.family.startswith("official") else 0.0), run.name
        if not run.experts:
            assert parsed.arch == "transformer"
            continue
        cfg = validate(parsed)
        assert (cfg.moe_expert_count, cfg.moe_clusters, cfg.cluster_dropout) == (
            run.experts,
            run.clusters,
            run.cluster_dropout,
        ), run.name
        official = run.family.startswith("official")
        assert (cfg.moe_router, cfg.gate) == (("cosine", "sigmoid") if official else ("linear", cfg.gate)), run.name
        if run.family.startswith("token"):
            assert (cfg.moe_cluster_loss, cfg.gate, cfg.cluster_dropout_reroute) == ("token", "cluster", "cluster")
        if run.family == "official":
            assert (cfg.moe_cluster_loss_norm, cfg.cluster_dropout_reroute, cfg.moe_loss_temperature) == (
                "official",
                "global",
                0.07,
            )
    e64 = {r.name: r for r in runs}["token64-w0.1-s1"]
    assert (e64.experts, e64.clusters, e64.cluster_dropout) == (64, 8, 0.5)  # clusters of 8, as at E = 32


def test_v3_reuses_exactly_the_v2_runs_with_its_commands(tmp_path):
    """dense, MoE32 and MoEC32 of v2 (seeds 1, 2) are v3's runs of the same names, command for command, and are
    the only v2 runs v3 imports; another device, other settings or no --reuse import none."""
    args = v3_args(tmp_path)
    v2 = {r.name: r for r in study.plan_v2((1, 2))}
    v3 = {r.name: r for r in every_v3_run()}
    shared = {"dense-s1", "dense-s2", "moe32-s1", "moe32-s2", "moec32-s1", "moec32-s2"}
    for name in shared:
        assert command(args, v3[name], tmp_path) == command(args, v2[name], tmp_path)
        assert study.reusable(args, v3[name]) == V2_EXPORT / "runs" / name
    assert {name for name, run in v3.items() if study.reusable(args, run)} == shared
    assert study.reusable(v3_args(tmp_path, "--updates", "1600"), v3["moe32-s1"]) is None
    assert study.reusable(v3_args(tmp_path, reuse=""), v3["moe32-s1"]) is None
    cuda = v3_args(tmp_path)
    cuda.device = "cuda"  # v2 trained with --cpu
    assert study.reusable(cuda, v3["moe32-s1"]) is None


def test_import_copies_v2s_files_and_marks_them(tmp_path, monkeypatch):
    args = v3_args(tmp_path)
    out = Path(args.out)
    data = out / "data"
    shutil.copytree(V2_EXPORT / "data", data)  # the stamp and the references of prepare_data
    monkeypatch.setattr(study, "sh", lambda *a, **k: pytest.fail("an imported run runs nothing"))
    run = {r.name: r for r in study.screening()}["moec32-s1"]
    study.do_run(args, run, data)
    src, rdir = V2_EXPORT / "runs" / "moec32-s1", out / "runs" / "moec32-s1"
    for name in study_report.EXPORTED[1:]:
        assert (rdir / name).read_bytes() == (src / name).read_bytes(), name
    done, theirs = (json.loads((d / "DONE").read_text()) for d in (rdir, src))
    assert {k: v for k, v in done.items() if k != "imported"} == theirs
    trained = {json.loads(line)["git_head"] for line in (src / "code_state.jsonl").read_text().splitlines()}
    assert done["imported"]["from"] == str(src) and done["imported"]["trained_at"] == sorted(trained)
    assert done["imported"]["commit"] == machine.git_commit(study.ROOT)
    assert study_report.state(rdir, 1200) == f"done (imported from v2 at {done['imported']['commit'][:7]})"
    study.do_run(args, run, data)  # done: nothing more

    class Started(Exception):
        pass

    def started(*a, **k):
        raise Started

    monkeypatch.setattr(study, "sh", started)
    other = tmp_path / "other-v2"  # a v2 copy whose command differs in --lr: trained, not imported
    shutil.copytree(V2_EXPORT / "data", other / "data")
    shutil.copytree(V2_EXPORT / "runs" / "moe32-s1", other / "runs" / "moe32-s1")
    cmd = json.loads((other / "runs" / "moe32-s1" / "command.json").read_text())
    cmd[cmd.index("--lr") + 1] = "0.001"
    (other / "runs" / "moe32-s1" / "command.json").write_text(json.dumps(cmd))
    moe = {r.name: r for r in study.screening()}["moe32-s1"]
    with pytest.raises(Started):
        study.do_run(v3_args(tmp_path, reuse=str(other)), moe, data)
    assert not (out / "runs" / "moe32-s1" / "DONE").exists()
    with pytest.raises(Started):  # started here: it resumes, even though v2's copy now matches
        study.do_run(args, moe, data)
    # the same command scored against other references: refused, not imported
    shutil.copytree(V2_EXPORT / "runs" / "dense-s1", other / "runs" / "dense-s1")
    (other / "data" / "raw" / "test.en").write_text("another reference\n")
    dense = {r.name: r for r in study.screening()}["dense-s1"]
    with pytest.raises(SystemExit, match="other references"):
        study.do_run(v3_args(tmp_path, reuse=str(other)), dense, data)


def synthetic(n, seed=0):
    """N reference sentences of 8-16 words from a 300-word vocabulary, and the vocabulary."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(300)]
    return [" ".join(rng.choice(vocab) for _ in range(rng.randint(8, 16))) for _ in range(n)], vocab


def corrupt(refs, rate, seed, vocab):
    """A system's hypotheses: every word of REFS replaced by a random one with probability RATE."""
    rng = random.Random(seed)
    return [" ".join(w if rng.random() >= rate else rng.choice(vocab) for w in r.split()) for r in refs]


def stats_of(metric, systems, refs):
    return np.stack([study_report.sentence_stats(metric, h, refs) for h in systems])


def test_resampled_scores_equal_sacrebleu_on_the_resampled_sentences():
    refs, vocab = synthetic(40)
    hyps = corrupt(refs, 0.3, 1, vocab)
    idx = np.random.default_rng(0).integers(0, len(refs), size=(6, len(refs)))
    counts = np.stack([np.bincount(row, minlength=len(refs)) for row in idx])
    for name, corpus_score in (("BLEU", sacrebleu.corpus_bleu), ("chrF2", sacrebleu.corpus_chrf)):
        metric = study_report.study_metrics()[name]
        got = study_report.corpus_scores(metric, stats_of(metric, [hyps], refs), counts)[:, 0]
        want = [corpus_score([hyps[i] for i in row], [[refs[i] for i in row]]).score for row in idx]
        assert got.tolist() == pytest.approx(want, abs=1e-9) and len(set(want)) == len(want)


def naive_two_level(refs, base, system, resamples, seed):
    """The resampled differences by the definition, with sacrebleu.corpus_bleu on the drawn sentences of every
    drawn seed; the draws in seed_aware_bootstrap's order (sentences, then base's seeds, then the system's)."""
    rng = np.random.default_rng(seed)
    n = len(refs)
    sentences = rng.integers(0, n, size=(resamples, n))
    drawn = [rng.integers(0, len(side), size=(resamples, len(side))) for side in (base, system)]
    diffs = []
    for r, rows in enumerate(sentences):
        means = [
            statistics.mean(
                sacrebleu.corpus_bleu([side[k][i] for i in rows], [[refs[i] for i in rows]]).score for k in d[r]
            )
            for side, d in zip((base, system), drawn)
        ]
        diffs.append(means[1] - means[0])
    return diffs


def test_seed_aware_bootstrap_against_the_naive_definition():
    refs, vocab = synthetic(30)
    base = [corrupt(refs, q, s, vocab) for s, q in enumerate((0.2, 0.4, 0.3))]
    system = [corrupt(refs, q, 10 + s, vocab) for s, q in enumerate((0.25, 0.15))]  # two seeds against three
    metric = study_report.study_metrics()["BLEU"]
    got = study_report.seed_aware_bootstrap(metric, stats_of(metric, base, refs), stats_of(metric, system, refs), 25, 7)
    assert got["diffs"].tolist() == pytest.approx(naive_two_level(refs, base, system, 25, 7), abs=1e-9)
    full = [statistics.mean(sacrebleu.corpus_bleu(h, [refs]).score for h in side) for side in (base, system)]
    assert [got["base"], got["system"]] == pytest.approx(full) and got["seeds"] == [3, 2]


def test_seed_aware_p_identical_systems_clearly_better_and_seed_noise(tmp_path):
    refs, vocab = synthetic(200)
    metric = study_report.study_metrics()["BLEU"]
    n = 1000

    def test(base, system):
        return study_report.seed_aware_bootstrap(
            metric, stats_of(metric, base, refs), stats_of(metric, system, refs), n
        )

    seeds = [corrupt(refs, q, s, vocab) for s, q in enumerate((0.1, 0.3, 0.2))]
    assert test(seeds, seeds)["p"] == 1.0 and test(seeds[:1], seeds[:1])["p"] == 1.0  # identical systems
    better = test(seeds, [refs] * 3)  # the reference itself, with every seed, on every sentence
    assert better["diff"] > 0 and better["low"] > 0 and better["p"] == pytest.approx(2 / (n + 1))
    # Seed noise only: both systems draw a seed's word-error rate from the same 0.10-0.35; the second system's
    # three draws happen to be worse by 0.05 each. Its sentence-only test (seed 1 against seed 1) calls that
    # significant, as sacrebleu's own paired bootstrap does; the seed-aware test and Welch's do not.
    unlucky = [corrupt(refs, q, 20 + s, vocab) for s, q in enumerate((0.15, 0.35, 0.25))]
    seed_aware, sentences_only = test(seeds, unlucky), test(seeds[:1], unlucky[:1])
    assert seed_aware["diff"] < -3 and seed_aware["p"] > 0.2
    assert sentences_only["p"] < 0.01
    for i, hyps in enumerate((seeds[0], unlucky[0], refs)):
        (tmp_path / f"{i}.txt").write_text("".join(h + "\n" for h in hyps))
    assert (
        study_report.paired_bootstrap(tmp_path / "2.txt", tmp_path / "0.txt", [tmp_path / "1.txt"])[1]["BLEU"][
            "p_value"
        ]
        < 0.01
    )
    per_seed = [study_report.per_seed_scores(metric, stats_of(metric, s, refs)) for s in (seeds, unlucky)]
    assert study_report.welch_p(*per_seed) > 0.2 and study_report.welch_p(per_seed[0][:1], per_seed[1]) is None


def test_co_routing_of_the_summary_and_of_the_training_log_by_hand(tmp_path):
    summary = {
        "layers": {
            "enc1": {"num_clusters": 4, "co_routing_rate": 0.25, "co_routing_chance": 7 / 31},
            "dec1": {"num_clusters": 1, "co_routing_rate": 1.0, "co_routing_chance": 1.0},
        }
    }
    assert study_report.co_routing(summary) == {"enc1": {"rate": 0.25, "chance": 7 / 31, "clusters": 4}, "dec1": None}
    log = tmp_path / "train.log"
    records = [
        {"loss": "6", "num_updates": "25", "moe_enc1_co_routing": "0.3", "moe_enc1_co_routing_chance": "0.2"},
        {"loss": "5", "num_updates": "50", "moe_enc1_co_routing": "0.9", "moe_enc1_co_routing_chance": "0.2"},
        {"valid_loss": "5", "valid_num_updates": "50", "valid_moe_enc1_co_routing": "0.5"},  # not the training's
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert study_report.summarize(log)["co_routing_log"] == {"enc1": {"rate": 0.9, "chance": 0.2, "update": 50}}
    out = tmp_path / "out"
    fake_done(out, "moec8-s1", ["a"], 10.0)
    (out / "runs" / "moec8-s1" / "routing").mkdir()
    (out / "runs" / "moec8-s1" / "routing" / "summary.json").write_text(json.dumps(summary))
    shutil.copyfile(log, out / "runs" / "moec8-s1" / "train.log")
    run = {r.name: r for r in study.plan_v2((1,))}["moec8-s1"]
    row = study_report.runs_table(out, study_report.run_rows(out, [run]), 1200)[-1]
    assert row.endswith("| 0.250 (0.226); G = 1 | 0.900 (0.200) at 50 |")


def test_training_log_co_routing_lists_the_encoder_first(tmp_path):
    """fairseq writes a log record's keys sorted (moe_dec1_ before moe_enc1_); the table's cell follows the layer
    order of the routing summary's cell beside it: encoder, then decoder, each by index."""
    log = tmp_path / "train.log"
    record = {"loss": "5", "num_updates": "50"}
    for name, rate in (("dec1", "0.1"), ("dec3", "0.3"), ("enc1", "0.7"), ("enc10", "0.8"), ("enc2", "0.9")):
        record.update({f"moe_{name}_co_routing": rate, f"moe_{name}_co_routing_chance": "0.2"})
    log.write_text(json.dumps(record, sort_keys=True) + "\n")
    logged = study_report.summarize(log)["co_routing_log"]
    assert list(logged) == ["enc1", "enc2", "enc10", "dec1", "dec3"]
    assert [c["rate"] for c in logged.values()] == [0.7, 0.9, 0.8, 0.1, 0.3]


def test_v2_rows_show_the_co_routing_of_the_exported_runs():
    """The numbers of study v2's co-routing caveat (docs/study.md), from its exported routing summaries."""
    rows = study_report.run_rows(V2_EXPORT, study.plan_v2((1, 2)))
    table = {line.split(" | ")[0][2:]: line for line in study_report.runs_table(V2_EXPORT, rows, 1200)[2:]}
    for name, cell in (
        ("moec32-s1", "0.181 (0.226); 0.277 (0.226)"),
        ("moec32-s2", "0.191 (0.226); 0.251 (0.226)"),
        ("moec32-lossonly-s1", "0.211 (0.226); 0.221 (0.226)"),
        ("moec32-droponly-s1", "0.195 (0.226); 0.261 (0.226)"),
        ("moec8-s1", "0.310 (0.429); 0.515 (0.429)"),
        ("moec8-s2", "0.252 (0.429); 0.505 (0.429)"),
        ("moe32-s1", "G = 1; G = 1"),
        ("dense-s1", "dense"),
    ):
        assert table[name].split(" | ")[-2] == cell, name
    assert table["moec32-s1"].endswith("| – |")  # v2's logs predate the logged co-routing


def screening_done(out, refs, losses, bleus):
    """Every screening run finished (fake_done), with best valid losses LOSSES and test BLEU BLEUS by name."""
    for r in study.screening():
        fake_done(out, r.name, refs, bleus.get(r.name, 20.0), valid=[(100, 6.0), (200, losses.get(r.name, 5.1))])


def test_the_choice_reads_valid_losses_only_and_the_candidates_scores_wait_for_it(tmp_path):
    out = tmp_path / "out"
    refs = ["one line of the test set", "another line"]
    (out / "data" / "raw").mkdir(parents=True)
    (out / "data" / "raw" / "test.en").write_text("".join(r + "\n" for r in refs))
    losses = dict(zip(CANDIDATES, (5.09, 9.7, 5.08, 5.05, 5.2, 5.07, 5.1)))
    bleus = {name: 30.0 for name in CANDIDATES} | {"intra32-w1-s1": 60.0}  # the best test BLEU: not the lowest loss
    screening_done(out, refs, losses, bleus)
    shutil.rmtree(out / "runs" / "intra32-w1-s1")  # one candidate unfinished
    assert study.choose(out, study.screening()) is None and not (out / study.CHOICE).exists()
    study_report.write_v3(out, study.plan_v3(out), 1200, tmp_path / "img")
    text = (out / "results.md").read_text()
    assert "| token32-w0.1-s1 | done | after the choice | after the choice | 5.050 (200) |" in text
    assert "| moe32-s1 | done | 20.00 | 50.00 |" in text  # not a candidate
    assert "| intra32-w1-s1 | not started |" in text and "Not made yet: 6 of 7 candidates finished" in text
    stamps = json.loads((out / "results.json").read_text())["runs"]
    assert "score" not in stamps["token32-w0.1-s1"]["stamp"] and "score" in stamps["moe32-s1"]["stamp"]
    fake_done(out, "intra32-w1-s1", refs, 60.0, valid=[(100, 6.0), (200, 5.1)])
    saved = {name: (out / "runs" / name / "DONE").read_text() for name in CANDIDATES}
    for name in CANDIDATES:  # the choice must not need a test score
        (out / "runs" / name / "DONE").write_text("{}")
    choice = study.choose(out, study.screening())
    assert (choice["chosen"], choice["group"], choice["family"], choice["moe_counterpart"]) == (
        "token32-w0.1-s1",
        "token32-w0.1",
        "token-w0.1",
        "moe32",
    )
    assert [c["run"] for c in choice["candidates"]] == sorted(CANDIDATES, key=losses.get)
    assert json.loads((out / study.CHOICE).read_text()) == choice
    for name, text in saved.items():
        (out / "runs" / name / "DONE").write_text(text)
    write_log(out / "runs" / "moec32-s1" / "train.log", valid=[(100, 4.0)], train=[])  # later logs: no new choice
    assert study.choose(out, study.screening()) == choice
    study_report.write_v3(out, study.plan_v3(out), 1200, tmp_path / "img")
    text = (out / "results.md").read_text()
    assert "| token32-w0.1-s1 | done | 30.00 | 50.00 | 5.050 (200) |" in text and "**token32-w0.1-s1**" in text
    assert "| token32-w0.1-s2 | not started |" in text and "waits for every seed of both" in text


def test_the_official_recipe_is_confirmed_against_its_twin(tmp_path):
    out = tmp_path / "out"
    losses = dict.fromkeys(CANDIDATES, 5.2) | {"official32-s1": 5.0}
    screening_done(out, ["a"], losses, {})
    choice = study.choose(out, study.screening())
    assert (choice["chosen"], choice["moe_counterpart"]) == ("official32-s1", "official-moe32")
    names = [r.name for r in study.plan_v3(out)][len(study.screening()) :]
    assert names == ["official32-s2", "official32-s3", "official-moe32-s2", "official-moe32-s3", "dense-s2", "dense-s3"]


def write_choice(out, family):
    """OUT's choice file as study.choose writes it, for FAMILY's run at E = 32."""
    f = study.FAMILIES[family]
    candidates = [{"run": r.name, "best_valid": 5.0, "best_update": 1200} for r in study.screening() if r.candidate]
    choice = {"chosen": f"{f.group(32)}-s1", "group": f.group(32), "family": family, "written": "then", "rule": "r"}
    choice.update(moe_counterpart=study.FAMILIES[f.twin].group(32), candidates=candidates)
    (out / study.CHOICE).write_text(json.dumps(choice))
    return choice


def test_confirmation_plan_reuses_v2s_seeds(tmp_path):
    args = v3_args(tmp_path)
    out = Path(args.out)
    out.mkdir(parents=True)
    write_choice(out, "moec")
    later = study.plan_v3(out)[len(study.screening()) :]
    assert [r.name for r in later] == ["moec32-s2", "moec32-s3", "moe32-s2", "moe32-s3", "dense-s2", "dense-s3"]
    assert [r.name for r in later if study.reusable(args, r)] == ["moec32-s2", "moe32-s2", "dense-s2"]
    write_choice(out, "token-w1")
    later = study.plan_v3(out)[len(study.screening()) :]
    assert [r.name for r in later][:2] == ["token32-w1-s2", "token32-w1-s3"] and not later[0].candidate
    (out / study.DECISION).write_text(json.dumps({"beats": True}))
    upper = study.plan_v3(out)[-2:]
    assert [(r.name, r.experts, r.clusters, r.stage) for r in upper] == [
        ("token64-w1-s1", 64, 8, "upper"),
        ("moe64-s1", 64, 1, "upper"),
    ]
    (out / study.DECISION).write_text(json.dumps({"beats": False}))
    assert study.plan_v3(out)[-1].name == "dense-s3"


def confirmation_done(out, moec_seeds, moe_seeds, refs):
    """The screening (every run with REFS as its output) and the confirmation's seeds 2 and 3, the chosen
    token32-w0.1's and moe32's seeds' outputs given by MOEC_SEEDS and MOE_SEEDS, dense the reference."""
    (out / "data" / "raw").mkdir(parents=True, exist_ok=True)
    (out / "data" / "raw" / "test.en").write_text("".join(r + "\n" for r in refs))
    write_choice(out, "token-w0.1")
    for run in study.plan_v3(out):
        hyps = {"token32-w0.1": moec_seeds, "moe32": moe_seeds}.get(run.group, [refs] * 3)[run.seed - 1]
        fake_done(out, run.name, hyps, 1.0)


def test_upper_runs_only_when_moec_beats_moe(tmp_path, monkeypatch):
    """E = 64 runs when MoEC's mean BLEU is higher with a seed-aware p < 0.05: not when it is lower (however
    significant), nor when it is higher within the seed noise."""
    refs, vocab = synthetic(200)
    lucky = [corrupt(refs, q, s, vocab) for s, q in enumerate((0.1, 0.3, 0.2))]
    unlucky = [corrupt(refs, q, 10 + s, vocab) for s, q in enumerate((0.15, 0.35, 0.25))]
    ran = []
    monkeypatch.setattr(study, "prepare_data", lambda args: Path(args.out) / "data")
    monkeypatch.setattr(study, "do_run", lambda args, run, data: ran.append(run.name))
    cases = {  # MoEC's and MoE's outputs by seed
        "beats": ([refs] * 3, lucky),
        "worse": (lucky, [refs] * 3),
        "noise": (lucky, unlucky),
    }
    decisions = {}
    for case, (moec, moe) in cases.items():
        out = tmp_path / case
        confirmation_done(out, moec, moe, refs)
        ran.clear()
        assert study.main(["--out", str(out), "--device", "cpu", "--stage", "upper", "--plot-dir", str(tmp_path)]) == 0
        decisions[case] = decision = json.loads((out / study.DECISION).read_text())
        assert (decision["moec"], decision["moe"]) == ("token32-w0.1", "moe32")
        assert ran == (["token64-w0.1-s1", "moe64-s1"] if case == "beats" else []), case
        text = (out / "results.md").read_text()
        assert ("token32-w0.1 beats moe32" in text) == (case == "beats") and "| moe32 | token32-w0.1 | BLEU |" in text
    assert [decisions[c]["beats"] for c in cases] == [True, False, False]
    assert decisions["worse"]["diff"] < 0 and decisions["worse"]["p"] < 0.01
    assert decisions["noise"]["diff"] > 0 and decisions["noise"]["p"] > 0.05
    text = (tmp_path / "beats" / "results.md").read_text()
    assert "| token32-w0.1 | 3 of 3 | 1.00 ± 0.00 | 50.00 ± 0.00 | 5.000 ± 0.000 |" in text  # the stamps' scores
    assert "| token64-w0.1-s1 | not started |" in text


def test_stages_that_cannot_run_yet_say_so(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "prepare_data", lambda args: Path(args.out) / "data")
    monkeypatch.setattr(study, "do_run", lambda *a: pytest.fail("nothing to run"))
    base = ["--out", str(tmp_path / "out"), "--device", "cpu", "--plot-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match="waits for the screening"):
        study.main([*base, "--stage", "confirm"])
    (tmp_path / "out").mkdir(exist_ok=True)
    write_choice(tmp_path / "out", "moec")
    with pytest.raises(SystemExit, match="E = 64 waits for the confirmation"):
        study.main([*base, "--stage", "upper"])


def test_v3_list_shows_the_stages_and_what_it_imports(tmp_path, capsys):
    assert study.main(["--out", str(tmp_path / "out"), "--device", "cpu", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "# screening (E = 32, G = 4, seed 1)" and lines[-1].startswith("# confirmation (seeds 1-3)")
    states = dict(line.split(None, 1) for line in lines if not line.startswith("#"))
    assert list(states) == [r.name for r in study.screening()]
    assert (
        states["moec32-s1"]
        == f"not started (the same command as {V2_EXPORT / 'runs' / 'moec32-s1'}: imported, not trained)"
    )
    assert states["official32-s1"] == "not started"
    with pytest.raises(SystemExit):
        study.parse_args(["--seeds", "1,2"])  # v3's seeds are its plan's


# --- the upcycling experiment (issue 24) ---------------------------------------------------------------------------
def upc_args(tmp_path, *extra):
    return args_of(tmp_path, *extra, plan="upcycle")


def test_upcycle_plan_order_and_commands(tmp_path):
    args = upc_args(tmp_path)
    assert args.out == str(tmp_path / "out") and args.reuse == ""
    runs = study.plan_upcycle()
    names = [r.name for r in runs]
    assert names == ["upc-dense-base-s1", "upc-dense-cont-s1", "upc-moe32-s1", "upc-moec32-s1"]
    out = Path(args.out)
    cmds = {
        r.name: [str(c) for c in study.train_cmd(args, r, out / "data" / "bin", out / "runs" / r.name)] for r in runs
    }
    base = cmds["upc-dense-base-s1"]
    v2 = {r.name: r for r in study.plan_v2((1,))}
    # the base is v2's dense-s1 command (1200 updates) in its own directory, no start checkpoint
    assert flag(base, "--max-update") == "1200" and "--finetune-from-model" not in base
    assert study.settings_of([c.replace("upc-dense-base-s1", "dense-s1") for c in base]) == study.settings_of(
        command(args, v2["dense-s1"], out)
    )
    last = str(out / "runs" / "upc-dense-base-s1" / "checkpoints" / "checkpoint_last.pt")
    assert flag(cmds["upc-dense-cont-s1"], "--finetune-from-model") == last
    for name in ("upc-moe32-s1", "upc-moec32-s1"):
        assert flag(cmds[name], "--finetune-from-model") == str(out / "runs" / name / "upcycled.pt")
    conts = {n: c for n, c in cmds.items() if n != "upc-dense-base-s1"}
    for c in conts.values():
        assert "--restore-file" not in c and not any(x.startswith("--reset-") for x in c)
        for f in ("--max-update", "--seed", "--lr", "--lr-scheduler", "--warmup-updates", "--max-tokens", "--dropout"):
            assert flag(c, f) == flag(conts["upc-dense-cont-s1"], f), f
        assert flag(c, "--max-update") == "400"

    def strip(c, name):  # the command without its run directory and start checkpoint
        c = [x.replace(name, "NAME") for x in c]
        i = c.index("--finetune-from-model")
        return c[:i] + c[i + 2 :]

    # each sparse arm = the study's moe32-s1 / moec32-s1 training command (v2's) plus --finetune-from-model
    for arm, study_run in (("upc-moe32-s1", "moe32-s1"), ("upc-moec32-s1", "moec32-s1")):
        theirs = [x.replace(study_run, "NAME") for x in command(args, v2[study_run], out)]
        theirs[theirs.index("--max-update") + 1] = "400"
        assert study.settings_of(strip(cmds[arm], arm)) == study.settings_of(theirs), arm
    dense = strip(cmds["upc-dense-cont-s1"], "upc-dense-cont-s1")
    moe = strip(cmds["upc-moe32-s1"], "upc-moe32-s1")
    assert moe[: len(dense) - 6] == dense[: len(dense) - 6]  # the shared part: all but the model's flags


def test_upcycle_step_commands_and_rerun(tmp_path, monkeypatch):
    args = upc_args(tmp_path)
    out = Path(args.out)
    runs = {r.name: r for r in study.plan_upcycle()}
    calls = []

    def sh(cmd, **kw):
        cmd = [str(c) for c in cmd]
        calls.append(cmd)
        if cmd[1:3] == ["-m", "fairseq_moec.upcycle"]:
            Path(cmd[4]).write_bytes(b"upcycled")
            kw["stdout"].write("wrote it\n")
        else:
            raise StopIteration  # training: stop here

    monkeypatch.setattr(study, "sh", sh)
    with pytest.raises(SystemExit, match="needs .*checkpoint_last.pt of the finished run upc-dense-base-s1") as e:
        study.do_run(args, runs["upc-moe32-s1"], out / "data")
    assert "\n" not in str(e.value) and calls == []
    base = out / "runs" / "upc-dense-base-s1"
    (base / "checkpoints").mkdir(parents=True)
    (base / "checkpoints" / "checkpoint_last.pt").write_bytes(b"dense")
    with pytest.raises(SystemExit, match="needs"):  # a checkpoint but no DONE: not the final one
        study.do_run(args, runs["upc-dense-cont-s1"], out / "data")
    (base / "DONE").write_text("{}")
    for name, g, dropout in (("upc-moe32-s1", "1", "0.0"), ("upc-moec32-s1", "4", "0.5")):
        calls.clear()
        with pytest.raises(StopIteration):
            study.do_run(args, runs[name], out / "data")
        up, train = calls
        assert up[3:5] == [str(base / "checkpoints" / "checkpoint_last.pt"), str(out / "runs" / name / "upcycled.pt")]
        assert [flag(up, f) for f in ("--moe-expert-count", "--moe-clusters", "--cluster-dropout")] == [
            "32",
            g,
            dropout,
        ]
        assert [flag(up, f) for f in ("--moe-encoder-layers", "--moe-decoder-layers", "--seed")] == ["1", "1", "1"]
        assert "--router-init" not in up  # upcycle's default
        for f in study.UPCYCLE_MODEL_FLAGS:
            assert flag(up, f) == flag(train, f), f
        assert (out / "runs" / name / "upcycle.log").read_text() == "wrote it\n"
        calls.clear()
        with pytest.raises(StopIteration):  # a rerun: the upcycled file is there, training resumes
            study.do_run(args, runs[name], out / "data")
        assert len(calls) == 1 and "fairseq-train" in calls[0][0]
    calls.clear()
    with pytest.raises(StopIteration):
        study.do_run(args, runs["upc-dense-cont-s1"], out / "data")
    assert len(calls) == 1 and not (out / "runs" / "upc-dense-cont-s1" / "upcycled.pt").exists()


def test_upcycle_list_and_report(tmp_path, capsys):
    args = upc_args(tmp_path)
    out = Path(args.out)
    base = ["--plan", "upcycle", "--out", str(out), "--device", "cpu"]
    assert study.main([*base, "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [r.name for r in study.plan_upcycle()]
    assert lines[0].split(None, 1)[1] == "not started" and "upcycled]" in lines[2]
    refs = [f"the {w} went to the house number {i}" for i, w in enumerate(["man", "woman", "king"] * 10)]
    (out / "data" / "raw").mkdir(parents=True)
    (out / "data" / "raw" / "test.en").write_text("".join(r + "\n" for r in refs))
    fake_done(out, "upc-dense-base-s1", refs, 30.0)
    fake_done(out, "upc-dense-cont-s1", [r.replace("house", "home") for r in refs], 31.0)
    fake_done(out, "upc-moe32-s1", refs, 32.0)
    assert study.main([*base, "--report-only", "--export", str(tmp_path / "exp")]) == 0
    text = (out / "results.md").read_text()
    assert "| upc-moe32-s1 | done | 32.00 |" in text and "| upc-moec32-s1 | not started |" in text
    assert "| upc-dense-cont-s1 | upc-moe32-s1 |" in text and "| upc-moe32-s1 | upc-moec32-s1 | waits" in text
    assert "- upc-moe32-s1 - upc-dense-cont-s1: +1.00 BLEU" in text and "study v2's test BLEU" in text
    assert "router init 'random'" in text
    assert (tmp_path / "exp" / "runs" / "upc-moe32-s1" / "hyp.txt").exists()
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["v2_seed_spread"]) == {"dense", "moe32", "moec32"}
