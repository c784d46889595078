"""scripts/study.py and study_report.py without training: the plan, the commands, log parsing, the allocation
numbers, the tables with real sacrebleu paired tests, and run-level resumability; the train-data loss in eval
mode through the real fairseq-validate on the tiny checkpoint of conftest."""

import json
from pathlib import Path

import pytest
import study
import study_report
from conftest import FIXTURE

# stdout of the study's fairseq-validate command (study.train_eval) on conftest's tiny MoEC checkpoint, with
# --log-interval 2 added so that per-batch records (unprefixed keys, sums) come before the end-of-subset one
VALIDATE_OUTPUT = Path(__file__).parent / "fixtures" / "fairseq_validate_train_subset.log"


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


def fake_done(out, name, hyps, bleu, train_eval=None):
    """A finished run: final valid loss 5.0, training-mode train loss 5.25 over (100, 200]; TRAIN_EVAL: the loss
    of its train_eval.json (none when None)."""
    rdir = out / "runs" / name
    rdir.mkdir(parents=True)
    (rdir / "hyp.txt").write_text("".join(h + "\n" for h in hyps))
    write_log(rdir / "train.log", valid=[(100, 6.0), (200, 5.0)], train=[(150, 6.0), (200, 4.5)])
    if train_eval is not None:
        (rdir / "train_eval.json").write_text(json.dumps({"loss": train_eval, "nll_loss": train_eval - 0.5}))
    score = {"bleu": bleu, "chrf": 50.0, "bleu_signature": "nrefs:1|tok:13a", "chrf_signature": "nrefs:1|nc:6"}
    routing = {"enc1": {"min": 0.01, "max": 0.3, "cv": 0.5, "below_half_even": 1}}
    (rdir / "DONE").write_text(json.dumps({"score": score, "routing": routing}))


def test_paired_tests_of_the_whole_plan():
    done = {r.name: (r, None, None) for r in study.plan((1, 2))}
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
    study_report.write(out, study.plan((1,)), 1200, tmp_path / "img")
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


def test_a_run_resumes_from_another_checkout_and_work_dir_but_not_with_other_flags(tmp_path, monkeypatch):
    """command.json holds absolute paths; the check compares the commands with the checkout and the work directory
    read as places, so only a change of the command itself is refused."""
    args = args_of(tmp_path)
    run = {r.name: r for r in study.plan(args.seeds)}["moec8-s1"]
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
    copied = study_report.export(out, study.plan((1,)), exported)
    assert "runs/moec8-s1/hyp.txt" in copied and not any("moe32" in c or "checkpoint" in c for c in copied)
    assert "runs/moec8-s1/train_eval.json" in copied
    study_report.write(out, study.plan((1,)), 1200, tmp_path / "img")
    study_report.write(exported, study.plan((1,)), 1200, tmp_path / "img2")
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
    study_report.write(out, study.plan((1, 2)), 1200, tmp_path / "img")
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
    runs = {r.name: r for r in study.plan(args.seeds)}
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
    run = {r.name: r for r in study.plan(args.seeds)}["moe8-s1"]
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
    run = {r.name: r for r in study.plan(args.seeds)}["moec8-s1"]
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
    runs = {r.name: r for r in study.plan(args.seeds)}
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
    assert study.main(["--out", args.out, "--device", "cpu", "--list"]) == 0
    states = dict(line.split(None, 1) for line in capsys.readouterr().out.splitlines())
    assert states["dense-s1"] == "done" and states["moec32-s1-keepmask"] == "done"  # the latter: nothing to add
    assert states["moe32-s1"].startswith("done, without train_eval.json")
    assert states["moec32-s1"] == "not started"
