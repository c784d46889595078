"""fairseq_moec.pipeline, the steps the demo, the study, the benchmarks and the WMT scripts share: each checked
against a hand-made expectation."""

import gzip
import json
import re
import subprocess
from pathlib import Path

import pytest

from fairseq_moec.pipeline import files, hypotheses, logs, machine, small_model

ROOT = Path(__file__).resolve().parents[1]


def test_read_lines_splits_on_newline_only_and_reads_compressed_copies(tmp_path):
    text = "uno\rdos\u2028tres\n\ncuatro\x85\n"  # \r, U+2028 and U+0085 are inside sentences, not line breaks
    (tmp_path / "a").write_bytes(text.encode())
    assert files.read_lines(tmp_path / "a") == ["uno\rdos\u2028tres", "", "cuatro\x85"]
    (tmp_path / "b.gz").write_bytes(gzip.compress(text.encode()))
    assert files.read_lines(tmp_path / "b") == ["uno\rdos\u2028tres", "", "cuatro\x85"]
    (tmp_path / "c").write_text("no final newline")
    assert files.read_lines(tmp_path / "c") == ["no final newline"]


def test_atomic_path_leaves_the_old_file_or_the_complete_new_one(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    files.write_text_atomic(target, "old\n")
    with pytest.raises(RuntimeError):
        with files.atomic_path(target) as tmp:
            Path(tmp).write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old\n" and sorted(p.name for p in target.parent.iterdir()) == ["out.txt"]
    with files.atomic_path(tmp_path / "d", mode="dir") as tmp:
        (Path(tmp) / "x").write_text("1")
    assert (tmp_path / "d" / "x").read_text() == "1"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_stamp_matches_only_the_key_it_was_written_for(tmp_path):
    stamp = tmp_path / "DONE"
    assert not files.stamp_matches(stamp, {"vocab": 8000})
    files.write_stamp(stamp, {"vocab": 8000}, counts={"train": 3})
    assert json.loads(stamp.read_text()) == {"key": {"vocab": 8000}, "counts": {"train": 3}}
    assert files.stamp_matches(stamp, {"vocab": 8000}) and not files.stamp_matches(stamp, {"vocab": 4000})
    stamp.write_text("{truncated")
    assert not files.stamp_matches(stamp, {"vocab": 8000})


GENERATE = """S-2\tc
H-2\t-0.3\t▁c ▁c
D-2\t-0.3\tc c
H-0\t-0.1\t▁a
H-1\t-0.2\t
Translated 3 sentences (7 tokens) in 0.5s (6.00 sentences/s, 14.00 tokens/s)
"""


def test_hypotheses_in_input_order_and_every_gap_named():
    lines = GENERATE.splitlines()
    assert hypotheses.hypotheses(lines, 3) == ["▁a", "", "▁c ▁c"]
    with pytest.raises(files.PipelineError, match=re.escape("3 hypotheses for 4 input lines; missing ids: [3]")):
        hypotheses.hypotheses(lines, 4)
    with pytest.raises(files.PipelineError, match=re.escape("3 hypotheses for 2 input lines; unexpected ids: [2]")):
        hypotheses.hypotheses(lines, 2)
    with pytest.raises(files.PipelineError, match="two hypotheses for sentence 0"):
        hypotheses.hypotheses(lines + ["H-0\t-1\t▁b"], 3)
    assert hypotheses.generation_speed(GENERATE) == {
        "sentences": 3,
        "tokens": 7,
        "seconds": 0.5,
        "sentences_per_s": 6.0,
        "tokens_per_s": 14.0,
    }


def test_parse_log_keeps_the_last_record_of_an_update(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(
        'noise\n2026 | INFO | train_inner | {"epoch": 1, "loss": "5.0", "num_updates": "10", "wps": "9"}\n'
        '{"loss": "4.0", "num_updates": "10"}\n{"valid_loss": "6", "valid_num_updates": "10"}\n'
        '{"train_loss": "3", "train_num_updates": "10"}\n{"broken": \n'
    )
    parsed = logs.parse_log(log)
    assert [r["loss"] for r in parsed["train_inner"]] == ["4.0"]
    assert [r["valid_loss"] for r in parsed["valid"]] == ["6"]
    assert len(logs.json_records(log)) == 4 and logs.parse_log(tmp_path / "none") == {"train_inner": [], "valid": []}


def test_code_info_names_the_commit_and_a_dirty_tree(tmp_path):
    def git(*args):
        return subprocess.run(
            ["git", "-C", str(tmp_path), *args], check=True, capture_output=True, text=True
        ).stdout.strip()

    git("init", "-q")
    (tmp_path / "f").write_text("1")
    git("add", "f")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "c")
    assert machine.code_info(tmp_path) == {
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": False,
        "git_changes": [],
    }
    (tmp_path / "f").write_text("2")
    (tmp_path / "new").write_text("")
    assert machine.code_info(tmp_path)["git_dirty"] is True
    assert machine.code_info(tmp_path)["git_changes"] == [" M f", "?? new"]
    assert machine.code_info(tmp_path / "f")["git_commit"] is None  # not a directory: no checkout


def test_demo_defaults_are_the_small_model():
    """demo.sh (bash) states the small model's sizes as its defaults; the study and bench_e2e take them from
    small_model. A change on one side only would make the three train different models."""
    demo = (ROOT / "scripts" / "demo.sh").read_text()
    defaults = {name: int(re.search(rf"\${{DEMO_{name.upper()}:-(\d+)}}", demo).group(1)) for name in small_model.SIZES}
    assert defaults == small_model.SIZES == {"layers": 3, "dim": 256, "ffn": 1024, "heads": 4}
    args = small_model.size_args()
    flags = ("--encoder-layers", "--decoder-ffn-embed-dim", "--decoder-attention-heads")
    assert [args[args.index(f) + 1] for f in flags] == ["3", "1024", "4"]
