"""The WMT'14 en-de recipe (prepare, configs, train, evaluate, results table) on tiny fixture archives.

The archives mimic the real statmt.org releases (archive and member names, the test sets' fake-SGML) and
are built in a temp directory from 520 public-domain Bible verse pairs in tests/fixtures/
bible_en_es_sample.tsv.gz (World English Bible / Reina-Valera 1909; Spanish stands in for German). No
network: the prepare script reads them with --archives DIR or WMT_MIRROR=file://DIR.
"""

import gzip
import hashlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"
WMT = SCRIPTS / "wmt"
CONFIGS = ROOT / "configs" / "wmt14_en_de"
BIN = Path(sys.executable).parent
SAMPLE = ROOT / "tests" / "fixtures" / "bible_en_es_sample.tsv.gz"
VOCAB = "300"  # tiny joint sentencepiece vocabulary for the 430 training pairs


# ---------------------------------------------------------------------------------------------- helpers


def run(cmd, cwd=None, env=None, path_prefix=None):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    for var in ("WMT_MIRROR", "DATA", "CUDA_VISIBLE_DEVICES"):
        e.pop(var, None)
    e["PATH"] = os.pathsep.join([p for p in (str(path_prefix or ""), str(BIN), e.get("PATH", "")) if p])
    e.update(env or {})
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, env=e)


def script(name, *args, **kw):
    return run(["bash", SCRIPTS / name, *args], **kw)


def ok(proc):
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-6000:]}"
    )
    return proc


def failed(proc, *needles):
    """The command failed with exit status 2 (bad input) and said each of ``needles`` in one error line."""
    assert proc.returncode == 2, f"exit {proc.returncode}, expected 2\n{proc.stderr[-4000:]}"
    errors = [line for line in proc.stderr.splitlines() if re.match(r"([\w.-]+: )?error: ", line)]
    assert errors, proc.stderr[-3000:]
    text = proc.stderr
    for n in needles:
        assert n in text, f"{n!r} not in:\n{text[-3000:]}"
    return proc


def load(name):
    """scripts/wmt/NAME.py as a module (pyproject.toml puts scripts/wmt on the tests' path)."""
    return importlib.import_module(name)


# ---------------------------------------------------------------------------------------------- fixture archives


def sample_pairs():
    rows = gzip.open(SAMPLE, "rt", encoding="utf-8").read().rstrip("\n").split("\n")
    return [r.split("\t") for r in rows]


def _text(lines):
    return ("\n".join(lines) + "\n").encode("utf-8")


def _sgm(kind, lang, segs, docsize=10):
    out = [f'<{kind}set setid="newstest2014" srclang="any" trglang="{lang}">']
    for d in range(0, len(segs), docsize):
        out += [f'<doc sysid="{kind}" docid="doc{d // docsize}-news" genre="news" origlang="en">', "<p>"]
        out += [f'<seg id="{i}">{s}</seg>' for i, s in enumerate(segs[d : d + docsize], 1)]
        out += ["</p>", "</doc>"]
    return _text(out + [f"</{kind}set>"])


def _tgz(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0
            tar.addfile(info, io.BytesIO(data))


def build_archive(directory, name, **fault):
    """Write one fixture archive into ``directory``; ``fault`` injects one defect (see the tests)."""
    pairs = sample_pairs()
    en, de = [p[0] for p in pairs], [p[1] for p in pairs]
    path = Path(directory) / name
    if name == "training-parallel-europarl-v7.tgz":
        de_part = de[:260][: 260 - fault.get("drop_de_lines", 0)]
        _tgz(
            path,
            [
                ("training/europarl-v7.de-en.de", _text(de_part)),
                ("training/europarl-v7.de-en.en", _text(en[:260])),
                ("training/europarl-v7.fr-en.en", _text(en[:5])),
            ],
        )  # other pairs live in the same archive
    elif name == "training-parallel-commoncrawl.tgz":
        cc_en, cc_de = en[260:360], de[260:360]
        cc_en[3] += "\r and a stray carriage return"  # the real corpus has these: must not split the line
        cc_en[5] = cc_de[5] = ""  # an empty pair: dropped by the length filter
        _tgz(
            path,
            [
                ("commoncrawl.de-en.annotation", _text(["news"] * 100)),
                ("commoncrawl.de-en.de", _text(cc_de)),
                ("commoncrawl.de-en.en", _text(cc_en)),
                ("commoncrawl.fr-en.fr", _text(de[:3])),
            ],
        )
    elif name in ("training-parallel-nc-v9.tgz", "training-parallel-nc-v12.tgz"):
        v = "v9" if "v9" in name else "v12"
        _tgz(
            path,
            [
                (f"training/news-commentary-{v}.de-en.de", _text(de[360:430])),
                (f"training/news-commentary-{v}.de-en.en", _text(en[360:430])),
            ],
        )
    elif name == "dev.tgz":
        _tgz(
            path,
            [
                ("dev/newstest2013.de", _text(de[430:470])),
                ("dev/newstest2013.en", _text(en[430:470])),
                ("dev/newstest2013-src.en.sgm", _sgm("src", "en", en[430:470])),
            ],
        )
    elif name == "test-full.tgz":
        ref = _sgm("ref", "de", de[470:520])
        if fault.get("unclosed_seg"):
            ref = ref.replace(b"</seg>\n", b"\n", 1)
        if fault.get("extra_ref_seg"):
            ref = ref.replace(b"</doc>", b'<seg id="11">one more</seg>\n</doc>', 1)
        _tgz(
            path,
            [
                ("test-full/newstest2014-deen-src.en.sgm", _sgm("src", "en", en[470:520])),
                ("test-full/newstest2014-deen-ref.de.sgm", ref),
                ("test-full/newstest2014-deen-src.de.sgm", _sgm("src", "de", de[470:520])),
                ("test-full/newstest2014-deen-ref.en.sgm", _sgm("ref", "en", en[470:520])),
            ],
        )
    else:
        raise ValueError(name)
    return path


ARCHIVES = (
    "training-parallel-europarl-v7.tgz",
    "training-parallel-commoncrawl.tgz",
    "training-parallel-nc-v9.tgz",
    "dev.tgz",
    "test-full.tgz",
)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_sums(directory, overrides=None):
    """SHA256SUMS (sha256sum format) of the archives in ``directory``; overrides: name -> value or '-'."""
    overrides = overrides or {}
    lines = [
        f"{overrides.get(n, sha256(Path(directory) / n))}  {n}" for n in ARCHIVES if (Path(directory) / n).exists()
    ]
    path = Path(directory) / "SHA256SUMS"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    d = tmp_path_factory.mktemp("archives")
    for name in ARCHIVES:
        build_archive(d, name)
    write_sums(d)
    return d


def variant(tmp_path, good, replace=None, remove=(), sums=None):
    """A copy of the good archive directory with one archive rebuilt with a fault, or removed."""
    d = tmp_path / "archives"
    d.mkdir()
    for name in ARCHIVES:
        if name in remove:
            continue
        if replace and name == replace[0]:
            build_archive(d, name, **replace[1])
        else:
            os.symlink(good / name, d / name)
    return d, write_sums(d, sums)


def prepare_args(archive_dir, sums, work, dest, *extra):
    return [
        "--archives",
        archive_dir,
        "--checksums",
        sums,
        "--workdir",
        work,
        "--dest",
        dest,
        "--vocab-size",
        VOCAB,
        "--workers",
        "1",
        *extra,
    ]


def assert_nothing_finished(work, dest):
    """No output that looks finished: no step directory, no data directory, no leftover temp directory."""
    assert not Path(dest).exists(), os.listdir(Path(dest).parent) if Path(dest).parent.exists() else None
    for step in ("raw", "tok"):
        assert not (Path(work) / step).exists()
    leftovers = [str(p) for p in Path(work).rglob("*.incomplete")] if Path(work).exists() else []
    assert not leftovers


# ---------------------------------------------------------------------------------------------- prepare: end to end


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, archives):
    """One full tiny prepare run, first interrupted in its last step (binarization), then resumed."""
    tmp = tmp_path_factory.mktemp("prepare")
    work, dest = tmp / "work", tmp / "data-bin" / "wmt14_en_de"
    args = prepare_args(archives, archives / "SHA256SUMS", work, dest)
    shim = tmp / "shim"
    shim.mkdir()
    # Stands for a binarization killed half-way: it writes part of its output, then fails.
    (shim / "fairseq-preprocess").write_text(
        '#!/bin/sh\nwhile [ $# -gt 0 ]; do [ "$1" = --destdir ] && d=$2; shift; done\n'
        'echo partial > "$d/train.en-de.en.bin"\nexit 137\n'
    )
    (shim / "fairseq-preprocess").chmod(0o755)
    interrupted = script("prepare-wmt14en2de.sh", *args, path_prefix=shim)
    after_interrupt = {p: (work / p).exists() for p in ("raw", "tok", f"unigram{VOCAB}/spm", f"unigram{VOCAB}/data")}
    after_interrupt["dest"] = dest.exists()
    after_interrupt["dest.incomplete"] = Path(str(dest) + ".incomplete").exists()
    # A run killed with SIGKILL cannot clean up: its temp directory must not survive into the result.
    stale = Path(str(dest) + ".incomplete")
    stale.mkdir(parents=True)
    (stale / "garbage").write_text("from a killed run")
    resumed = ok(script("prepare-wmt14en2de.sh", *args))
    again = ok(script("prepare-wmt14en2de.sh", *args))
    return SimpleNamespace(
        work=work,
        dest=dest,
        args=args,
        interrupted=interrupted,
        after_interrupt=after_interrupt,
        resumed=resumed,
        again=again,
    )


def test_prepare_writes_binarized_joined_data(prepared, archives):
    dest = prepared.dest
    for split in ("train", "valid", "test"):
        for lang in ("en", "de"):
            for ext in ("bin", "idx"):
                assert (dest / f"{split}.en-de.{lang}.{ext}").stat().st_size > 0
    assert (dest / "dict.en.txt").read_text() == (dest / "dict.de.txt").read_text()  # --joined-dictionary
    assert not (dest / "garbage").exists()
    assert (dest / "spm.model").stat().st_size > 0
    manifest = json.loads((dest / "prepare.json").read_text())
    raw = manifest["counts_raw"]
    assert raw["train_corpora"] == {"europarl-v7": 260, "commoncrawl": 100, "news-commentary-v9": 70}
    assert (raw["train"], raw["valid"], raw["test"]) == (430, 40, 50)
    assert manifest["filter"]["train"]["kept"] < 430  # the empty pair at least is gone
    assert manifest["archives_sha256"]["test-full.tgz"] == sha256(archives / "test-full.tgz")
    # The stray '\r' neither split nor shifted the Common Crawl lines.
    train_en = (prepared.work / "raw" / "train.en").read_bytes().decode("utf-8").split("\n")
    assert "stray carriage return" in train_en[263] and len(train_en) == 431
    # The reference for sacrebleu is the sgm text, cleaned as sacrebleu does, in order.
    de = [p[1] for p in sample_pairs()][470:520]
    assert (dest / "test.raw.de").read_text(encoding="utf-8").split("\n")[:-1] == [" ".join(s.split()) for s in de]
    # binarized test set: every sentence, none filtered
    tok_test = (prepared.work / "unigram300" / "data" / "test.de").read_text(encoding="utf-8").split("\n")
    assert len(tok_test) == 51


def test_prepare_progress_and_rerun_skips(prepared):
    log = prepared.resumed.stderr
    for step in ("extract", "tokenize", "sentencepiece", "encode+filter"):
        assert f"[{step}] already done" in log
    assert "[binarize] done" in log
    assert "already done" in prepared.again.stderr and "[binarize]" not in prepared.again.stderr


def test_interrupted_step_leaves_no_finished_output(prepared):
    failed_run = prepared.interrupted
    assert failed_run.returncode != 0
    assert "step 'binarize' did not finish" in failed_run.stderr
    state = prepared.after_interrupt
    assert not state["dest"] and not state["dest.incomplete"]
    assert all(state[p] for p in ("raw", "tok", "unigram300/spm", "unigram300/data"))


def test_prepare_refuses_other_options_on_finished_dirs(prepared):
    args = list(prepared.args)
    args[args.index("--vocab-size") + 1] = "400"
    failed(script("prepare-wmt14en2de.sh", *args), "prepared with other options", "vocab=300", "vocab=400")


# ---------------------------------------------------------------------------------------------- prepare: bad input


def test_checksum_mismatch_fails_closed(tmp_path, archives):
    d, sums = variant(tmp_path, archives, sums={"training-parallel-nc-v9.tgz": "0" * 64})
    work, dest = tmp_path / "w", tmp_path / "d"
    proc = failed(
        script("prepare-wmt14en2de.sh", *prepare_args(d, sums, work, dest)),
        "checksum mismatch for training-parallel-nc-v9.tgz",
    )
    assert not (work / "orig" / "training-parallel-nc-v9.tgz").exists()
    assert (work / "orig" / "training-parallel-europarl-v7.tgz").exists()  # verified before: kept
    assert "step 'fetch' did not finish" in proc.stderr
    assert_nothing_finished(work, dest)


def test_builtin_table_rejects_archives_that_are_not_the_release(tmp_path, archives):
    """The fixture archives are not the real ones: the script's own table (real checksums) must refuse them."""
    work = tmp_path / "w"
    proc = failed(
        script(
            "prepare-wmt14en2de.sh",
            "--archives",
            archives,
            "--workdir",
            work,
            "--dest",
            tmp_path / "d",
            "--download-only",
        ),
        "checksum mismatch for training-parallel-europarl-v7.tgz",
    )
    assert not (work / "orig" / "training-parallel-europarl-v7.tgz").exists()
    assert "0224c7c710c8a063dfd893b0cc0830202d61f4c75c17eb8e31836103d27d96e7" in proc.stderr


def test_unknown_checksum_warns_and_strict_refuses(tmp_path, archives):
    d, sums = variant(tmp_path, archives, sums={"dev.tgz": "-"})
    proc = ok(
        script("prepare-wmt14en2de.sh", *prepare_args(d, sums, tmp_path / "w", tmp_path / "d"), "--download-only")
    )
    assert "no checksum known for dev.tgz" in proc.stderr and "UNVERIFIED" in proc.stderr
    assert sha256(archives / "dev.tgz") in proc.stderr  # printed so the user can record it
    failed(
        script(
            "prepare-wmt14en2de.sh",
            *prepare_args(d, sums, tmp_path / "w2", tmp_path / "d"),
            "--download-only",
            "--strict-checksums",
        ),
        "no checksum known for dev.tgz",
    )
    assert not (tmp_path / "w2" / "orig" / "dev.tgz").exists()


def test_download_resumes_from_partial_file(tmp_path, archives):
    """WMT_MIRROR=file://... goes through the real download path (curl); a .part file is resumed."""
    work = tmp_path / "w"
    orig = work / "orig"
    orig.mkdir(parents=True)
    full = (archives / "training-parallel-europarl-v7.tgz").read_bytes()
    (orig / "training-parallel-europarl-v7.tgz.part").write_bytes(full[: len(full) // 2])
    proc = ok(
        script(
            "prepare-wmt14en2de.sh",
            "--checksums",
            archives / "SHA256SUMS",
            "--workdir",
            work,
            "--dest",
            tmp_path / "d",
            "--download-only",
            env={"WMT_MIRROR": archives.as_uri()},
        )
    )
    assert "resuming after" in proc.stderr
    for name in ARCHIVES:
        assert (orig / name).read_bytes() == (archives / name).read_bytes()
    assert not list(orig.glob("*.part"))


def test_bad_download_is_set_aside(tmp_path, archives):
    d, sums = variant(tmp_path, archives, sums={"dev.tgz": "1" * 64})
    work = tmp_path / "w"
    failed(
        script(
            "prepare-wmt14en2de.sh",
            "--checksums",
            sums,
            "--workdir",
            work,
            "--dest",
            tmp_path / "d",
            "--download-only",
            env={"WMT_MIRROR": d.as_uri()},
        ),
        "checksum mismatch for dev.tgz",
    )
    assert (work / "orig" / "dev.tgz.bad").exists()
    assert not (work / "orig" / "dev.tgz").exists() and not (work / "orig" / "dev.tgz.part").exists()


def test_missing_archive(tmp_path, archives):
    d, sums = variant(tmp_path, archives, remove=("test-full.tgz",))
    work, dest = tmp_path / "w", tmp_path / "d"
    failed(script("prepare-wmt14en2de.sh", *prepare_args(d, sums, work, dest)), "archive not found", "test-full.tgz")
    assert_nothing_finished(work, dest)


def test_empty_archive(tmp_path, archives):
    d, sums = variant(tmp_path, archives, remove=("dev.tgz",))
    (d / "dev.tgz").write_bytes(b"")
    work, dest = tmp_path / "w", tmp_path / "d"
    failed(script("prepare-wmt14en2de.sh", *prepare_args(d, sums, work, dest)), "archive is empty", "dev.tgz")
    assert_nothing_finished(work, dest)


@pytest.mark.parametrize(
    "fault, message",
    [
        ({"unclosed_seg": True}, "newstest2014-deen-ref.de.sgm:4: malformed segment"),
        ({"extra_ref_seg": True}, "50 source segments"),
    ],
)
def test_bad_sgm(tmp_path, archives, fault, message):
    d, sums = variant(tmp_path, archives, replace=("test-full.tgz", fault))
    work, dest = tmp_path / "w", tmp_path / "d"
    failed(script("prepare-wmt14en2de.sh", *prepare_args(d, sums, work, dest)), message)
    assert_nothing_finished(work, dest)


def test_misaligned_corpus(tmp_path, archives):
    d, sums = variant(tmp_path, archives, replace=("training-parallel-europarl-v7.tgz", {"drop_de_lines": 1}))
    work, dest = tmp_path / "w", tmp_path / "d"
    failed(
        script("prepare-wmt14en2de.sh", *prepare_args(d, sums, work, dest)),
        "europarl-v7: 260 en lines but 259 de lines",
        "misaligned",
    )
    assert_nothing_finished(work, dest)


def test_truncated_archive(tmp_path, archives):
    """A cut-off download whose checksum is unknown gets past verification; extraction must catch it."""
    d, _ = variant(tmp_path, archives, remove=("training-parallel-commoncrawl.tgz",))
    full = (archives / "training-parallel-commoncrawl.tgz").read_bytes()
    (d / "training-parallel-commoncrawl.tgz").write_bytes(full[: len(full) * 2 // 3])
    sums = write_sums(d, {"training-parallel-commoncrawl.tgz": "-"})
    work, dest = tmp_path / "w", tmp_path / "d"
    failed(
        script("prepare-wmt14en2de.sh", *prepare_args(d, sums, work, dest)),
        "training-parallel-commoncrawl.tgz is truncated or corrupt",
        "step 'extract' did not finish",
    )
    assert_nothing_finished(work, dest)


def test_wmt17_variant_and_valid_from_train(tmp_path, archives):
    """--wmt17 reads News Commentary v12; --valid-from-train N holds out every N-th pair and needs no dev.tgz."""
    d, _ = variant(tmp_path, archives, remove=("dev.tgz", "training-parallel-nc-v9.tgz"))
    build_archive(d, "training-parallel-nc-v12.tgz")
    sums = d / "SHA256SUMS"
    sums.write_text("".join(f"{sha256(p)}  {p.name}\n" for p in sorted(d.glob("*.tgz"))))
    work = tmp_path / "w"
    ok(
        script(
            "prepare-wmt14en2de.sh",
            "--wmt17",
            "--valid-from-train",
            "10",
            "--archives",
            d,
            "--checksums",
            sums,
            "--workdir",
            work,
            "--dest",
            tmp_path / "d",
            "--download-only",
        )
    )
    assert sorted(p.name for p in (work / "orig").glob("*.tgz")) == sorted(
        [
            "training-parallel-europarl-v7.tgz",
            "training-parallel-commoncrawl.tgz",
            "training-parallel-nc-v12.tgz",
            "test-full.tgz",
        ]
    )
    out = tmp_path / "raw"
    out.mkdir()
    ok(
        run(
            [
                sys.executable,
                WMT / "extract.py",
                "--orig",
                work / "orig",
                "--out",
                out,
                "--nc-version",
                "12",
                "--holdout-every",
                "10",
            ]
        )
    )
    counts = json.loads((out / "counts.json").read_text())
    assert counts["train_corpora"]["news-commentary-v12"] == 70
    assert (counts["train"], counts["valid"], counts["test"]) == (387, 43, 50)
    valid = (out / "valid.en").read_bytes().decode().split("\n")
    train = (out / "train.en").read_bytes().decode().split("\n")
    pairs = sample_pairs()
    assert valid[0] == pairs[9][0] and pairs[9][0] not in train  # the 10th pair went to valid, not train


def test_prepare_rejects_bad_options(tmp_path):
    failed(script("prepare-wmt14en2de.sh", "--vocab-size", "lots"), "--vocab-size must be")
    failed(script("prepare-wmt14en2de.sh", "--frobnicate"), "unknown option: --frobnicate")
    failed(script("prepare-wmt14en2de.sh", "--archives", tmp_path / "nope"), "--archives directory not found")


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--vocab-size", "99999999999", "--vocab-size must be an integer from 100 to 1000000, got '99999999999'"),
        ("--vocab-size", "50", "--vocab-size must be an integer from 100 to 1000000"),
        ("--character-coverage", "0.5", "--character-coverage must be a number from 0.98 to 1, got '0.5'"),
        ("--character-coverage", "1.5", "--character-coverage must be a number from 0.98 to 1"),
        ("--character-coverage", "all", "--character-coverage must be a number from 0.98 to 1"),
        ("--ratio", "0.5", "--ratio must be a number >= 1"),
    ],
)
def test_subword_options_are_checked_before_any_work(tmp_path, archives, option, value, message):
    """Once checked by sentencepiece after extraction and tokenization (hours on the real corpus), a huge vocabulary
    with a traceback: now refused at once, with the flag and its range, before the work directory exists."""
    args = prepare_args(archives, archives / "SHA256SUMS", tmp_path / "w", tmp_path / "d")
    args[args.index("--vocab-size") : args.index("--vocab-size") + 2] = []
    proc = failed(script("prepare-wmt14en2de.sh", *args, option, value), message)
    assert "prepare-wmt14en2de.sh: error: " + message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "w").exists()


def test_subword_script_checks_its_ranges_too(tmp_path):
    for option, value in (("--vocab-size", "99999999999"), ("--character-coverage", "0.5")):
        other = {"--vocab-size": ["--vocab-size", "300"], "--character-coverage": []}
        proc = run(
            [
                sys.executable,
                WMT / "subword.py",
                "train",
                "--model-prefix",
                tmp_path / "m",
                option,
                value,
                *[a for k, v in other.items() if k != option for a in v],
                tmp_path / "in.txt",
            ]
        )
        assert proc.returncode == 2 and f"error: argument {option}: must be" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


def test_python_helpers_report_a_missing_input_in_one_line(tmp_path):
    proc = run(
        [
            sys.executable,
            WMT / "subword.py",
            "filter",
            tmp_path / "none.en",
            tmp_path / "none.de",
            tmp_path / "a",
            tmp_path / "b",
        ]
    )
    failed(proc, "subword.py: error: ", "none.en")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_archive_changed_after_verification_is_refused(tmp_path, archives):
    """--archives links the verified archive into the work directory; a file replaced afterwards must not be read
    unverified (while prepare.json would record the old checksum)."""
    d, sums = variant(tmp_path, archives, replace=("dev.tgz", {}))  # a real file here, not a link to `archives`
    work, dest = tmp_path / "w", tmp_path / "d"
    ok(script("prepare-wmt14en2de.sh", *prepare_args(d, sums, work, dest), "--download-only"))
    verified = sha256(d / "dev.tgz")
    assert (work / "orig" / "dev.tgz.sha256").read_text().split()[0] == verified
    en, de = [p[0] for p in sample_pairs()], [p[1] for p in sample_pairs()]
    _tgz(
        d / "dev.tgz",
        [
            ("dev/newstest2013.de", _text(["ein anderer Satz"] + de[431:470])),
            ("dev/newstest2013.en", _text(en[430:470])),
        ],
    )  # still a valid archive, other content
    proc = failed(
        script("prepare-wmt14en2de.sh", *prepare_args(d, sums, work, dest)),
        "dev.tgz",
        "changed after it was verified",
        f"verified {verified}",
        sha256(d / "dev.tgz"),
    )
    assert "step 'extract' did not finish" in proc.stderr
    assert_nothing_finished(work, dest)


def test_sgm_parser_units():
    extract = load("extract")
    segs = extract.parse_sgm(['<doc docid="a">', '<seg id="1"> two  spaces\there </seg>', "</doc>"], "x.sgm")
    assert segs == [(("a", "1"), "two spaces here")]
    for lines, msg in [
        (['<seg id="1">outside</seg>'], "outside of a <doc>"),
        (['<doc docid="a">', '<seg id="1">a</seg>', '<seg id="1">b</seg>'], "duplicate segment id 1"),
        (['<doc docid="a">', "<seg>no id</seg>"], "without an id"),
        (['<doc docid="a">', '<seg id="1">a</seg><seg id="2">b</seg>'], "malformed segment"),
        (["<srcset>", "</srcset>"], "no <seg> lines"),
    ]:
        with pytest.raises(Exception, match=re.escape(msg)):
            extract.parse_sgm(lines, "x.sgm")


def test_length_ratio_filter_units():
    keep = load("subword").keep_pair
    assert keep(10, 14, 1, 250, 1.5) and not keep(10, 16, 1, 250, 1.5)
    assert not keep(0, 0, 1, 250, 1.5) and not keep(251, 250, 1, 250, 1.5) and keep(250, 250, 1, 250, 1.5)


# ---------------------------------------------------------------------------------------------- configs

# The hydra configs, scripts/train.sh and the flag-by-flag check against the former flag files:
# tests/test_hydra_configs.py.


# ---------------------------------------------------------------------------------------------- train + evaluate


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    """A tiny MoEC model trained for 2 bf16 updates on the CPU through scripts/train.sh and a real experiment
    config (fairseq-hydra-train), with hydra overrides."""
    ckpt = tmp_path_factory.mktemp("ckpt")
    ok(
        script(
            "train.sh",
            "moec16_base",
            f"task.data={prepared.dest}",
            "common.cpu=true",
            "model._name=moec_transformer_tiny",
            "model.moe_encoder_layers='1'",
            "model.moe_decoder_layers='1'",
            "model.moe_expert_count=4",
            "model.moe_clusters=2",
            "optimization.max_update=2",
            "dataset.max_tokens=1000",
            "optimization.update_freq=[1]",
            "checkpoint.save_interval_updates=1",
            f"checkpoint.save_dir={ckpt}",
            "dataset.num_workers=0",
            "common.log_format=none",
        )
    )
    assert (ckpt / "checkpoint_1_2.pt").exists()
    assert "fairseq-hydra-train --config-dir" in (ckpt / "train_commands.log").read_text()
    return ckpt


@pytest.mark.slow
def test_evaluate_prints_both_bleus_and_writes_results(prepared, trained):
    proc = ok(
        script(
            "evaluate.sh",
            "--checkpoint-dir",
            trained,
            "--data",
            prepared.dest,
            "--avg",
            "2",
            "--beam",
            "2",
            "--",
            "--cpu",
            "--max-len-b",
            "8",
        )
    )
    assert re.search(r"BLEU \(sacrebleu, detokenized\): +\d+\.\d\d +nrefs:1\|case:mixed\|eff:no\|tok:13a", proc.stdout)
    assert re.search(r"BLEU \(tokenized, compound split\): +\d+\.\d\d", proc.stdout)
    out = trained / "eval-test"
    res = json.loads((out / "results.json").read_text())
    assert res["sentences"] == 50 and res["checkpoints_averaged"] == "2 (updates)"
    assert "--required-batch-size-multiple 1" in res["generate_command"] and "--lenpen 0.6" in res["generate_command"]
    assert res["sacrebleu"]["signature"].startswith("nrefs:1|case:mixed")
    assert isinstance(res["tokenized_bleu_compound_split"]["score"], float)
    assert len((out / "hyps.detok.txt").read_text(encoding="utf-8").split("\n")) == 51
    assert "BLEU (tokenized, compound split)" in (out / "results.txt").read_text()
    assert not list(out.glob("*.incomplete")) and not list(out.glob(".*.tmp"))


@pytest.mark.slow
def test_average_merges_expert_parallel_shards(tmp_path, trained):
    """Checkpoints of an expert-parallel run keep other processes' experts in NAME-expert-rank{r}.pt: the
    average must merge them first and equal the average of the unsharded checkpoints."""
    import torch

    from fairseq_moec import sharded_checkpoint as sc

    avg = load("average_checkpoints")
    avg.allow_fairseq_checkpoint_globals()
    full_paths, sharded_paths = [], []
    for name in ("checkpoint_1_1.pt", "checkpoint_1_2.pt"):
        full = torch.load(trained / name, map_location="cpu")
        keys = [k for k, v in full["model"].items() if ".experts." in k and v.shape[0] == 4]
        assert keys
        main, shard = sc.split(full, {"expert_keys": keys, "optimizer_param_names": []}, 2, token=name)
        torch.save(main, tmp_path / name)
        torch.save(shard, sc.shard_path(str(tmp_path / name), 1))
        full_paths.append(trained / name)
        sharded_paths.append(tmp_path / name)
    merged, reference = avg.average(sharded_paths), avg.average(full_paths)
    assert merged["model"].keys() == reference["model"].keys()
    for k, v in reference["model"].items():
        assert torch.equal(merged["model"][k], v), k
    os.remove(sc.shard_path(str(tmp_path / "checkpoint_1_2.pt"), 1))
    with pytest.raises(Exception, match="experts of process 1"):
        avg.average(sharded_paths)


def test_score_refuses_a_partial_translation(tmp_path, prepared):
    gen = tmp_path / "generate-test.txt"
    gen.write_text("".join(f"S-{i}\tx\nH-{i}\t-1.0\t▁Y ▁la\n" for i in range(50) if i != 7))
    proc = run(
        [
            sys.executable,
            WMT / "score.py",
            "--generate",
            gen,
            "--ref",
            prepared.dest / "test.raw.de",
            "--spm",
            prepared.dest / "spm.model",
            "--out-dir",
            tmp_path / "out",
        ]
    )
    failed(proc, "49 hypotheses for 50 reference lines", "missing ids: [7]")
    assert not (tmp_path / "out" / "results.json").exists()
    empty = tmp_path / "empty.de"
    empty.write_text("")
    failed(
        run(
            [
                sys.executable,
                WMT / "score.py",
                "--generate",
                gen,
                "--ref",
                empty,
                "--spm",
                prepared.dest / "spm.model",
                "--out-dir",
                tmp_path / "out",
            ]
        ),
        "reference is empty",
    )


def test_compound_split_tokenization():
    score = load("score")
    assert score.compound_split_tokens(["Das rich-text Format, 3-4 mal."], "de") == [
        "Das rich ##AT##-##AT## text Format , 3 ##AT##-##AT## 4 mal ."
    ]


def test_average_checkpoints_errors(tmp_path):
    avg = [sys.executable, WMT / "average_checkpoints.py"]
    failed(run(avg + ["--dir", tmp_path / "none", "--output", tmp_path / "a.pt"]), "checkpoint directory not found")
    failed(run(avg + ["--dir", tmp_path, "--output", tmp_path / "a.pt"]), "no checkpoint_<epoch>_<updates>.pt files")
    (tmp_path / "checkpoint_1_5.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="checkpoint_1_5.pt: not a checkpoint"):  # in-process: no second torch start-up
        load("average_checkpoints").average([tmp_path / "checkpoint_1_5.pt"])


@pytest.mark.parametrize(
    "option, value",
    [("--beam", "five"), ("--batch-size", "0"), ("--max-tokens", "-3"), ("--avg", "2.5"), ("--lenpen", "high")],
)
def test_evaluate_checks_numbers_first(tmp_path, option, value):
    proc = failed(
        script("evaluate.sh", "--checkpoint-dir", tmp_path, "--data", tmp_path, option, value),
        f"evaluate.sh: error: {option} must be",
    )
    assert f"got '{value}'" in proc.stderr


def test_evaluate_bad_input(tmp_path, prepared):
    failed(script("evaluate.sh", "--data", prepared.dest), "nothing to evaluate")
    failed(
        script("evaluate.sh", "--checkpoint-dir", tmp_path / "none", "--data", prepared.dest),
        "checkpoint directory not found",
    )
    failed(
        script("evaluate.sh", "--checkpoint-dir", tmp_path, "--data", tmp_path / "nodata"), "data directory not found"
    )
    failed(script("evaluate.sh", "--config", "nope"), "config not found")


# ---------------------------------------------------------------------------------------------- results table


def test_reproduce_table_marks_missing_runs_not_run(tmp_path):
    done = tmp_path / "checkpoints" / "wmt14_en_de" / "moec64_big" / "eval-test"
    done.mkdir(parents=True)
    (done / "results.json").write_text(
        json.dumps(
            {
                "sacrebleu": {
                    "score": 28.41,
                    "signature": "nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0",
                },
                "tokenized_bleu_compound_split": {"score": 29.5},
                "generate_command": "fairseq-generate data-bin/x ...",
            }
        )
    )
    ok(script("reproduce_table.sh", "--sizes", "big", cwd=tmp_path))
    table = (tmp_path / "checkpoints" / "wmt14_en_de" / "results.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 7
    moec64 = [r for r in rows if "[moec64_big]" in r]
    assert moec64 and "| 28.41 | 29.50 |" in moec64[0]
    others = [r for r in rows if r not in moec64]
    assert all("| not run | not run |" in r for r in others)
    assert "bash scripts/train.sh dense_big" in table and "optimization.update_freq=[16]" in table
    assert "bash scripts/evaluate.sh --config moe32_big" in table
    assert "fairseq-generate data-bin/x ..." in table
    dry = ok(script("reproduce_table.sh", "--run", "--dry-run", "--sizes", "big", "--experts", "16", cwd=tmp_path))
    assert dry.stdout.count("train.sh") == 3 and dry.stdout.count("evaluate.sh") == 3
