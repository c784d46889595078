"""Raw parallel text -> joint sentencepiece model -> encoded text -> fairseq-preprocess --joined-dictionary.

Layout under OUT (the study, the end-to-end benchmark and the test fixtures share it; the demo keeps its own
step directories): raw/{split}.{lang} (the caller's, unless it names another directory), spm/spm.model,
tok/{split}.{lang}, bin/ (fairseq's).
"""

import shutil
import subprocess
import sys
from pathlib import Path

from . import subwords

SPLITS = ("train", "valid", "test")


def cli(name):
    """A fairseq command of this interpreter's environment, else the one on PATH."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else (shutil.which(name) or name)


def preprocess_cmd(tok_prefix_dir, dest, src, tgt, workers=2, splits=SPLITS):
    """fairseq-preprocess of TOK_PREFIX_DIR/{split}.{src,tgt} into DEST with one dictionary for both sides."""
    cmd = [cli("fairseq-preprocess"), "--source-lang", src, "--target-lang", tgt, "--joined-dictionary"]
    for split in splits:
        cmd += [f"--{split}pref", Path(tok_prefix_dir) / split]
    return cmd + ["--destdir", dest, "--workers", str(workers)]


def run(cmd, **kw):
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def encode_and_binarize(out, src, tgt, vocab, threads=None, workers=2, runner=run, spm_options=None, raw=None):
    """RAW/{split}.{src,tgt} (default RAW: OUT/raw) -> OUT/spm/spm.model (joint, trained on the two train files)
    -> OUT/tok -> OUT/bin. THREADS, SPM_OPTIONS: see subwords.train_sentencepiece. RUNNER(cmd): runs
    fairseq-preprocess (the caller's logging and environment). Returns OUT/bin."""
    out = Path(out)
    raw = Path(raw) if raw else out / "raw"
    (out / "spm").mkdir(parents=True, exist_ok=True)
    (out / "tok").mkdir(exist_ok=True)
    subwords.train_sentencepiece(
        [raw / f"train.{lang}" for lang in (src, tgt)],
        out / "spm" / "spm",
        vocab,
        threads=threads,
        **(spm_options or {}),
    )
    sp = subwords.load(out / "spm" / "spm.model")
    for split in SPLITS:
        for lang in (src, tgt):
            subwords.encode_file(sp, raw / f"{split}.{lang}", out / "tok" / f"{split}.{lang}")
    runner(preprocess_cmd(out / "tok", out / "bin", src, tgt, workers))
    return out / "bin"
