"""The bundled corpus and the input checks / step bookkeeping of scripts/demo.sh (no training here)."""
import hashlib
import lzma
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "bible-es-en"
DEMO = ROOT / "scripts" / "demo.sh"
TOOLS = ROOT / "scripts" / "demo_tools.py"
SPLITS = {"train": 28091, "valid": 995, "test": 966}  # documented in data/bible-es-en/README.md


def read_xz(name):
    with lzma.open(CORPUS / f"{name}.xz", "rt", encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def shipped():
    return {f"{s}.{l}": read_xz(f"{s}.{l}") for s in SPLITS for l in ("es", "en", "ref")}


def test_shipped_corpus_line_counts_and_alignment(shipped):
    refs = set()
    for split, n in SPLITS.items():
        for side in ("es", "en", "ref"):
            lines = shipped[f"{split}.{side}"].split("\n")
            assert lines[-1] == "", f"{split}.{side} must end with a newline"
            assert len(lines) - 1 == n, f"{split}.{side}: {len(lines) - 1} lines, documented {n}"
            assert all(l.strip() for l in lines[:-1]), f"{split}.{side} has an empty line"
        split_refs = shipped[f"{split}.ref"].split()
        assert all(r.count(".") == 2 for r in split_refs)  # Book.Chapter.Verse
        assert not refs & set(split_refs), "a verse is in two splits"
        refs |= set(split_refs)
    assert len(refs) == sum(SPLITS.values()) == 30052


def test_shipped_corpus_matches_its_checksums(shipped):
    sums = dict(reversed(line.split()) for line in (CORPUS / "SHA256SUMS").read_text().splitlines() if line)
    assert set(sums) == set(shipped)
    for name, text in shipped.items():
        assert hashlib.sha256(text.encode("utf-8")).hexdigest() == sums[name], name


def test_shipped_readme_states_the_split_sizes():
    readme = (CORPUS / "README.md").read_text()
    for n in ("28,091", "995", "966", "30,052"):
        assert n in readme
    assert "public domain" in readme.lower()


# ---------------------------------------------------------------------------------------------------------------
def make_corpus(d: Path, n=(12, 3, 3), plain=False):
    """A tiny well-formed corpus in the shipped layout (xz files unless plain)."""
    d.mkdir(parents=True, exist_ok=True)
    k = 0
    for split, count in zip(("train", "valid", "test"), n):
        rows = []
        for _ in range(count):
            k += 1
            rows.append((f"la casa {k} es grande .", f"the house {k} is big .", f"Gen.1.{k}"))
        for i, side in enumerate(("es", "en", "ref")):
            text = "".join(r[i] + "\n" for r in rows)
            if plain:
                (d / f"{split}.{side}").write_text(text, encoding="utf-8")
            else:
                with lzma.open(d / f"{split}.{side}.xz", "wt", encoding="utf-8") as f:
                    f.write(text)
    return d


def run_demo(tmp_path, corpus, stop_after="corpus", **env):
    e = dict(os.environ, DEMO_DIR=str(tmp_path / "demo"), DEMO_CORPUS=str(corpus), DEMO_STOP_AFTER=stop_after,
             PYTHON=sys.executable)
    e.update(env)
    return subprocess.run(["bash", str(DEMO)], cwd=ROOT, env=e, capture_output=True, text=True, timeout=60)


def stamp(tmp_path, step):
    return tmp_path / "demo" / "stamps" / f"{step}.done"


def test_good_corpus_passes_and_is_stamped(tmp_path):
    r = run_demo(tmp_path, make_corpus(tmp_path / "c"))
    assert r.returncode == 0, r.stderr
    assert "corpus ok: train 12, valid 3, test 3" in r.stdout + r.stderr
    assert stamp(tmp_path, "corpus").is_file()
    assert (tmp_path / "demo" / "corpus" / "test.en").read_text().startswith("the house 16 is big .")


def test_missing_corpus_file_is_refused(tmp_path):
    c = make_corpus(tmp_path / "c")
    (c / "valid.en.xz").unlink()
    r = run_demo(tmp_path, c)
    assert r.returncode != 0
    assert "valid.en" in r.stderr and "ERROR" in r.stderr
    assert not stamp(tmp_path, "corpus").exists()


def test_missing_corpus_dir_is_refused(tmp_path):
    r = run_demo(tmp_path, tmp_path / "nowhere")
    assert r.returncode != 0 and "not found" in r.stderr


def test_misaligned_corpus_is_refused(tmp_path):
    c = make_corpus(tmp_path / "c", plain=True)
    with open(c / "train.en", "a") as f:
        f.write("one line too many\n")
    r = run_demo(tmp_path, c)
    assert r.returncode != 0
    assert "misaligned" in r.stderr and "train.en=13" in r.stderr
    assert not stamp(tmp_path, "corpus").exists()
    assert not (tmp_path / "demo" / "corpus").exists()


def test_empty_line_is_refused(tmp_path):
    c = make_corpus(tmp_path / "c", plain=True)
    lines = (c / "test.es").read_text().splitlines()
    lines[1] = ""
    (c / "test.es").write_text("\n".join(lines) + "\n")
    r = run_demo(tmp_path, c)
    assert r.returncode != 0 and "empty line" in r.stderr
    assert not stamp(tmp_path, "corpus").exists()


def test_checksum_mismatch_is_refused(tmp_path):
    c = make_corpus(tmp_path / "c", plain=True)
    (c / "SHA256SUMS").write_text("0" * 64 + "  train.es\n")
    r = run_demo(tmp_path, c)
    assert r.returncode != 0 and "differs from SHA256SUMS" in r.stderr
    assert not stamp(tmp_path, "corpus").exists()


def test_bad_settings_are_refused(tmp_path):
    c = make_corpus(tmp_path / "c")
    assert run_demo(tmp_path, c, DEMO_PROFILE="huge").returncode != 0
    assert "unknown step" in run_demo(tmp_path, c, stop_after="nonsense").stderr


def test_finished_step_is_skipped_and_redone_when_its_input_changes(tmp_path):
    c = make_corpus(tmp_path / "c", plain=True)
    assert run_demo(tmp_path, c).returncode == 0
    marker = tmp_path / "demo" / "corpus" / "marker"
    marker.write_text("kept")  # a skipped step leaves its output alone
    r = run_demo(tmp_path, c)
    assert r.returncode == 0
    assert "corpus: already done" in r.stderr and "skipping" in r.stderr
    assert marker.exists()
    with open(c / "test.en", "a") as f, open(c / "test.es", "a") as g, open(c / "test.ref", "a") as h:
        f.write("new\n"), g.write("nuevo\n"), h.write("Gen.2.1\n")
    r = run_demo(tmp_path, c)
    assert r.returncode == 0 and "corpus: running" in r.stderr  # new input: the stamp's key no longer matches
    assert not marker.exists()
    assert "test 4" in r.stdout + r.stderr


def test_interrupted_step_is_not_taken_as_finished(tmp_path):
    c = make_corpus(tmp_path / "c")
    assert run_demo(tmp_path, c).returncode == 0
    stamp(tmp_path, "corpus").unlink()  # what an interruption before the stamp leaves
    (tmp_path / "demo" / "corpus.tmp").mkdir()
    r = run_demo(tmp_path, c)
    assert r.returncode == 0 and "corpus: running" in r.stderr
    assert stamp(tmp_path, "corpus").is_file() and not (tmp_path / "demo" / "corpus.tmp").exists()


def test_spm_and_encode_steps_on_a_tiny_corpus(tmp_path):
    c = make_corpus(tmp_path / "c", n=(40, 3, 3))
    r = run_demo(tmp_path, c, stop_after="encode", DEMO_VOCAB="30")
    assert r.returncode == 0, r.stderr
    tok = (tmp_path / "demo" / "tok" / "test.en").read_text().splitlines()
    assert len(tok) == 3 and tok[0].startswith("▁")
    r = run_demo(tmp_path, c, stop_after="encode", DEMO_VOCAB="30")
    assert r.stderr.count("already done") == 3


# --- collecting fairseq-generate output ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("spm")
    text = d / "text"
    text.write_text("".join(f"the house {k} is big and the garden is green .\n" for k in range(200)))
    subprocess.run([sys.executable, str(TOOLS), "spm-train", str(d / "m"), "40", str(text)], check=True)
    return str(d / "m.model")


def fake_generate(path, ids, spm_model):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=spm_model)
    with open(path, "w") as f:
        for i in ids:
            pieces = " ".join(sp.encode(f"the house {i} is big .", out_type=str))
            f.write(f"S-{i}\tx\nH-{i}\t-0.5\t{pieces}\nD-{i}\t-0.5\tx\n")


def test_collect_restores_input_order(tmp_path, spm_model):
    fake_generate(tmp_path / "gen", [2, 0, 3, 1], spm_model)
    r = subprocess.run([sys.executable, str(TOOLS), "collect", str(tmp_path / "gen"), spm_model, "4",
                        str(tmp_path / "hyp")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "hyp").read_text().splitlines() == [f"the house {i} is big ." for i in range(4)]


def test_collect_fails_loudly_on_missing_hypotheses(tmp_path, spm_model):
    fake_generate(tmp_path / "gen", [0, 1, 3], spm_model)  # what fairseq-generate did with a dropped last batch
    r = subprocess.run([sys.executable, str(TOOLS), "collect", str(tmp_path / "gen"), spm_model, "4",
                        str(tmp_path / "hyp")], capture_output=True, text=True)
    assert r.returncode != 0
    assert "3 hypotheses for 4 test lines" in r.stderr and "missing ids [2]" in r.stderr
    assert not (tmp_path / "hyp").exists()


def test_score_writes_bleu_and_chrf_with_signatures(tmp_path):
    (tmp_path / "hyp").write_text("the house is big .\nthe garden is green .\n")
    (tmp_path / "ref").write_text("the house is big .\nthe garden is very green .\n")
    r = subprocess.run([sys.executable, str(TOOLS), "score", str(tmp_path / "hyp"), str(tmp_path / "ref"),
                        str(tmp_path / "res.txt"), str(tmp_path / "res.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import json
    res = json.loads((tmp_path / "res.json").read_text())
    assert 0 < res["bleu"] < 100 and 0 < res["chrf"] < 100
    assert "tok:13a" in res["bleu_signature"] and res["chrf_signature"].startswith("nrefs:1")


def test_failing_step_is_reported_and_not_stamped(tmp_path):
    c = make_corpus(tmp_path / "c")
    r = run_demo(tmp_path, c, stop_after="spm", DEMO_VOCAB="5000")  # far too many pieces for 12 lines
    assert r.returncode != 0
    assert "step spm failed" in r.stderr
    assert stamp(tmp_path, "corpus").is_file() and not stamp(tmp_path, "spm").exists()
    assert not (tmp_path / "demo" / "spm").exists()


# --- the corpus rebuild's cleaning (pure text functions; the Debian packages are not needed here) ------------------
def rebuild_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("rebuild_bible_corpus", ROOT / "scripts" / "rebuild_bible_corpus.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rebuild_cleaning_rules():
    clean = rebuild_module().clean
    assert clean('<w lemma="strong:H0430">God</w><note placement="foot"><reference type="annotateRef">1:1 '
                 '</reference>The Hebrew word “God”.</note><w lemma="x">created</w>') == "God created"
    assert clean('<title type="psalm">A Psalm.</title> <w>Yahweh</w>,<note>n</note>for') == "Yahweh, for"
    assert clean("coins</q> <note>x</note> <q marker=\"\">? Not &amp; ‘walk’</q> ?”") == "coins? Not & ‘walk’?”"
    assert clean('Amen. <chapter eID="Rev.22"/> <div sID="g1" type="glossary"/> <title>Glossary</title> Abba') == "Amen."
    assert clean("  a \n\t b  ") == "a b"


def test_rebuild_split_is_a_function_of_the_reference():
    split_of = rebuild_module().split_of
    splits = [split_of(f"Gen.{c}.{v}") for c in range(1, 51) for v in range(1, 41)]
    assert splits == [split_of(f"Gen.{c}.{v}") for c in range(1, 51) for v in range(1, 41)]
    assert set(splits) == {"train", "valid", "test"}
    assert 0.02 < splits.count("test") / len(splits) < 0.05
