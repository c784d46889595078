"""scripts/study.py without training: log parsing, the table writer and run-level resumability."""
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def study():
    spec = importlib.util.spec_from_file_location("study", ROOT / "scripts" / "study.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["study"] = mod
    spec.loader.exec_module(mod)
    return mod


def _line(tag, rec, console=False):
    """fairseq --log-file lines are the bare json (the console adds a prefix; both are parsed). fairseq
    writes numbers as strings; the valid/train records have their keys prefixed by the tag."""
    text = json.dumps({k: str(v) for k, v in rec.items()}) + "\n"
    return f"2026-11-26 07:00:00 | INFO | {tag} | " + text if console else text


def synthetic_log(path, moe=True, upto=40, resume_dup=True):
    """train_inner every 10 updates, valid every 20; valid loss goes 6.0, 5.0 (best at 20) ... then up."""
    lines = ["model: TransformerModel\n", "{'_name': None, 'common': {'log_format': 'json'}}\n"]
    valid = {20: 5.0, 40: 5.5, 60: 5.8}
    for u in range(10, upto + 1, 10):
        lines.append(_line("train_inner", {"epoch": 1, "update": u / 50, "loss": 7.0 - u / 10, "num_updates": u,
                                           "wps": 1000.0}, console=(u == 10)))
        if u in valid:
            rec = {"epoch": 1, "valid_loss": valid[u], "valid_nll_loss": valid[u] - 0.5, "valid_num_updates": u}
            if moe:
                rec.update({"valid_moe_enc1_load_cv": 0.5 + u / 100, "valid_moe_dec1_load_cv": 0.25,
                            "valid_moe_enc1_balance": 1.1})
            lines.append(_line("valid", rec))
    if resume_dup:  # a resumed session repeats the last validation: the later copy wins, nothing doubles
        lines.append('{"valid_loss": "oops", not json\n')
        lines.append(_line("train", {"train_loss": 4.5, "train_num_updates": upto}))
    Path(path).write_text("".join(lines), encoding="utf-8")


def test_parse_log_best_gap_cv(study, tmp_path):
    log = tmp_path / "train.log"
    synthetic_log(log, upto=40)
    s = study.summarize_log(log)
    assert s["curve"] == [(20, 5.0), (40, 5.5)]
    assert s["best_valid_loss"] == 5.0 and s["best_update"] == 20
    assert s["last_valid_loss"] == 5.5 and s["last_update"] == 40
    # train losses logged in (20, 40]: updates 30 and 40 -> 4.0 and 3.0
    assert s["train_loss_end"] == pytest.approx(3.5)
    assert s["gap"] == pytest.approx(2.0)
    assert s["load_cv"] == {"dec1": 0.25, "enc1": pytest.approx(0.9)}


def test_parse_log_dense_and_missing(study, tmp_path):
    log = tmp_path / "train.log"
    synthetic_log(log, moe=False, upto=20)
    s = study.summarize_log(log)
    assert s["best_update"] == 20 and "load_cv" not in s
    empty = study.summarize_log(tmp_path / "nope.log")
    assert empty["last_update"] == 0 and empty["curve"] == [] and "best_valid_loss" not in empty


def test_parse_log_repeated_update_after_resume(study, tmp_path):
    log = tmp_path / "train.log"
    synthetic_log(log, upto=40, resume_dup=False)
    with open(log, "a") as f:  # resumed from the checkpoint at 20: update 30/40 logged again with other values
        f.write(_line("train_inner", {"loss": 3.9, "num_updates": 30}))
        f.write(_line("valid", {"valid_loss": 5.4, "valid_num_updates": 40}))
    s = study.summarize_log(log)
    assert s["curve"] == [(20, 5.0), (40, 5.4)]


def test_table_marks_missing_and_incomplete_runs(study, tmp_path):
    done, part, none = tmp_path / "done", tmp_path / "part", tmp_path / "none"
    for d in (done, part):
        d.mkdir()
    synthetic_log(done / "train.log", upto=40)
    synthetic_log(part / "train.log", upto=30)  # no stamp: interrupted
    res = {"bleu": 12.34, "chrf": 30.5, "bleu_signature": "nrefs:1|bleu-sig", "chrf_signature": "chrf-sig"}
    (done / "DONE").write_text(json.dumps({"updates": 40, "results": {"best": res, "last": res}}))
    table = study.write_table([("moe32", done), ("moec32", part), ("dense", none)], ["best", "last"], 40)
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert "12.34" in rows["moe32"] and "30.50" in rows["moe32"] and "enc1 0.90" in rows["moe32"]
    assert "+2.000" in rows["moe32"]
    assert "interrupted at update 30" in rows["moec32"]
    assert "not run" in rows["dense"]
    # no number at all in the rows of unfinished runs
    for name in ("moec32", "dense"):
        cells = [c.strip() for c in rows[name].split("|")[3:-1]]
        assert set(cells) == {"–"}, cells
    assert "bleu-sig" in table


def test_finished_run_is_skipped(study, tmp_path, monkeypatch):
    args = study.parse_args(["--out", str(tmp_path), "--only", "moe16"])
    spec = study.run_specs(args)[0]
    rdir = study.run_dir(args, spec[0], 1)
    rdir.mkdir(parents=True)
    (rdir / "DONE").write_text("{}")
    calls = []
    monkeypatch.setattr(study, "sh", lambda *a, **k: calls.append(a))
    study.do_run(args, spec, 1, tmp_path / "bin", tmp_path / "spm.model", tmp_path / "raw")
    assert calls == []  # no fairseq command for a stamped run


def test_unfinished_run_resumes_same_dir(study, tmp_path, monkeypatch):
    """No stamp: the same fairseq-train command runs again in the same save dir (fairseq resumes from
    checkpoint_last.pt); a changed setting is refused instead of mixing checkpoints."""
    args = study.parse_args(["--out", str(tmp_path), "--only", "moec32", "--eval-checkpoints", ""])
    spec = study.run_specs(args)[0]
    calls = []
    monkeypatch.setattr(study, "sh", lambda cmd, **k: calls.append(cmd))
    study.do_run(args, spec, 1, tmp_path / "bin", tmp_path / "spm.model", tmp_path / "raw")
    assert len(calls) == 1 and "--save-dir" in calls[0]
    save_dir = calls[0][calls[0].index("--save-dir") + 1]
    assert save_dir == str(study.run_dir(args, spec[0], 1) / "checkpoints")
    (study.run_dir(args, spec[0], 1) / "DONE").unlink()
    study.do_run(args, spec, 1, tmp_path / "bin", tmp_path / "spm.model", tmp_path / "raw")
    assert calls[1] == calls[0]
    other = study.parse_args(["--out", str(tmp_path), "--only", "moec32", "--lr", "1e-3", "--eval-checkpoints", ""])
    (study.run_dir(args, spec[0], 1) / "DONE").unlink()
    with pytest.raises(SystemExit):
        study.do_run(other, spec, 1, tmp_path / "bin", tmp_path / "spm.model", tmp_path / "raw")


def test_run_plan_flags(study):
    args = study.parse_args([])
    names = [s[0] for s in study.run_specs(args)]
    assert names == ["dense", "moe16", "moec16", "moe32", "moec32"]
    dense = study.model_args(args, "dense", 0, 0)
    assert "--arch" in dense and dense[dense.index("--arch") + 1] == "transformer"
    moe = study.model_args(args, "moe", 16, 1)
    assert moe[moe.index("--moe-clusters") + 1] == "1" and moe[moe.index("--cluster-dropout") + 1] == "0"
    assert moe[moe.index("--moe-cluster-weight") + 1] == "0"
    moec = study.model_args(args, "moec", 32, 4)
    assert moec[moec.index("--moe-clusters") + 1] == "4"
    assert float(moec[moec.index("--cluster-dropout") + 1]) > 0
    assert float(moec[moec.index("--moe-cluster-weight") + 1]) > 0
    assert study.parse_args(["--seeds", "2"]).seeds == [1, 2]


def test_run_taken_by_a_live_process_is_skipped(study, tmp_path, monkeypatch):
    import os
    args = study.parse_args(["--out", str(tmp_path), "--only", "moe16", "--eval-checkpoints", ""])
    spec = study.run_specs(args)[0]
    rdir = study.run_dir(args, spec[0], 1)
    rdir.mkdir(parents=True)
    (rdir / "LOCK").write_text(f"{os.getppid()}\n")  # a live process that is not us
    calls = []
    monkeypatch.setattr(study, "sh", lambda cmd, **k: calls.append(cmd))
    study.do_run(args, spec, 1, tmp_path / "bin", tmp_path / "spm.model", tmp_path / "raw")
    assert calls == [] and (rdir / "LOCK").exists()
    (rdir / "LOCK").write_text("999999999\n")  # a dead one: the run is taken over, the lock released after
    study.do_run(args, spec, 1, tmp_path / "bin", tmp_path / "spm.model", tmp_path / "raw")
    assert len(calls) == 1 and not (rdir / "LOCK").exists()
    assert study.parse_args(["--seeds", "1", "--first-seed", "2"]).seeds == [2]


def test_report_writes_table_json_and_plot(study, tmp_path):
    args = study.parse_args(["--out", str(tmp_path), "--seeds", "2", "--plot", str(tmp_path / "plot.png")])
    done = study.run_dir(args, "moe32", 1)
    part = study.run_dir(args, "moec32", 2)
    for d in (done, part):
        d.mkdir(parents=True)
        synthetic_log(d / "train.log", upto=40)
    (done / "DONE").write_text(json.dumps({"updates": 40, "results": {}}))
    study.report(args)
    table = (tmp_path / "results.md").read_text()
    assert "| moe32 (s1) | done" in table and "| moec32 (s2) G=4 | interrupted at update 40" in table
    assert table.count("not run") == 8
    assert (tmp_path / "plot.png").stat().st_size > 0
    full = json.loads((tmp_path / "results.json").read_text())
    assert full["moe32 (s1)"]["summary"]["best_update"] == 20 and full["moec32 (s2) G=4"]["stamp"] is None


def test_mean_table_uses_finished_seeds_only(study, tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d, best in ((a, 10.0), (b, 20.0)):
        d.mkdir()
        synthetic_log(d / "train.log", upto=40)
        (d / "DONE").write_text(json.dumps({"results": {"best": {"bleu": best, "chrf": 2 * best}}}))
    c.mkdir()
    synthetic_log(c / "train.log", upto=40)  # unfinished: must not count
    text = study.write_mean_table([("moe32", [a, b, c]), ("dense", [tmp_path / "none"])], ["best"])
    row = next(l for l in text.splitlines() if l.startswith("| moe32"))
    cells = [x.strip() for x in row.split("|")[1:-1]]
    assert cells[:4] == ["moe32", "2", "15.00", "30.00"]
    assert cells[4] == "5.000" and cells[6] == "0.500"  # best valid 5.0, final 5.5
    dense = next(l for l in text.splitlines() if l.startswith("| dense"))
    assert "| dense | 0 | – |" in dense
