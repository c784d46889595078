"""The bundled corpus and the input checks / step bookkeeping of scripts/demo.sh; one end-to-end run of another
language pair (de-fr, tiny model, 2 updates)."""

import gzip
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
    return {f"{s}.{x}": read_xz(f"{s}.{x}") for s in SPLITS for x in ("es", "en", "ref")}


def test_shipped_corpus_line_counts_and_alignment(shipped):
    refs = set()
    for split, n in SPLITS.items():
        for side in ("es", "en", "ref"):
            lines = shipped[f"{split}.{side}"].split("\n")
            assert lines[-1] == "", f"{split}.{side} must end with a newline"
            assert len(lines) - 1 == n, f"{split}.{side}: {len(lines) - 1} lines, documented {n}"
            assert all(line.strip() for line in lines[:-1]), f"{split}.{side} has an empty line"
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
    e = dict(
        os.environ,
        DEMO_DIR=str(tmp_path / "demo"),
        DEMO_CORPUS=str(corpus),
        DEMO_STOP_AFTER=stop_after,
        PYTHON=sys.executable,
    )
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
    assert "lacks valid.en" in r.stderr and "error:" in r.stderr and "Traceback" not in r.stderr
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
    r = subprocess.run(
        [sys.executable, str(TOOLS), "collect", str(tmp_path / "gen"), spm_model, "4", str(tmp_path / "hyp")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "hyp").read_text().splitlines() == [f"the house {i} is big ." for i in range(4)]


def test_collect_fails_loudly_on_missing_hypotheses(tmp_path, spm_model):
    fake_generate(tmp_path / "gen", [0, 1, 3], spm_model)  # what fairseq-generate did with a dropped last batch
    r = subprocess.run(
        [sys.executable, str(TOOLS), "collect", str(tmp_path / "gen"), spm_model, "4", str(tmp_path / "hyp")],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0
    assert "3 hypotheses for 4 test lines" in r.stderr and "missing ids: [2]" in r.stderr
    assert not (tmp_path / "hyp").exists()


def test_score_writes_bleu_and_chrf_with_signatures(tmp_path):
    (tmp_path / "hyp").write_text("the house is big .\nthe garden is green .\n")
    (tmp_path / "ref").write_text("the house is big .\nthe garden is very green .\n")
    r = subprocess.run(
        [
            sys.executable,
            str(TOOLS),
            "score",
            str(tmp_path / "hyp"),
            str(tmp_path / "ref"),
            str(tmp_path / "res.txt"),
            str(tmp_path / "res.json"),
        ],
        capture_output=True,
        text=True,
    )
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


# --- bad input is refused before any work, with one clear line ---------------------------------------------------
def refused(r, *needles):
    assert r.returncode != 0, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr
    return r


@pytest.mark.parametrize(
    "env, message",
    [
        ({"DEMO_SRC": "pt-BR"}, "DEMO_SRC='pt-BR' is not usable as a language code"),
        ({"DEMO_TGT": "ref"}, "DEMO_TGT=ref"),
        ({"DEMO_SRC": "en"}, "DEMO_SRC and DEMO_TGT are both 'en'"),
        ({"DEMO_BLEU_TOKENIZE": "nonsense"}, "not a sacrebleu tokenizer; one of: none, zh, 13a"),
        ({"DEMO_UPDATES": "many"}, "DEMO_UPDATES must be an integer >= 1"),
        ({"DEMO_BEAM": "0"}, "DEMO_BEAM must be an integer >= 1"),
        ({"DEMO_DROPOUT": "1.5"}, "DEMO_DROPOUT must be a number in [0, 1)"),
        ({"DEMO_LR": "0"}, "DEMO_LR must be a positive number"),
        ({"DEMO_SCHEDULE": "cosine"}, "DEMO_SCHEDULE must be 'linear' (warmup, then linear decay to 0"),
        ({"DEMO_WARMUP": "1100"}, "DEMO_WARMUP=1100 must be below DEMO_UPDATES=1100 with DEMO_SCHEDULE=linear"),
        ({"DEMO_WARMUP": "50", "DEMO_UPDATES": "20", "DEMO_SCHEDULE": "linear"}, "DEMO_WARMUP=50 must be below"),
        ({"DEMO_DROPOUT_INTERVAL": "0"}, "DEMO_DROPOUT_INTERVAL must be an integer >= 1"),
        ({"DEMO_PROFILE": "long"}, "DEMO_PROFILE was removed: the learning rate decays to 0 at DEMO_UPDATES"),
        ({"DEMO_DIR": "{tmp}/a,b"}, "contains ',', ':' or a newline"),
        ({"DEMO_DIR": "{tmp}/a:b"}, "contains ',', ':' or a newline"),
    ],
)
def test_bad_settings_are_refused_before_any_work(tmp_path, env, message):
    c = make_corpus(tmp_path / "c")
    env["DEMO_DIR"] = env.get("DEMO_DIR", "{tmp}/demo").format(tmp=tmp_path)
    refused(run_demo(tmp_path, c, **env), message)
    assert not Path(env["DEMO_DIR"]).exists()


def test_japanese_target_needs_its_tokenizer_or_another_one(tmp_path):
    import importlib.util

    if importlib.util.find_spec("MeCab") is not None:
        pytest.skip("MeCab is installed here: ja-mecab works")
    c = make_corpus(tmp_path / "c")
    refused(
        run_demo(tmp_path, c, DEMO_TGT="ja"),
        "tokenizer 'ja-mecab' (for target language 'ja') cannot run",
        "DEMO_BLEU_TOKENIZE",
    )
    assert not (tmp_path / "demo").exists()


def test_malformed_sha256sums_names_the_line(tmp_path):
    c = make_corpus(tmp_path / "c", plain=True)
    good = hashlib.sha256((c / "train.es").read_bytes()).hexdigest()
    (c / "SHA256SUMS").write_text(f"{good}  train.es\nnot a checksum line\n")
    refused(
        run_demo(tmp_path, c), "SHA256SUMS line 2: expected '<64 hex digits>  <file name>'", "'not a checksum line'"
    )
    assert not stamp(tmp_path, "corpus").exists()


def test_sha256sums_listing_a_missing_file_names_it(tmp_path):
    c = make_corpus(tmp_path / "c", plain=True)
    (c / "SHA256SUMS").write_text("0" * 64 + "  train.de\n" + "1" * 64 + "  ../etc/passwd\n")
    refused(
        run_demo(tmp_path, c),
        "SHA256SUMS line 1 lists 'train.de', which is not in the corpus",
        "line 2: '../etc/passwd' is not a file name of the corpus directory",
    )
    assert not stamp(tmp_path, "corpus").exists()


def test_sha256sums_of_the_stored_compressed_files_are_checked(tmp_path):
    c = make_corpus(tmp_path / "c")  # .xz files; the sums name them as stored
    sums = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in sorted(c.glob("*.xz")))
    (c / "SHA256SUMS").write_text(sums)
    r = run_demo(tmp_path, c)
    assert r.returncode == 0, r.stderr
    (c / "SHA256SUMS").write_text(sums.replace(sums[:64], "f" * 64, 1))
    refused(run_demo(tmp_path, c), "test.en.xz: sha256", "differs from SHA256SUMS")


def test_mixed_compression_and_ambiguous_files(tmp_path):
    c = make_corpus(tmp_path / "c", plain=True)
    for name in ("train.es", "train.en"):
        (c / f"{name}.gz").write_bytes(gzip.compress((c / name).read_bytes()))
        (c / name).unlink()
    r = run_demo(tmp_path, c)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "demo" / "corpus" / "train.es").read_text().startswith("la casa 1 es grande .\n")
    (c / "train.es").write_text("la casa 1 es grande .\n")
    refused(run_demo(tmp_path, c), "has both train.es and train.es.gz")


def test_ref_files_are_optional_but_all_or_none(tmp_path):
    c = make_corpus(tmp_path / "c", plain=True)
    (c / "valid.ref").unlink()
    refused(run_demo(tmp_path, c), ".ref files for some splits only", "valid.ref missing")
    for split in ("train", "test"):
        (c / f"{split}.ref").unlink()
    r = run_demo(tmp_path, c)
    assert r.returncode == 0 and "corpus ok: train 12, valid 3, test 3" in r.stdout + r.stderr, r.stderr


def test_corrupt_compressed_file_is_named(tmp_path):
    c = make_corpus(tmp_path / "c")
    data = (c / "valid.en.xz").read_bytes()
    (c / "valid.en.xz").write_bytes(data[: len(data) // 2])
    refused(run_demo(tmp_path, c), f"cannot decompress {c / 'valid.en.xz'}")
    assert not stamp(tmp_path, "corpus").exists()


def test_bundled_corpus_key_is_the_one_the_demo_always_computed():
    """The corpus key of the bundled corpus, computed as demo.sh computed it in bash before the corpus step moved
    to Python: a changed key would redo every finished step of existing demo directories."""
    h = hashlib.sha1()
    for split in SPLITS:
        for side in ("es", "en", "ref"):
            h.update(f"{split}.{side}\n".encode() + (CORPUS / f"{split}.{side}.xz").read_bytes())
    h.update((CORPUS / "SHA256SUMS").read_bytes())
    r = subprocess.run(
        [sys.executable, str(TOOLS), "corpus-key", str(CORPUS), "--src", "es", "--tgt", "en"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert r.stdout.strip() == h.hexdigest()[:12]


def test_score_tokenizer_follows_the_target_language(tmp_path):
    (tmp_path / "hyp").write_text("这是 一个 测试\nthe garden is green .\n")
    (tmp_path / "ref").write_text("这是一个测试\nthe garden is very green .\n")

    def score(*extra):
        r = subprocess.run(
            [
                sys.executable,
                str(TOOLS),
                "score",
                *(str(tmp_path / f) for f in ("hyp", "ref")),
                str(tmp_path / "r.txt"),
                str(tmp_path / "r.json"),
                *extra,
            ],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stderr
        import json

        return json.loads((tmp_path / "r.json").read_text())

    import sacrebleu

    hyps = (tmp_path / "hyp").read_text().splitlines()
    refs = [(tmp_path / "ref").read_text().splitlines()]
    for extra, tok in [
        (("--tgt-lang", "zh"), "zh"),
        (("--tgt-lang", "fr"), "13a"),
        (("--tgt-lang", "fr", "--tokenize", "char"), "char"),
    ]:
        res = score(*extra, "--meta", 'model_dir=a "quoted" dir', "--meta", "beam=4")
        assert f"tok:{tok}|" in res["bleu_signature"]
        assert res["bleu"] == round(sacrebleu.corpus_bleu(hyps, refs, tokenize=tok).score, 2)
        assert res["model_dir"] == 'a "quoted" dir' and res["beam"] == 4


# --- another language pair, end to end through the real tools ----------------------------------------------------
DE_FR = ROOT / "tests" / "fixtures" / "tiny-de-fr"
TINY_DEMO = dict(
    DEMO_SRC="de",
    DEMO_TGT="fr",
    DEMO_VOCAB="80",
    DEMO_LAYERS="1",
    DEMO_DIM="32",
    DEMO_FFN="64",
    DEMO_HEADS="2",
    DEMO_EXPERTS="4",
    DEMO_CLUSTERS="2",
    DEMO_CLUSTER_DROPOUT="0.5",
    DEMO_DROPOUT_INTERVAL="1",
    DEMO_MOE_ENCODER_LAYERS="0",
    DEMO_MOE_DECODER_LAYERS="0",
    DEMO_UPDATES="2",
    DEMO_SAVE_INTERVAL="2",
    DEMO_WARMUP="1",
    DEMO_MAX_TOKENS="1000",
    DEMO_BEAM="1",
    DEMO_GEN_ARGS="--max-len-b 6",
    OMP_NUM_THREADS="1",
    MKL_NUM_THREADS="1",
)


def stored_text(path):
    opener = {".gz": gzip.open, ".xz": lzma.open}.get(path.suffix, open)
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read()


@pytest.mark.slow
def test_german_french_corpus_end_to_end(tmp_path):
    """DEMO_CORPUS/DEMO_SRC/DEMO_TGT: the de-fr fixture (train .gz, valid .xz, test plain) through every step, in a
    DEMO_DIR with a '"' and a space (a '"' once broke the last step); the codes reach each tool."""
    demo = tmp_path / 'my "demo" dir'
    env = dict(os.environ, PYTHON=sys.executable, DEMO_DIR=str(demo), DEMO_CORPUS=str(DE_FR), **TINY_DEMO)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    r = subprocess.run(["bash", str(DEMO)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    for split, ext in (("train", ".gz"), ("valid", ".xz"), ("test", "")):
        for lang in ("de", "fr"):
            assert (demo / "corpus" / f"{split}.{lang}").read_text() == stored_text(DE_FR / f"{split}.{lang}{ext}")
    # sentencepiece: trained on both sides, so it has pieces that only German, and pieces that only French, holds
    de, fr = (stored_text(DE_FR / f"train.{lang}.gz") for lang in ("de", "fr"))
    pieces = [line.split("\t")[0].replace("▁", " ") for line in (demo / "spm" / "spm.vocab").read_text().splitlines()]
    pieces = [p for p in pieces if len(p.strip()) > 1]
    assert any(p in de and p not in fr for p in pieces) and any(p in fr and p not in de for p in pieces), pieces
    # fairseq-preprocess and fairseq-train: the pair's codes, one joined dictionary
    assert (demo / "bin" / "dict.de.txt").read_text() == (demo / "bin" / "dict.fr.txt").read_text()
    assert all((demo / "bin" / f"{s}.de-fr.{lang}.bin").is_file() for s in SPLITS for lang in ("de", "fr"))
    (model,) = demo.glob("model-*")
    assert "--source-lang de --target-lang fr" in (model / "train.cmd").read_text()
    # sacrebleu: every test line translated, scored against the French references with the French tokenizer
    import json

    import sacrebleu

    hyps = (model / "hyp.test.fr").read_text(encoding="utf-8").splitlines()
    refs = stored_text(DE_FR / "test.fr").splitlines()
    res = json.loads((model / "results.json").read_text())
    assert len(hyps) == len(refs) == res["lines"] == 15
    assert (res["source_lang"], res["target_lang"], res["model_dir"]) == ("de", "fr", str(model))
    assert "tok:13a|" in res["bleu_signature"]
    assert res["bleu"] == round(sacrebleu.corpus_bleu(hyps, [refs]).score, 2)
    assert res["chrf"] == round(sacrebleu.corpus_chrf(hyps, [refs]).score, 2)
    assert "== MoEC demo, de -> fr, 15 test lines" in r.stdout
    # the command it prints translates a sentence: run it as printed
    lines = r.stdout.splitlines()
    i = lines.index("translate a sentence of your own:")
    command = "\n".join(lines[i + 1 : i + 3])
    assert "fairseq-interactive" in command and "checkpoint_last.pt" in command and "--source-lang de" in command
    out = subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert [line for line in out.stdout.splitlines() if line.startswith("D-0\t")], out.stdout[-2000:]
    again = subprocess.run(["bash", str(DEMO)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stderr.count("already done") == 7, again.stderr[-3000:]


# --- the corpus rebuild's cleaning (pure text functions; the Debian packages are not needed here) ------------------
def rebuild_module():
    import rebuild_bible_corpus  # scripts/ is on the tests' path (pyproject.toml)

    return rebuild_bible_corpus


def test_rebuild_cleaning_rules():
    clean = rebuild_module().clean
    assert (
        clean(
            '<w lemma="strong:H0430">God</w><note placement="foot"><reference type="annotateRef">1:1 '
            '</reference>The Hebrew word “God”.</note><w lemma="x">created</w>'
        )
        == "God created"
    )
    assert clean('<title type="psalm">A Psalm.</title> <w>Yahweh</w>,<note>n</note>for') == "Yahweh, for"
    assert clean('coins</q> <note>x</note> <q marker="">? Not &amp; ‘walk’</q> ?”') == "coins? Not & ‘walk’?”"
    assert (
        clean('Amen. <chapter eID="Rev.22"/> <div sID="g1" type="glossary"/> <title>Glossary</title> Abba') == "Amen."
    )
    assert clean("  a \n\t b  ") == "a b"


def test_rebuild_split_is_a_function_of_the_reference():
    split_of = rebuild_module().split_of
    splits = [split_of(f"Gen.{c}.{v}") for c in range(1, 51) for v in range(1, 41)]
    # by hand: sha1 first 8 hex digits, mod 1000 (valid: slots 0-32, test: 33-65, train: the rest)
    # Gen.1.17: 53ea8772 = 1407879026 -> 26; Gen.1.15: 773eac61 = 2000596065 -> 65; Gen.1.1: 52c41bd1 -> 889
    assert [split_of(r) for r in ("Gen.1.17", "Gen.1.15", "Gen.1.1")] == ["valid", "test", "train"]
    assert set(splits) == {"train", "valid", "test"}
    assert 0.02 < splits.count("test") / len(splits) < 0.05
