#!/usr/bin/env python3
"""Limited-data study v2 (docs/study.md): dense vs MoE vs MoEC on a subset of the bundled Bible es-en corpus,
at a scale where the models translate. Equal updates for every run; one training process at a time.

    python scripts/study.py                        # everything not finished yet, in plan order, then the report
    python scripts/study.py --only dense-s1,moe32-s1   # some runs (names as in `--list`)
    python scripts/study.py --list                 # the plan and the state of every run
    python scripts/study.py --report-only          # rewrite results.md/json and the plots from what is on disk

The same command again continues where it stopped: the data step and every run write their outputs under
temporary names and a stamp last; an interrupted training resumes from checkpoint_last.pt. Runs use the CPU,
or CUDA when it is available (`--device`).

Per run (OUT/runs/NAME): train.log (fairseq json log), checkpoints/checkpoint_{best,last}.pt, the test
translations of the best-valid checkpoint (hyp.txt, every one of the 966 lines, sacrebleu BLEU/chrF in
score.json), the routing of the last checkpoint over training sentences (routing/summary.json), the loss of the
last checkpoint on the training data in eval mode (train_eval.json: fairseq-validate, no dropout, all experts; the
report's gap), DONE (json). A finished run without train_eval.json gets it when the driver runs again.
An evaluation-only entry (moec32-s1-keepmask) translates with the training-time cluster-dropout mask kept.
"""

import argparse
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import study_report

from fairseq_moec.pipeline import binarize, files, hypotheses, scores, small_model
from fairseq_moec.pipeline.binarize import cli
from fairseq_moec.pipeline.logs import json_records

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "fairseq_moec"
SRC, TGT = "es", "en"
# (task, criterion) of the dense and of the MoE / MoEC runs: training and every evaluation use the same
DENSE_TASK = ("translation", "label_smoothed_cross_entropy")
MOE_TASK = ("translation_moec", "moec_label_smoothed_cross_entropy")


@dataclasses.dataclass(frozen=True)
class Run:
    """One training run (or, with ``evaluate_of``, an evaluation of another run's checkpoint)."""

    name: str
    group: str  # runs of one group differ only in the seed
    experts: int = 0  # 0 = dense
    clusters: int = 1
    cluster_dropout: float = 0.0
    cluster_args: tuple = ()  # cluster-loss flags beyond the defaults
    seed: int = 1
    evaluate_of: str = ""
    inference_experts: str = "all"


def plan(seeds=(1, 2)):
    """The study: main runs for every seed, then the E=32 ablations (first seed only). MoE runs turn every
    cluster feature off; MoEC runs use the defaults (cluster weight 0.01 on the relative scale) with clusters of
    the paper's size (8) where E allows and at least 2 clusters, and cluster dropout 0.5 as the paper."""
    no_clusters = ("--moe-cluster-weight", "0")
    runs = []
    for seed in seeds:
        runs.append(Run(f"dense-s{seed}", "dense", seed=seed))
        for e in (32, 8):
            g = max(2, e // 8)
            runs.append(Run(f"moe{e}-s{seed}", f"moe{e}", e, 1, 0.0, no_clusters, seed))
            runs.append(Run(f"moec{e}-s{seed}", f"moec{e}", e, g, 0.5, (), seed))
        if seed == seeds[0]:
            s = seeds[0]
            runs += [
                Run(f"moec32-lossonly-s{s}", "moec32-lossonly", 32, 4, 0.0, (), s),
                Run(f"moec32-droponly-s{s}", "moec32-droponly", 32, 4, 0.5, no_clusters, s),
                Run(
                    f"moec32-official-s{s}",
                    "moec32-official",
                    32,
                    4,
                    0.5,
                    ("--moe-cluster-loss-norm", "official", "--moe-cluster-weight", "0.01"),
                    s,
                ),
                Run(
                    f"moec32-s{s}-keepmask",
                    "moec32-keepmask",
                    32,
                    4,
                    0.5,
                    (),
                    s,
                    evaluate_of=f"moec32-s{s}",
                    inference_experts="training-mask",
                ),
            ]
    return runs


# --- commands ----------------------------------------------------------------------------------------------------
def log(msg):
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def sh(cmd, **kw):
    log("$ " + " ".join(str(c) for c in cmd))
    # glibc: keep freed gradient buffers in the heap instead of page-faulting them in again every step
    env = dict(os.environ, MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_="68719476736")
    subprocess.run([str(c) for c in cmd], check=True, env=env, **kw)


def flag_list(pairs):
    """['--name', 'value', ...] from (name, value) pairs, in order; value None: a switch without a value."""
    return [str(x) for name, value in pairs for x in ((f"--{name}",) if value is None else (f"--{name}", value))]


def train_cmd(args, run, data_bin, rdir):
    cmd = [cli("fairseq-train"), data_bin] + flag_list(
        [("user-dir", PLUGIN), ("source-lang", SRC), ("target-lang", TGT)]
    )
    cmd += small_model.size_args()
    cmd += flag_list(
        [("dropout", args.dropout), ("label-smoothing", "0.1"), ("optimizer", "torch_adam")]
        + [("adam-betas", "(0.9, 0.98)"), ("lr", args.lr), ("lr-scheduler", "inverse_sqrt")]
        + [("warmup-updates", args.warmup), ("warmup-init-lr", "1e-07"), ("max-tokens", args.max_tokens)]
        + [("max-update", args.updates), ("seed", run.seed), ("num-workers", "0")]
        + [("validate-interval-updates", args.valid_interval), ("validate-interval", "100000")]
        + [("save-interval-updates", args.valid_interval), ("save-interval", "100000")]
        + [("keep-interval-updates", "1"), ("no-epoch-checkpoints", None), ("best-checkpoint-metric", "loss")]
        + [("save-dir", rdir / "checkpoints"), ("log-format", "json"), ("log-interval", "25")]
        + [("log-file", rdir / "train.log"), ("no-progress-bar", None)]
        + ([("cpu", None)] if args.device == "cpu" else [])
    )
    if not run.experts:
        dense = [("task", DENSE_TASK[0]), ("arch", "transformer"), ("criterion", DENSE_TASK[1])]
        return cmd + flag_list(dense)
    moe = [("task", MOE_TASK[0]), ("arch", "moec_transformer")]
    moe += [("criterion", MOE_TASK[1]), ("moe-encoder-layers", "1")]
    moe += [("moe-decoder-layers", "1"), ("moe-expert-count", run.experts), ("moe-clusters", run.clusters)]
    moe += [("cluster-dropout", run.cluster_dropout), ("cluster-dropout-interval", args.dropout_interval)]
    moe += [("moe-seed", run.seed)]  # the seeds differ in their cluster-dropout masks too
    return cmd + flag_list(moe) + list(run.cluster_args)


# --- data --------------------------------------------------------------------------------------------------------
def prepare_data(args):
    """OUT/data: a seeded random training subset (kept in corpus order), all valid and test lines, a joint
    sentencepiece model trained on the subset only, fairseq-preprocess --joined-dictionary. Stamp: data/DONE."""
    d = Path(args.out) / "data"
    key = {"train_pairs": args.train_pairs, "subset_seed": args.subset_seed, "vocab": args.vocab}
    if files.stamp_matches(d / "DONE", key):
        return d
    tmp = Path(args.out) / "data.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "raw").mkdir(parents=True)
    counts = {}
    for split in binarize.SPLITS:
        src, tgt = (files.read_lines(files.BUNDLED_CORPUS / f"{split}.{lang}") for lang in (SRC, TGT))
        keep = range(len(src))
        if split == "train":
            keep = sorted(random.Random(args.subset_seed).sample(keep, args.train_pairs))
        counts[split] = len(keep)
        for lang, lines in ((SRC, src), (TGT, tgt)):
            (tmp / "raw" / f"{split}.{lang}").write_text("".join(lines[i] + "\n" for i in keep), encoding="utf-8")
    binarize.encode_and_binarize(tmp, SRC, TGT, args.vocab, runner=lambda cmd: sh(cmd, stdout=subprocess.DEVNULL))
    files.write_stamp(tmp / "DONE", key, counts=counts)
    shutil.rmtree(d, ignore_errors=True)
    os.replace(tmp, d)
    log(f"data ready: {counts}")
    return d


# --- one run -----------------------------------------------------------------------------------------------------
def do_run(args, run, data):
    rdir = Path(args.out) / "runs" / run.name
    if (rdir / "DONE").exists():
        if not run.evaluate_of:  # a run finished before train_eval.json existed gets it now
            train_eval(args, run, data, rdir)
        return
    if run.evaluate_of:
        src = Path(args.out) / "runs" / run.evaluate_of
        if not (src / "DONE").exists():
            log(f"{run.name}: waits for {run.evaluate_of}")
            return
        rdir.mkdir(parents=True, exist_ok=True)
        record_code_state(rdir)
        score = evaluate(args, run, data, src / "checkpoints" / "checkpoint_best.pt", rdir)
        files.write_json_atomic(rdir / "DONE", {"run": dataclasses.asdict(run), "score": score, "finished": now()})
        return
    rdir.mkdir(parents=True, exist_ok=True)
    cmd = [str(c) for c in train_cmd(args, run, data / "bin", rdir)]
    saved = rdir / "command.json"
    if saved.exists() and settings_of(json.loads(saved.read_text())) != settings_of(cmd):
        raise SystemExit(f"{rdir} holds a run with other settings ({saved}); remove it or use another --out")
    files.write_json_atomic(saved, cmd)
    record_code_state(rdir)
    t0 = time.time()
    sh(cmd)
    train_s = time.time() - t0
    ckpts = rdir / "checkpoints"
    for p in ckpts.glob("checkpoint_*_*.pt"):
        p.unlink()  # interval copies: best and last are kept
    score = evaluate(args, run, data, ckpts / "checkpoint_best.pt", rdir)
    routing = None
    if run.experts:  # expert shares of the final model over training sentences: sparse allocation
        out = rdir / "routing"
        if not (out / "summary.json").exists():
            analyze = [sys.executable, "-m", "fairseq_moec.analyze", ckpts / "checkpoint_last.pt", data / "bin"]
            analyze += flag_list([("split", "train"), ("max-sentences", "2000"), ("out", out), ("no-progress", None)])
            sh(analyze + (["--cpu"] if args.device == "cpu" else []), stdout=subprocess.DEVNULL)
        routing = study_report.allocation(json.loads((out / "summary.json").read_text()))
    train_eval(args, run, data, rdir)
    done = {"run": dataclasses.asdict(run), "score": score, "routing": routing, "finished": now()}
    files.write_json_atomic(rdir / "DONE", dict(done, train_wall_s_last_session=round(train_s)))
    log(f"{run.name}: BLEU {score['bleu']} chrF {score['chrf']}")


def settings_of(cmd):
    """A training command without the places it ran from: its checkout (--user-dir's parent) and work directory
    (--save-dir is OUT/runs/NAME/checkpoints) read as placeholders, so that a run resumes from another clone or a
    moved work directory, while any other change of the command is refused."""
    places = {}
    for flag, placeholder, parent in (("--user-dir", "{checkout}", 0), ("--save-dir", "{out}", 2)):
        if flag in cmd[:-1]:
            places[str(Path(cmd[cmd.index(flag) + 1]).parents[parent])] = placeholder
    for where in sorted(places, key=len, reverse=True):  # the longer first: a work dir inside the checkout
        cmd = [c.replace(where, places[where]) for c in cmd]
    return cmd


def record_code_state(rdir):
    """Append the code state of this session to rdir/code_state.jsonl: what code each session trained or
    evaluated with."""
    with open(rdir / "code_state.jsonl", "a") as f:
        f.write(json.dumps(study_report.code_state(ROOT)) + "\n")


def evaluate(args, run, data, ckpt, rdir):
    """Translate every test line with CKPT (beam 4), check one hypothesis per line, decode, sacrebleu."""
    if (rdir / "score.json").exists():
        return json.loads((rdir / "score.json").read_text())
    gen = rdir / "generate.txt"
    cmd = [cli("fairseq-generate"), data / "bin"] + flag_list(
        [("user-dir", PLUGIN), ("source-lang", SRC), ("target-lang", TGT), ("gen-subset", "test"), ("path", ckpt)]
        + [("beam", "4"), ("batch-size", "128"), ("required-batch-size-multiple", "1"), ("max-len-a", "1.5")]
        + [("max-len-b", "10"), ("num-workers", "0")]
        + ([("task", MOE_TASK[0]), ("inference-experts", run.inference_experts)] if run.experts else [])
        + ([] if run.experts else [("task", DENSE_TASK[0])])
        + ([("cpu", None)] if args.device == "cpu" else [])
    )
    with open(f"{gen}.tmp", "w", encoding="utf-8") as f:
        sh(cmd, stdout=f)
    os.replace(f"{gen}.tmp", gen)
    ref = data / "raw" / f"test.{TGT}"
    n = len(files.read_lines(ref))
    hypotheses.collect(gen, data / "spm" / "spm.model", n, rdir / "hyp.txt")
    return scores.score_files(
        rdir / "hyp.txt",
        ref,
        rdir / "score.txt",
        rdir / "score.json",
        meta={"checkpoint": str(ckpt.name)},
        tgt_lang=TGT,
    )[0]


TRAIN_EVAL_SUBSET = "train"


def train_eval(args, run, data, rdir):
    """rdir/train_eval.json: the loss of the last checkpoint on the training data in eval mode (no dropout, all
    experts, no cluster dropout), with the criterion of the valid loss: what the report's gap subtracts from the
    final valid loss. fairseq-validate's output is kept in train_eval.log. Skipped when the json exists."""
    out = rdir / "train_eval.json"
    if out.exists():
        return json.loads(out.read_text())
    ckpt = rdir / "checkpoints" / "checkpoint_last.pt"
    if not ckpt.exists():
        log(f"{run.name}: no train_eval.json, and it cannot be computed: {ckpt} is gone")
        return None
    task, criterion = MOE_TASK if run.experts else DENSE_TASK
    # the model, its criterion options (label smoothing) and the data options come from the checkpoint's config;
    # --skip-invalid-size-inputs-valid-test drops what fairseq-train's iterator dropped from the same subset
    cmd = [cli("fairseq-validate"), data / "bin"] + flag_list(
        [("user-dir", PLUGIN), ("task", task), ("criterion", criterion), ("source-lang", SRC), ("target-lang", TGT)]
        + [("path", ckpt), ("valid-subset", TRAIN_EVAL_SUBSET), ("max-tokens", "6000"), ("num-workers", "0")]
        + [("skip-invalid-size-inputs-valid-test", None), ("log-format", "json"), ("no-progress-bar", None)]
        + ([("inference-experts", "all")] if run.experts else [])
        + ([("cpu", None)] if args.device == "cpu" else [])
    )
    t0 = time.time()
    with files.atomic_path(rdir / "train_eval.log") as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            sh(cmd, stdout=f)
    stats = validate_stats(rdir / "train_eval.log", TRAIN_EVAL_SUBSET)
    result = dict(stats, checkpoint=ckpt.name, wall_s=round(time.time() - t0, 1), finished=now())
    result["code_state"] = study_report.code_state(ROOT)
    files.write_json_atomic(out, result)
    log(f"{run.name}: loss on {TRAIN_EVAL_SUBSET} in eval mode {stats['loss']:.3f}")
    return result


def validate_stats(path, subset):
    """The end-of-subset record of a fairseq-validate --log-format json output PATH: loss and nll_loss (bits per
    target token), sentences and target tokens. fairseq prefixes its keys with the subset; it reduces all batches
    at once, so its per-batch averages wpb and bsz are here the totals of the subset."""
    recs = [r for r in json_records(path) if f"{subset}_loss" in r]
    if not recs:
        raise SystemExit(f"{path}: no '{subset}_loss' record of fairseq-validate (--log-format json) in it")
    r = recs[-1]
    return {
        "subset": subset,
        "loss": float(r[f"{subset}_loss"]),
        "nll_loss": float(r[f"{subset}_nll_loss"]),
        "sentences": int(float(r[f"{subset}_bsz"])),
        "target_tokens": int(float(r[f"{subset}_wpb"])),
        "unit": "bits per target token (the valid loss's criterion, label-smoothed)",
        "fairseq": r,
    }


def now():
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "work" / "study_v2"))
    p.add_argument("--only", default="", help="comma-separated run names (default: the whole plan)")
    p.add_argument("--seeds", default="1,2")
    p.add_argument("--train-pairs", type=int, default=8000, help="random training subset of the 28,091 pairs")
    p.add_argument("--subset-seed", type=int, default=1)
    p.add_argument("--vocab", type=int, default=4000, help="joint sentencepiece vocabulary, trained on the subset")
    p.add_argument("--updates", type=int, default=1200, help="optimizer updates of every run")
    p.add_argument("--valid-interval", type=int, default=100, help="validate and save every this many updates")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--max-tokens", type=int, default=6000)
    p.add_argument("--dropout-interval", type=int, default=50, help="--cluster-dropout-interval of MoEC runs")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    p.add_argument("--list", action="store_true", help="print the plan and each run's state, then stop")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--export", default="", help="also copy the finished runs' small outputs here (docs/study-v2)")
    p.add_argument("--plot-dir", default=str(ROOT / "docs" / "img"))
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.seeds = tuple(int(s) for s in args.seeds.split(","))
    names = {r.name for r in plan(args.seeds)}
    args.only = [o for o in args.only.split(",") if o]
    unknown = sorted(set(args.only) - names)
    if unknown:
        p.error(f"--only: unknown run(s) {', '.join(unknown)}; the plan has: {', '.join(sorted(names))}")
    return args


def main(argv=None):
    args = parse_args(argv)
    runs = [r for r in plan(args.seeds) if not args.only or r.name in args.only]
    if args.list:
        for r in runs:
            state = study_report.state(Path(args.out) / "runs" / r.name, args.updates, not r.evaluate_of)
            print(f"{r.name:24s} {state}")
        return 0
    if not args.report_only:
        data = prepare_data(args)
        for run in runs:
            do_run(args, run, data)
    study_report.write(Path(args.out), plan(args.seeds), args.updates, Path(args.plot_dir))
    if args.export:
        copied = study_report.export(Path(args.out), plan(args.seeds), Path(args.export))
        log(f"exported {len(copied)} files to {args.export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
