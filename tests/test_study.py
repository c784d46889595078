"""scripts/study.py and study_report.py without training: the plan, the commands, log parsing, the allocation
numbers, the tables with real sacrebleu paired tests, and run-level resumability."""

import json
from pathlib import Path

import pytest
import study
import study_report


def args_of(tmp_path, *extra):
    return study.parse_args(
        ["--out", str(tmp_path / "out"), "--device", "cpu", "--plot-dir", str(tmp_path / "img"), *extra]
    )


def flag(cmd, name):
    return cmd[cmd.index(name) + 1] if name in cmd else None


def test_plan_runs_and_their_flags(tmp_path):
    args = args_of(tmp_path)
    runs = {r.name: r for r in study.plan(args.seeds)}
    assert [r.name for r in study.plan((1,))][:5] == ["dense-s1", "moe32-s1", "moec32-s1", "moe8-s1", "moec8-s1"]
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
    # train losses in (200, 300]: 4.0 and 3.0 -> 3.5; gap 5.5 - 3.5
    assert (s["train_end"], s["gap"]) == (3.5, 2.0)
    assert study_report.summarize(tmp_path / "none.log") == {"curve": [], "last_update": 0}


def test_allocation_by_hand():
    summary = {"layers": {"enc1": {"num_experts": 4, "load": [0.5, 0.3, 0.1, 0.1]}}}
    a = study_report.allocation(summary)["enc1"]
    # mean 0.25, population std sqrt((0.0625 + 0.0025 + 0.0225 * 2) / 4) = sqrt(0.0275); half the even share 0.125
    assert (a["min"], a["max"], a["below_half_even"]) == (0.1, 0.5, 2)
    assert a["cv"] == pytest.approx(0.0275**0.5 / 0.25)


def fake_done(out, name, hyps, bleu):
    rdir = out / "runs" / name
    rdir.mkdir(parents=True)
    (rdir / "hyp.txt").write_text("".join(h + "\n" for h in hyps))
    write_log(rdir / "train.log", valid=[(100, 6.0), (200, 5.0)], train=[(150, 6.0), (200, 4.5)])
    score = {"bleu": bleu, "chrf": 50.0, "bleu_signature": "nrefs:1|tok:13a", "chrf_signature": "nrefs:1|nc:6"}
    routing = {"enc1": {"min": 0.01, "max": 0.3, "cv": 0.5, "below_half_even": 1}}
    (rdir / "DONE").write_text(json.dumps({"score": score, "routing": routing}))


def test_report_tables_and_paired_tests(tmp_path):
    out = tmp_path / "out"
    refs = [f"the {w} went to the house of the lord number {i}" for i, w in enumerate(["man", "woman", "king"] * 10)]
    (out / "data" / "raw").mkdir(parents=True)
    (out / "data" / "raw" / "test.en").write_text("".join(r + "\n" for r in refs))
    fake_done(out, "moe8-s1", [r.replace("house", "home") for r in refs], 40.0)
    fake_done(out, "moec8-s1", refs, 100.0)
    fake_done(out, "dense-s1", refs, 100.0)
    study_report.write(out, study.plan((1,)), 1200, tmp_path / "img")
    text = (out / "results.md").read_text()
    assert "| moec8-s1 | done | 100.00 | 50.00 | 5.000 (200) | 5.000 | -0.250 | 0.010/0.300, CV 0.50, 1 |" in text
    assert "| moe32-s1 | not started |" in text
    # the only pair with both sides finished: MoEC against MoE at E = 8; identical-to-reference output wins
    rows = [line for line in text.splitlines() if line.startswith("| moe8-s1 | moec8-s1 |")]
    assert len(rows) == 1 and float(rows[0].split("|")[4]) < 0.01
    assert (tmp_path / "img" / "study_v2_valid_loss.png").stat().st_size > 0
    assert (tmp_path / "img" / "study_v2_bleu_vs_experts.png").stat().st_size > 0


def test_finished_run_is_skipped_and_changed_settings_refused(tmp_path, monkeypatch):
    args = args_of(tmp_path)
    runs = {r.name: r for r in study.plan(args.seeds)}
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


def test_export_keeps_what_rebuilds_the_report(tmp_path):
    """The exported copy (no checkpoints) gives the same results.md as the working directory."""
    out, exported = tmp_path / "out", tmp_path / "exported"
    refs = [f"line {i} of the test set" for i in range(12)]
    (out / "data" / "raw").mkdir(parents=True)
    (out / "data" / "raw" / "test.en").write_text("".join(r + "\n" for r in refs))
    fake_done(out, "moe8-s1", [r.replace("test", "best") for r in refs], 40.0)
    fake_done(out, "moec8-s1", refs, 100.0)
    (out / "runs" / "moec8-s1" / "checkpoints").mkdir()
    (out / "runs" / "moec8-s1" / "checkpoints" / "checkpoint_best.pt").write_bytes(b"big")
    (out / "runs" / "moe32-s1").mkdir()  # unfinished: nothing of it is exported
    (out / "runs" / "moe32-s1" / "train.log").write_text("")
    copied = study_report.export(out, study.plan((1,)), exported)
    assert "runs/moec8-s1/hyp.txt" in copied and not any("moe32" in c or "checkpoint" in c for c in copied)
    study_report.write(out, study.plan((1,)), 1200, tmp_path / "img")
    study_report.write(exported, study.plan((1,)), 1200, tmp_path / "img2")
    assert (exported / "results.md").read_text() == (out / "results.md").read_text()
