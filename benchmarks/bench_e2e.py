#!/usr/bin/env python
"""End-to-end speed: fairseq-train words/s and fairseq-generate sentences/s, MoEC (64 experts) vs the dense
Transformer of the same active size, on the same binarized data, in one run.

    python benchmarks/bench_e2e.py                                  # builds data from the bundled corpus
    python benchmarks/bench_e2e.py --data-bin data-bin/my_pair --source-lang de --target-lang en
    python benchmarks/bench_e2e.py --raw-dir DIR                     # {train,valid,test}.{src,tgt}[.xz]
    python benchmarks/bench_e2e.py --quick                          # smoke run (tiny model, few updates)

Models (both: the small Transformer of fairseq_moec.pipeline.small_model, i.e. --share-all-embeddings, d 256,
FFN 1024, 3+3 layers, 4 heads; dropout 0.1, Adam (torch_adam: fused), inverse_sqrt):
  dense  fairseq's own `transformer`, task `translation`, criterion `label_smoothed_cross_entropy`
  moec   `moec_transformer` with encoder and decoder layer 1 MoE: 64 experts (one FFN each: the same active
         size per token as dense), top-1, 8 clusters of 8, cluster dropout 0.5, balance + cluster losses
Training: both models are trained in --chunks alternating slices (dense, moec, dense, moec, ...), each slice a
fairseq-train that resumes from checkpoint_last.pt, so that a slow spell of a shared machine hits both. The
figure is the median of fairseq's own `wps` over the json log records (--log-format json), leaving out the
first record of every slice (start-up). Generation: fairseq-generate on the test split (--gen-sentences lines
when this script builds the data), beam --beam, --batch-size --gen-batch, --required-batch-size-multiple 1,
every hypothesis forced to --gen-len tokens (--min-len = --max-len-b = L, --max-len-a 0) so that both models
do the same decoding work whatever they learnt in a few updates; the figure is the "sentences/s" of
fairseq-generate's "Translated N sentences ..." line, median over --gen-reps alternating runs; the hypothesis
count is checked against the number of test lines.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path

from fairseq_moec.pipeline import binarize, files, hypotheses, logs, machine, small_model
from fairseq_moec.pipeline.binarize import cli

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PLUGIN = ROOT / "fairseq_moec"


def log(msg):
    print(f"[e2e {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def env(args):
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads), PYTHONUNBUFFERED="1")
    return e


def sh(cmd, args, log_path=None):
    cmd = [str(c) for c in cmd]
    log("$ " + " ".join(cmd))
    t0 = time.time()
    if log_path:
        with open(log_path, "a", encoding="utf-8") as fh:
            r = subprocess.run(cmd, env=env(args), stdout=fh, stderr=subprocess.STDOUT)
    else:
        r = subprocess.run(cmd, env=env(args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode:
        tail = Path(log_path).read_text(errors="replace")[-3000:] if log_path else (r.stderr or "")[-3000:]
        raise SystemExit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{tail}")
    return time.time() - t0


# --------------------------------------------------------------------------------------------------- data
def build_data(args):
    """raw parallel text -> joint sentencepiece unigram model -> fairseq-preprocess --joined-dictionary.
    Test split: the first --gen-sentences lines. Skipped when the stamp matches."""
    raw = Path(args.raw_dir)
    src, tgt = args.source_lang, args.target_lang
    out = Path(args.work) / "data"
    key = {
        "raw": str(raw.resolve()),
        "vocab": args.vocab,
        "train_pairs": args.train_pairs,
        "gen_sentences": args.gen_sentences,
        "src": src,
        "tgt": tgt,
    }
    if files.stamp_matches(out / "DONE", key):
        log(f"data: {out / 'bin'} is up to date")
        return out / "bin"
    shutil.rmtree(out, ignore_errors=True)
    (out / "raw").mkdir(parents=True)
    limits = {"train": args.train_pairs, "test": args.gen_sentences}
    for split in binarize.SPLITS:
        a, b = files.read_lines(raw / f"{split}.{src}"), files.read_lines(raw / f"{split}.{tgt}")
        if len(a) != len(b):
            raise SystemExit(f"{raw}: {split}.{src} has {len(a)} lines, {split}.{tgt} {len(b)}")
        n = limits.get(split) or len(a)
        for lang, lines in ((src, a[:n]), (tgt, b[:n])):
            (out / "raw" / f"{split}.{lang}").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    log(f"data: joint {args.vocab}-piece unigram sentencepiece model, encoding, fairseq-preprocess")
    binarize.encode_and_binarize(
        out, src, tgt, args.vocab, threads=args.threads, workers=args.threads, runner=lambda cmd: sh(cmd, args)
    )
    files.write_stamp(out / "DONE", key)
    return out / "bin"


# --------------------------------------------------------------------------------------------------- models
def model_args(args, kind):
    common = small_model.size_args(args.layers, args.dim, args.ffn, args.heads) + ["--dropout", "0.1"]
    if kind == "dense":
        # --user-dir for what the plugin fixes globally (checkpoints that load under torch >= 2.6)
        return ["--user-dir", PLUGIN, "--task", "translation", "--arch", "transformer"] + common
    E, G = args.experts, args.clusters
    return [
        "--user-dir",
        PLUGIN,
        "--task",
        "translation_moec",
        "--arch",
        "moec_transformer",
        "--moe-encoder-layers",
        args.moe_layers,
        "--moe-decoder-layers",
        args.moe_layers,
        "--moe-expert-count",
        E,
        "--moe-clusters",
        G,
        "--moe-top-k",
        "1",
        "--cluster-dropout",
        "0.5",
        "--cluster-dropout-interval",
        "250",
        "--moe-cluster-loss",
        "intra",
        "--moe-balance-weight",
        "0.01",
        "--moe-cluster-weight",
        "0.01",
    ] + common


def criterion_args(kind):
    return [
        "--criterion",
        "label_smoothed_cross_entropy" if kind == "dense" else "moec_label_smoothed_cross_entropy",
        "--label-smoothing",
        "0.1",
    ]


def device_args(args):
    return ["--cpu"] if args.device == "cpu" else []


def precision_args(args):
    """Training precision (generation runs in fp32 for both models)."""
    return {"fp32": [], "bf16": ["--bf16"], "fp16": ["--fp16"]}[args.precision]


def train_cmd(args, kind, data_bin, rdir, max_update):
    return (
        [
            cli("fairseq-train"),
            data_bin,
            "--source-lang",
            args.source_lang,
            "--target-lang",
            args.target_lang,
            *device_args(args),
            *precision_args(args),
            "--num-workers",
            "0",
            "--seed",
            "1",
            "--optimizer",
            args.optimizer,
            "--adam-betas",
            "(0.9, 0.98)",
            "--lr",
            "2e-3",
            "--lr-scheduler",
            "inverse_sqrt",
            "--warmup-updates",
            "150",
            "--warmup-init-lr",
            "1e-07",
            "--max-tokens",
            args.max_tokens,
            "--max-update",
            max_update,
            "--disable-validation",
            "--save-dir",
            rdir / "ckpt",
            "--no-epoch-checkpoints",
            "--save-interval-updates",
            "0",
            "--log-format",
            "json",
            "--log-interval",
            args.log_interval,
            "--log-file",
            rdir / "train.log",
            "--no-progress-bar",
        ]
        + criterion_args(kind)
        + model_args(args, kind)
    )


def gen_cmd(args, kind, data_bin, rdir):
    L = str(args.gen_len)
    return [
        cli("fairseq-generate"),
        data_bin,
        "--source-lang",
        args.source_lang,
        "--target-lang",
        args.target_lang,
        "--user-dir",
        PLUGIN,
        "--task",
        "translation" if kind == "dense" else "translation_moec",
        "--path",
        rdir / "ckpt" / "checkpoint_last.pt",
        "--gen-subset",
        args.gen_subset,
        *device_args(args),
        "--beam",
        args.beam,
        "--batch-size",
        args.gen_batch,
        "--required-batch-size-multiple",
        "1",
        "--min-len",
        L,
        "--max-len-a",
        "0",
        "--max-len-b",
        L,
        "--num-workers",
        "0",
    ]


# --------------------------------------------------------------------------------------------------- logs
def train_records(path):
    """fairseq's per-interval training records (``train_inner``, with words/s) of the json log, numbers as floats."""
    return [{k: _number(v) for k, v in r.items()} for r in logs.parse_log(path)["train_inner"] if "wps" in r]


def _number(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def generate_figures(text, model):
    """The speed line of fairseq-generate's output TEXT, after checking one hypothesis for each sentence."""
    g = hypotheses.generation_speed(text)
    if g is None:
        raise SystemExit(f"no 'Translated ...' line in the output of fairseq-generate for {model}")
    try:
        g["hypotheses"] = len(
            hypotheses.hypotheses(text.splitlines(), g["sentences"], f"fairseq-generate ({model})", "sentences")
        )
    except files.PipelineError as e:
        raise SystemExit(str(e)) from None
    return g


# --------------------------------------------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data-bin",
        default=None,
        help="binarized data (fairseq-preprocess --joined-dictionary); default: build one from --raw-dir under --work",
    )
    p.add_argument(
        "--raw-dir",
        default=None,
        help="raw parallel text {train,valid,test}.{src,tgt}[.xz] (default: the bundled Spanish-English corpus)",
    )
    p.add_argument("--source-lang", default="es")
    p.add_argument("--target-lang", default="en")
    p.add_argument("--work", default=str(ROOT / "work" / "bench_e2e"))
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--train-pairs", type=int, default=0, help="first N training pairs (0 = all)")
    p.add_argument("--updates", type=int, default=60)
    p.add_argument("--chunks", type=int, default=2, help="alternating training slices per model")
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--log-interval", type=int, default=5)
    for name, value in small_model.SIZES.items():  # the small model of the demo and the study
        p.add_argument(f"--{name}", type=int, default=value)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--clusters", type=int, default=8)
    p.add_argument("--moe-layers", default="1", help="0-based MoE layers on each side")
    p.add_argument("--gen-subset", default="test")
    p.add_argument("--gen-sentences", type=int, default=300, help="test lines kept when building the data")
    p.add_argument("--gen-batch", type=int, default=64)
    p.add_argument("--gen-len", type=int, default=32)
    p.add_argument("--gen-reps", type=int, default=2)
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda: fairseq's default GPU")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="training precision of both models (bf16: the WMT recipe's; the experts then run "
        "torch._grouped_mm on H100-class GPUs)",
    )
    p.add_argument("--models", default="dense,moec")
    p.add_argument(
        "--optimizer",
        default="torch_adam",
        choices=["torch_adam", "adam"],
        help="torch_adam: fused AdamW (the plugin's); adam: fairseq's per-parameter loop",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: tiny model, 1000-piece vocab on 2000 pairs, 4 updates, 20 test sentences",
    )
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/e2e_<device>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.vocab, args.train_pairs, args.updates, args.chunks = 1000, 2000, 4, 1
        args.dim, args.ffn, args.layers, args.heads, args.experts, args.clusters = 64, 128, 2, 2, 8, 4
        args.gen_sentences, args.gen_len, args.gen_reps, args.log_interval = 20, 8, 1, 1
        args.max_tokens = 1024
        args.work = str(Path(args.work).with_name(Path(args.work).name + "_quick"))
        args.out = args.out or str(HERE / "results" / f"e2e_{args.device}_quick.json")
    for name in (
        "layers",
        "dim",
        "ffn",
        "heads",
        "experts",
        "clusters",
        "max_tokens",
        "log_interval",
        "beam",
        "gen_batch",
    ):
        setattr(args, name, str(getattr(args, name)))
    models = [m for m in args.models.split(",") if m]
    t_start = time.time()
    info = dict(machine.machine_info(args.device, args.threads), precision=args.precision)
    log(f"{info.get('cpu')} | torch {info['torch']} | {args.threads} threads | load {info.get('loadavg_at_start')}")

    if args.data_bin:
        data_bin = Path(args.data_bin)
    else:
        if not args.raw_dir:
            args.raw_dir = str(files.BUNDLED_CORPUS)
        data_bin = build_data(args)
    for m in models:
        shutil.rmtree(Path(args.work) / "runs" / m, ignore_errors=True)
        (Path(args.work) / "runs" / m).mkdir(parents=True)

    # training, alternating slices
    commands = {m: [] for m in models}
    chunk_bounds = {m: [] for m in models}
    updates = int(args.updates)
    for c in range(1, args.chunks + 1):
        upto = max(1, round(updates * c / args.chunks))
        for m in models:
            rdir = Path(args.work) / "runs" / m
            cmd = train_cmd(args, m, data_bin, rdir, upto)
            commands[m].append(" ".join(str(x) for x in cmd))
            start = chunk_bounds[m][-1] if chunk_bounds[m] else 0
            sh(cmd, args, log_path=rdir / "train.console.log")
            chunk_bounds[m].append(upto)
            recs = [r for r in train_records(rdir / "train.log") if start < r["num_updates"] <= upto]
            log(f"{m}: updates {start}-{upto}: wps " + ", ".join(f"{r['wps']:.0f}" for r in recs))

    result = {"machine": info, "settings": {k: v for k, v in vars(args).items()}, "train": {}, "generate": {}}
    for m in models:
        rdir = Path(args.work) / "runs" / m
        recs = train_records(rdir / "train.log")
        kept, prev = [], 0
        for upto in chunk_bounds[m]:
            part = [r for r in recs if prev < r["num_updates"] <= upto]
            kept += part[1:] if len(part) > 1 else part  # leave out the first record of each slice
            prev = upto
        wps = [r["wps"] for r in kept]
        result["train"][m] = {
            "wps_median": statistics.median(wps) if wps else None,
            "wps_mean": statistics.mean(wps) if wps else None,
            "wps_records": wps,
            "updates": updates,
            "log": str(rdir / "train.log"),
            "commands": commands[m],
        }

    # generation, alternating repetitions
    for rep in range(int(args.gen_reps)):
        for m in models:
            rdir = Path(args.work) / "runs" / m
            cmd = gen_cmd(args, m, data_bin, rdir)
            log("$ " + " ".join(str(c) for c in cmd))
            r = subprocess.run([str(c) for c in cmd], env=env(args), capture_output=True, text=True)
            (rdir / f"generate.{rep}.log").write_text(r.stdout + r.stderr)
            if r.returncode:
                raise SystemExit(f"fairseq-generate failed for {m}:\n{(r.stdout + r.stderr)[-3000:]}")
            g = generate_figures(r.stdout + r.stderr, m)
            log(
                f"{m}: generate rep {rep}: {g['sentences']} sentences, {g['sentences_per_s']:.2f} sentences/s, "
                f"{g['tokens_per_s']:.1f} tokens/s"
            )
            entry = result["generate"].setdefault(m, {"runs": [], "command": " ".join(str(c) for c in cmd)})
            entry["runs"].append(g)
    for m, entry in result["generate"].items():
        entry["sentences_per_s_median"] = statistics.median(g["sentences_per_s"] for g in entry["runs"])

    # report
    machine.finish(info, t_start)
    if "dense" in models and "moec" in models:
        tr, gn = result["train"], result["generate"]
        if tr["dense"]["wps_median"] and tr["moec"]["wps_median"]:
            result["train_wps_ratio_moec_over_dense"] = tr["moec"]["wps_median"] / tr["dense"]["wps_median"]
        result["generate_sps_ratio_moec_over_dense"] = (
            gn["moec"]["sentences_per_s_median"] / gn["dense"]["sentences_per_s_median"]
        )
    print()
    print(f"{'model':<8}{'train wps (median)':>20}{'generate sentences/s':>22}")
    for m in models:
        print(
            f"{m:<8}{result['train'][m]['wps_median'] or float('nan'):>20.0f}"
            f"{result['generate'][m]['sentences_per_s_median']:>22.2f}"
        )
    if "train_wps_ratio_moec_over_dense" in result:
        print(
            f"{'moec/dense':<8}{result['train_wps_ratio_moec_over_dense']:>20.3f}"
            f"{result['generate_sps_ratio_moec_over_dense']:>22.3f}"
        )
    out = Path(args.out) if args.out else HERE / "results" / f"e2e_{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    files.write_text_atomic(out, json.dumps(result, indent=1, default=str))
    log(f"wrote {out} ({info['elapsed_s']}s)")
    return result


if __name__ == "__main__":
    main()
