#!/usr/bin/env python3
"""Limited-data study on the bundled Spanish-English Bible corpus: dense vs MoE vs MoEC, equal updates.

    python scripts/study.py --threads 1 [--out work/study] [--seeds 2] [--updates 500] [--train-pairs 1000] ...
    python scripts/study.py --table-only          # rewrite results.md and the plot from what is on disk
    python scripts/study.py --pilot-updates 30 --out work/study_pilot   # speed pilot (not in the table)

The same command again continues where it stopped (see docs/study.md for the settings and why).

Every stage is resumable: a stage writes its outputs under temporary names and its completion stamp last.
  data     corpus (train subset sampled with a fixed seed), joint sentencepiece unigram model trained on the
           training subset only, encoded text, fairseq-preprocess --joined-dictionary   -> OUT/data
           (or --reuse-demo DIR: the spm model and dictionary of scripts/demo.sh's work dir, DIR/spm/spm.model and
           DIR/bin/dict.en.txt, with the subset re-binarized against that dictionary)
  runs     one directory per (model, seed) under OUT/runs: fairseq-train (json log in train.log; an interrupted
           run resumes from checkpoint_last.pt), fairseq-generate on every test line (beam 4, count checked),
           sacrebleu BLEU/chrF, then the stamp DONE (json) is written last; a run with DONE is skipped.
  report   OUT/results.md (+ results.json) and the valid-loss plot (--plot, default docs/img/study_valid_loss.png).
Runs that are not finished appear in the table as "not run" or "interrupted at update N", never with numbers
they do not have.
"""
import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "fairseq_moec"
sys.path.insert(0, str(ROOT / "scripts"))
from demo_tools import BUNDLED_CORPUS, read_lines  # noqa: E402  (the corpus helpers shared with the demo)

STAMP = "DONE"
THREADS = 0  # --threads: torch intra-op threads of the fairseq commands (0 = inherit the environment)


# ---------------------------------------------------------------------------------------------------------
# run plan
# ---------------------------------------------------------------------------------------------------------
def run_specs(args):
    """[(name, kind, experts, clusters)] in the order they are trained."""
    specs = [("dense", "dense", 0, 0)]
    for e in args.experts:  # MoE and MoEC of one E next to each other: a cut-short study still has pairs
        specs.append((f"moe{e}", "moe", e, 1))
        specs.append((f"moec{e}", "moec", e, max(1, e // args.cluster_size)))
    if args.only:
        specs = [s for s in specs if s[0] in args.only]
    return specs


def model_args(args, kind, experts, clusters):
    common = [
        "--share-all-embeddings", "--encoder-layers", str(args.layers), "--decoder-layers", str(args.layers),
        "--encoder-embed-dim", str(args.dim), "--decoder-embed-dim", str(args.dim),
        "--encoder-ffn-embed-dim", str(args.ffn), "--decoder-ffn-embed-dim", str(args.ffn),
        "--encoder-attention-heads", str(args.heads), "--decoder-attention-heads", str(args.heads),
        "--dropout", str(args.dropout), "--label-smoothing", "0.1",
    ]
    if kind == "dense":
        # fairseq's own transformer/task/criterion; --user-dir only for what the plugin fixes globally: checkpoints
        # that load under torch >= 2.6 (resume, generate) and fairseq's upstream batching (the fork drops the last
        # valid/test batch), so that dense and MoE runs see the same batches
        return ["--user-dir", str(PLUGIN), "--task", "translation", "--arch", "transformer",
                "--criterion", "label_smoothed_cross_entropy"] + common
    moe = ["--user-dir", str(PLUGIN), "--task", "translation_moec", "--arch", "moec_transformer",
           "--criterion", "moec_label_smoothed_cross_entropy", "--moe-expert-count", str(experts),
           "--moe-encoder-layers", args.moe_layers, "--moe-decoder-layers", args.moe_layers,
           "--moe-balance-weight", str(args.balance_weight)]
    if kind == "moe":
        moe += ["--moe-clusters", "1", "--cluster-dropout", "0", "--moe-cluster-weight", "0"]
    else:
        moe += ["--moe-clusters", str(clusters), "--cluster-dropout", str(args.cluster_dropout),
                "--cluster-dropout-interval", str(args.cluster_dropout_interval),
                "--moe-cluster-loss", "intra", "--moe-cluster-loss-norm", "mean",
                "--moe-cluster-weight", str(cluster_weight(args, experts))]
    return moe + common


def cluster_weight(args, experts):
    """--moe-cluster-weight: fixed if given, else c * E^2 / 100 (see docs/study.md: with the 'mean' norm the
    intra-cluster variance of the routing masses is ~ (CV/E)^2, so this puts its gradient on the scale of the
    0.01-weighted balance loss)."""
    if args.cluster_weight is not None:
        return args.cluster_weight
    return round(args.cluster_coef * experts * experts / 100.0, 4)


def train_args(args, data_bin, save_dir, log_file, seed, updates):
    return [str(data_bin), "--source-lang", "es", "--target-lang", "en",
            "--optimizer", "adam", "--adam-betas", "(0.9, 0.98)", "--lr", str(args.lr),
            "--lr-scheduler", "inverse_sqrt", "--warmup-updates", str(args.warmup), "--warmup-init-lr", "1e-07",
            "--max-tokens", str(args.max_tokens), "--max-update", str(updates), "--seed", str(seed), "--cpu",
            "--num-workers", "0",
            "--validate-interval-updates", str(args.valid_interval), "--validate-interval", "100000",
            "--save-interval-updates", str(args.valid_interval), "--save-interval", "100000",
            "--keep-interval-updates", "1", "--no-epoch-checkpoints", "--best-checkpoint-metric", "loss",
            "--save-dir", str(save_dir), "--log-format", "json", "--log-interval", str(args.log_interval),
            "--log-file", str(log_file), "--no-progress-bar"]


# ---------------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------------
def log(msg):
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def cli(name):
    p = Path(sys.executable).parent / name
    return str(p) if p.exists() else (shutil.which(name) or name)


def sh(cmd, stdout=None):
    log("$ " + " ".join(str(c) for c in cmd))
    env = dict(os.environ)
    if THREADS:
        env.update(OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS))
    subprocess.run([str(c) for c in cmd], check=True, stdout=stdout, env=env)


def write_atomic(path, text):
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def key_of(obj):
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------
def prepare_data(args):
    """OUT/data/{raw,spm,tok,bin}; returns (data_bin, spm_model, raw_dir). Stamp: OUT/data/DONE."""
    d = Path(args.out) / "data"
    key = {"corpus": str(args.corpus), "train_pairs": args.train_pairs, "valid_lines": args.valid_lines,
           "subset_seed": args.subset_seed,
           "vocab": args.vocab, "reuse_demo": str(args.reuse_demo or "")}
    stamp = d / STAMP
    if stamp.exists() and json.loads(stamp.read_text()).get("key") == key:
        log(f"data: done ({stamp}), skipping")
        return d / "bin", d / "spm" / "spm.model", d / "raw"
    if d.exists():
        shutil.rmtree(d)
    tmp = Path(args.out) / "data.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / "raw").mkdir(parents=True)
    counts = {}
    for split in ("train", "valid", "test"):
        es, en = read_lines(Path(args.corpus) / f"{split}.es"), read_lines(Path(args.corpus) / f"{split}.en")
        if len(es) != len(en):
            raise SystemExit(f"{args.corpus}: {split}.es has {len(es)} lines, {split}.en {len(en)}")
        idx = list(range(len(es)))
        n = {"train": args.train_pairs, "valid": args.valid_lines}.get(split, 0)
        if n and n < len(es):  # a random subset with a fixed seed, kept in corpus order
            idx = sorted(random.Random(args.subset_seed).sample(idx, n))
        counts[split] = len(idx)
        for lang, lines in (("es", es), ("en", en)):
            (tmp / "raw" / f"{split}.{lang}").write_text("".join(lines[i] + "\n" for i in idx), encoding="utf-8")
    import sentencepiece as spm
    (tmp / "spm").mkdir()
    srcdict = None
    if args.reuse_demo:
        demo = Path(args.reuse_demo)
        shutil.copy(demo / "spm" / "spm.model", tmp / "spm" / "spm.model")
        srcdict = demo / "bin" / "dict.en.txt"
        log(f"data: reusing {demo}/spm/spm.model and {srcdict}")
    else:
        log(f"data: joint {args.vocab}-piece unigram sentencepiece model on the {counts['train']} training pairs")
        spm.SentencePieceTrainer.train(
            input=f"{tmp}/raw/train.es,{tmp}/raw/train.en", model_prefix=str(tmp / "spm" / "spm"),
            vocab_size=args.vocab, model_type="unigram", character_coverage=1.0, input_sentence_size=0,
            shuffle_input_sentence=False, num_threads=2, minloglevel=1)
    sp = spm.SentencePieceProcessor(model_file=str(tmp / "spm" / "spm.model"))
    (tmp / "tok").mkdir()
    for split in ("train", "valid", "test"):
        for lang in ("es", "en"):
            lines = (tmp / "raw" / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()
            (tmp / "tok" / f"{split}.{lang}").write_text(
                "".join(" ".join(sp.encode(l, out_type=str)) + "\n" for l in lines), encoding="utf-8")
    cmd = [cli("fairseq-preprocess"), "--source-lang", "es", "--target-lang", "en", "--joined-dictionary",
           "--trainpref", tmp / "tok" / "train", "--validpref", tmp / "tok" / "valid", "--testpref", tmp / "tok" / "test",
           "--destdir", tmp / "bin", "--workers", "2"]
    if srcdict:
        cmd += ["--srcdict", srcdict]
    sh(cmd, stdout=subprocess.DEVNULL)
    (tmp / STAMP).write_text(json.dumps({"key": key, "counts": counts}) + "\n")
    os.replace(tmp, d)
    log(f"data: ready in {d} ({counts})")
    return d / "bin", d / "spm" / "spm.model", d / "raw"


# ---------------------------------------------------------------------------------------------------------
# log parsing
# ---------------------------------------------------------------------------------------------------------
def _classify(rec):
    """fairseq's json progress bar: train_inner records carry num_updates, epoch-end ones train_*, validation
    ones valid_* (the --log-file handler writes the bare json; the console adds '| valid |' etc.)."""
    if "valid_num_updates" in rec:
        return "valid", rec["valid_num_updates"]
    if "train_num_updates" in rec:
        return "train", rec["train_num_updates"]
    if "num_updates" in rec and "loss" in rec:
        return "train_inner", rec["num_updates"]
    return None, None


def parse_log(path):
    """Records of a fairseq json log (--log-format json, file from --log-file or the console): {'train_inner':
    [...], 'valid': [...], 'train': [...]} sorted by update, values converted to float where possible. A record
    repeated for the same update by a resumed session replaces the earlier one."""
    out = {"train_inner": {}, "valid": {}, "train": {}}
    if not Path(path).exists():
        return {k: [] for k in out}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            i = line.find('{"')
            if i < 0:
                continue
            try:
                rec = json.loads(line[i:])
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict):
                continue
            rec = {k: _num(v) for k, v in rec.items()}
            tag, upd = _classify(rec)
            if tag is None or not isinstance(upd, float):
                continue
            out[tag][int(upd)] = rec
    return {k: [v[u] for u in sorted(v)] for k, v in out.items()}


def _num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def summarize_log(path):
    """best valid loss and its update, last valid loss, train/valid gap at the end, expert-load CV per MoE layer
    from the last validation, the last update reached. Losses are fairseq's (label-smoothed CE, base 2)."""
    recs = parse_log(path)
    valid, inner = recs["valid"], recs["train_inner"]
    s = {"last_update": 0, "curve": [(int(r["valid_num_updates"]), r["valid_loss"]) for r in valid
                                     if isinstance(r.get("valid_loss"), float)]}
    ups = [int(r["num_updates"]) for r in inner] + [u for u, _ in s["curve"]]
    s["last_update"] = max(ups) if ups else 0
    if not s["curve"]:
        return s
    bu, bl = min(s["curve"], key=lambda c: (c[1], c[0]))
    s.update(best_valid_loss=bl, best_update=bu)
    last = valid[-1]
    lu = int(last["valid_num_updates"])
    s.update(last_valid_loss=last["valid_loss"], last_valid_update=lu)
    prev = s["curve"][-2][0] if len(s["curve"]) > 1 else 0
    window = [r["loss"] for r in inner if prev < r["num_updates"] <= lu and isinstance(r.get("loss"), float)]
    if not window and inner:
        window = [inner[-1]["loss"]]
    if window:
        s["train_loss_end"] = sum(window) / len(window)
        s["gap"] = last["valid_loss"] - s["train_loss_end"]
    cv = {k[len("valid_moe_"):-len("_load_cv")]: v for k, v in last.items()
          if k.startswith("valid_moe_") and k.endswith("_load_cv") and isinstance(v, float)}
    if cv:
        s["load_cv"] = dict(sorted(cv.items()))
    return s


# ---------------------------------------------------------------------------------------------------------
# one run
# ---------------------------------------------------------------------------------------------------------
def code_state():
    """git HEAD, whether fairseq_moec/ differs from it, and a hash of the plugin's sources as imported now (the
    study imports the plugin from the working tree at every fairseq command)."""
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""
    h = hashlib.sha1()
    for p in sorted(PLUGIN.rglob("*.py")):
        h.update(p.relative_to(ROOT).as_posix().encode() + p.read_bytes())
    return {"time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "git_head": git("rev-parse", "HEAD"),
            "plugin_dirty": bool(git("status", "--porcelain", "--", "fairseq_moec")), "plugin_sha1": h.hexdigest()[:12]}


def run_dir(args, name, seed, pilot=False):
    return Path(args.out) / ("pilot" if pilot else "runs") / f"{name}-s{seed}"


def is_done(rdir):
    return (Path(rdir) / STAMP).exists()


def do_run(args, spec, seed, data_bin, spm_model, raw, pilot=False):
    name, kind, experts, clusters = spec
    rdir = run_dir(args, name, seed, pilot)
    updates = args.pilot_updates if pilot else args.updates
    if is_done(rdir):
        log(f"{rdir.name}: done ({rdir / STAMP}), skipping")
        return
    rdir.mkdir(parents=True, exist_ok=True)
    lock = rdir / "LOCK"
    if lock.exists():
        try:
            pid = int(lock.read_text().strip() or 0)
            os.kill(pid, 0)
            log(f"{rdir.name}: another study process (pid {pid}) is on it, skipping")
            return
        except (ValueError, ProcessLookupError, PermissionError):
            pass  # stale lock of a process that died: take the run over
    lock.write_text(f"{os.getpid()}\n")
    try:
        _do_run(args, rdir, spec, seed, updates, data_bin, spm_model, raw, pilot)
    finally:
        lock.unlink(missing_ok=True)


def _do_run(args, rdir, spec, seed, updates, data_bin, spm_model, raw, pilot):
    name, kind, experts, clusters = spec
    margs = model_args(args, kind, experts, clusters)
    targs = train_args(args, data_bin, rdir / "checkpoints", rdir / "train.log", seed, updates)
    cfg = {"name": name, "kind": kind, "experts": experts, "clusters": clusters, "seed": seed, "updates": updates,
           "train_cmd": [cli("fairseq-train")] + targs + margs}
    cfg_path = rdir / "config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        if old.get("train_cmd") != cfg["train_cmd"]:
            raise SystemExit(f"{rdir} holds a run with other settings (config.json); remove it or use another --out")
    else:
        write_atomic(cfg_path, json.dumps(cfg, indent=1) + "\n")
    t0 = time.time()
    last = rdir / "checkpoints" / "checkpoint_last.pt"
    log(f"{rdir.name}: training to {updates} updates" + (" (resuming from checkpoint_last.pt)" if last.exists() else ""))
    done_updates = summarize_log(rdir / "train.log")["last_update"]
    if done_updates < updates or not last.exists():
        with open(rdir / "code_state.jsonl", "a") as f:
            f.write(json.dumps(code_state()) + "\n")
        sh(cfg["train_cmd"])
    t_train = time.time() - t0
    if pilot:
        write_atomic(rdir / STAMP, json.dumps({"train_s": round(t_train, 1)}) + "\n")
        return
    results = {}
    for which in args.eval_checkpoints:
        results[which] = evaluate(args, rdir, which, kind, data_bin, spm_model, raw)
    for p in (rdir / "checkpoints").glob("checkpoint_*_*.pt"):
        p.unlink()  # interval copies: best and last are kept
    summary = summarize_log(rdir / "train.log")
    stamp = {"name": name, "seed": seed, "updates": updates, "results": results, "summary": summary,
             "code_state_at_end": code_state(),
             "train_wall_s_this_session": round(t_train, 1), "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    write_atomic(rdir / STAMP, json.dumps(stamp, indent=1) + "\n")
    log(f"{rdir.name}: done: " + ", ".join(f"{w}: BLEU {r['bleu']} chrF {r['chrf']}" for w, r in results.items()))


def evaluate(args, rdir, which, kind, data_bin, spm_model, raw):
    """fairseq-generate of every test line with checkpoint_<which>.pt, spm-decode, sacrebleu. Cached in
    score.<which>.json (written last)."""
    out = rdir / f"score.{which}.json"
    if out.exists():
        return json.loads(out.read_text())
    s = summarize_log(rdir / "train.log")
    if which == "last" and (rdir / "score.best.json").exists() and s.get("best_update") == s.get("last_valid_update") \
            == s.get("last_update"):
        # the best checkpoint is the last one (valid loss still falling at the end): same weights, same output
        res = dict(json.loads((rdir / "score.best.json").read_text()), checkpoint="last (= best)")
        write_atomic(out, json.dumps(res, indent=1) + "\n")
        return res
    ckpt = rdir / "checkpoints" / f"checkpoint_{which}.pt"
    gen = rdir / f"generate.{which}.txt"
    cmd = [cli("fairseq-generate"), data_bin, "--source-lang", "es", "--target-lang", "en", "--gen-subset", "test",
           "--path", ckpt, "--beam", str(args.beam), "--batch-size", str(args.gen_batch),
           "--required-batch-size-multiple", "1", "--cpu", "--num-workers", "0",
           "--max-len-a", str(args.max_len_a), "--max-len-b", str(args.max_len_b)]
    cmd += ["--user-dir", PLUGIN, "--task", "translation" if kind == "dense" else "translation_moec"]
    with open(str(gen) + ".tmp", "w", encoding="utf-8") as f:
        sh(cmd, stdout=f)
    os.replace(str(gen) + ".tmp", gen)
    import sentencepiece as spm
    from sacrebleu.metrics import BLEU, CHRF
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    refs = (Path(raw) / "test.en").read_text(encoding="utf-8").splitlines()
    hyps = {}
    for line in gen.read_text(encoding="utf-8").splitlines():
        if line.startswith("H-"):
            head, _score, *text = line.split("\t")
            hyps[int(head[2:])] = sp.decode_pieces(text[0].split()) if text else ""
    if sorted(hyps) != list(range(len(refs))):
        raise SystemExit(f"{gen}: {len(hyps)} hypotheses for {len(refs)} test lines")
    hyp_lines = [hyps[i] for i in range(len(refs))]
    write_atomic(rdir / f"hyp.{which}.en", "".join(h + "\n" for h in hyp_lines))
    bleu, chrf = BLEU(), CHRF()
    b, c = bleu.corpus_score(hyp_lines, [refs]), chrf.corpus_score(hyp_lines, [refs])
    res = {"checkpoint": which, "lines": len(refs), "bleu": round(b.score, 2), "chrf": round(c.score, 2),
           "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature()),
           "bleu_full": str(b)}
    write_atomic(out, json.dumps(res, indent=1) + "\n")
    return res


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------
def run_status(rdir, target_updates):
    """(status string, stamp dict or None, summary)."""
    rdir = Path(rdir)
    summary = summarize_log(rdir / "train.log")
    if is_done(rdir):
        return "done", json.loads((rdir / STAMP).read_text()), summary
    if not rdir.exists() or (summary["last_update"] == 0 and not summary["curve"]):
        return "not run", None, summary
    try:
        os.kill(int((rdir / "LOCK").read_text().strip()), 0)
        return f"running, at update {summary['last_update']}", None, summary
    except (OSError, ValueError):
        return f"interrupted at update {summary['last_update']}", None, summary


def _f(v, fmt="{:.3f}"):
    return "–" if v is None else fmt.format(v)


def write_table(rows, eval_checkpoints, target_updates):
    """rows: [(label, run_dir)] -> markdown text. Only finished runs (stamp present) get numbers."""
    ev = list(eval_checkpoints)
    head = ["run", "status"]
    for w in ev:
        head += [f"BLEU ({w})", f"chrF ({w})"]
    head += ["best valid loss", "at update", "final valid loss", "train loss (end)", "gap valid−train",
             "load CV (last valid)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    sigs = set()
    for label, rdir in rows:
        status, stamp, s = run_status(rdir, target_updates)
        if stamp is None:
            lines.append("| " + " | ".join([label, status] + ["–"] * (len(head) - 2)) + " |")
            continue
        cells = [label, f"done ({stamp.get('updates', target_updates)} updates)"]
        for w in ev:
            r = stamp.get("results", {}).get(w)
            cells += [_f(r and r.get("bleu"), "{:.2f}"), _f(r and r.get("chrf"), "{:.2f}")]
            if r:
                sigs.add(f"BLEU: `{r['bleu_signature']}`; chrF: `{r['chrf_signature']}`")
        cv = s.get("load_cv")
        cells += [_f(s.get("best_valid_loss")), str(s.get("best_update", "–")), _f(s.get("last_valid_loss")),
                  _f(s.get("train_loss_end")), _f(s.get("gap"), "{:+.3f}"),
                  ", ".join(f"{k} {v:.2f}" for k, v in cv.items()) if cv else "n/a (dense)"]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if sigs:
        text += "\nsacrebleu signatures: " + "; ".join(sorted(sigs)) + "\n"
    return text


def write_mean_table(groups, eval_checkpoints):
    """groups: [(name, [run_dir per seed])] -> markdown: means over the FINISHED seeds only, with their count."""
    cols = [(f"BLEU ({w})", ("results", w, "bleu")) for w in eval_checkpoints]
    cols += [(f"chrF ({w})", ("results", w, "chrf")) for w in eval_checkpoints]
    cols += [("best valid loss", ("summary", "best_valid_loss")), ("final valid loss", ("summary", "last_valid_loss")),
             ("final − best", None), ("gap valid−train", ("summary", "gap"))]
    head = ["run", "finished seeds"] + [c for c, _ in cols]
    lines = ["Mean over the finished seeds:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, rdirs in groups:
        stamps = [json.loads((Path(r) / STAMP).read_text()) for r in rdirs if is_done(r)]
        sums = [summarize_log(Path(r) / "train.log") for r in rdirs if is_done(r)]
        cells = [name, str(len(stamps))]
        for _, path in cols:
            vals = []
            for st, su in zip(stamps, sums):
                if path is None:
                    v = (su.get("last_valid_loss") - su["best_valid_loss"]) if "best_valid_loss" in su else None
                elif path[0] == "summary":
                    v = su.get(path[1])
                else:
                    v = (st.get("results", {}).get(path[1]) or {}).get(path[2])
                if isinstance(v, (int, float)):
                    vals.append(v)
            fmt = "{:.2f}" if path and path[0] == "results" else "{:.3f}"
            cells.append(fmt.format(sum(vals) / len(vals)) if vals else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(curves, path):
    """Valid loss over updates, one line per run (colour: model, line style: seed); right panel: the second half
    of training, zoomed, where overfitting shows."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, zoom) = plt.subplots(1, 2, figsize=(13, 5))
    colors, styles = {}, ["-", "--", ":", "-."]
    last = max((c[-1][0] for _, c, *_ in curves if c), default=0)
    lo, hi = float("inf"), float("-inf")
    for item in curves:
        label, curve = item[0], item[1]
        name, seed = (item[2], item[3]) if len(item) > 2 else (label, 1)
        color = colors.setdefault(name, f"C{len(colors)}")
        if not curve:
            continue
        style = dict(marker=".", color=color, linestyle=styles[(seed - 1) % len(styles)], label=label)
        ax.plot([u for u, _ in curve], [l for _, l in curve], **style)
        half = [(u, l) for u, l in curve if u >= last / 2]
        if half:
            zoom.plot([u for u, _ in half], [l for _, l in half], **style)
            lo, hi = min(lo, min(l for _, l in half)), max(hi, max(l for _, l in half))
    for a, title in ((ax, "valid loss"), (zoom, "second half, zoomed")):
        a.set_xlabel("update")
        a.set_ylabel("valid loss (label-smoothed CE, base 2)")
        a.set_title(title)
        a.grid(alpha=0.3)
    if hi > lo:
        zoom.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax.legend(fontsize=8)
    fig.suptitle("Bible es-en limited-data study: dense vs MoE vs MoEC, equal updates")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path) + ".tmp.png", dpi=100)
    os.replace(str(path) + ".tmp.png", path)
    plt.close(fig)


def report(args):
    rows, curves = [], []
    for spec in run_specs(args):
        for seed in args.seeds:
            rdir = run_dir(args, spec[0], seed)
            label = f"{spec[0]} (s{seed})" if len(args.seeds) > 1 else spec[0]
            if spec[1] == "moec":
                label += f" G={spec[3]}"
            rows.append((label, rdir))
            status = run_status(rdir, args.updates)[0]
            curves.append((label if status == "done" else f"{label} ({status})",
                           summarize_log(rdir / "train.log")["curve"], spec[0], seed))
    table = write_table(rows, args.eval_checkpoints, args.updates)
    if len(args.seeds) > 1:
        groups = [(spec[0], [run_dir(args, spec[0], seed) for seed in args.seeds]) for spec in run_specs(args)]
        table += "\n" + write_mean_table(groups, args.eval_checkpoints)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.md", table)
    full = {label: {"status": run_status(r, args.updates)[0], "summary": summarize_log(r / "train.log"),
                    "stamp": json.loads((r / STAMP).read_text()) if is_done(r) else None} for label, r in rows}
    write_atomic(out / "results.json", json.dumps(full, indent=1) + "\n")
    if args.plot and any(c[1] for c in curves):
        plot(curves, args.plot)
    log(f"report: {out / 'results.md'}" + (f", {args.plot}" if args.plot else ""))
    print(table)


# ---------------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / "work" / "study"))
    p.add_argument("--corpus", default=str(BUNDLED_CORPUS), help="dir with {train,valid,test}.{es,en}[.xz]")
    p.add_argument("--reuse-demo", default=None, help="scripts/demo.sh work dir (e.g. work/demo) whose spm model and dictionary to reuse")
    p.add_argument("--train-pairs", type=int, default=1000, help="random training subset (0 = all 28,091 pairs)")
    p.add_argument("--valid-lines", type=int, default=300, help="random valid subset for the loss curve (0 = all 995)")
    p.add_argument("--subset-seed", type=int, default=1)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--seeds", type=int, default=1, help="number of seeds (1, 2, ...)")
    p.add_argument("--first-seed", type=int, default=1, help="seeds are first-seed .. first-seed+seeds-1")
    p.add_argument("--updates", type=int, default=500)
    p.add_argument("--experts", default="16,32")
    p.add_argument("--only", default="", help="comma-separated run names (dense,moe16,moec16,...)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--moe-layers", default="1", help="0-based MoE layer(s) on each side")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--max-tokens", type=int, default=2000)
    p.add_argument("--valid-interval", type=int, default=25)
    p.add_argument("--log-interval", type=int, default=5)
    p.add_argument("--balance-weight", type=float, default=0.01)
    p.add_argument("--cluster-size", type=int, default=8, help="experts per cluster in MoEC (G = E / this)")
    p.add_argument("--cluster-dropout", type=float, default=0.5)
    p.add_argument("--cluster-dropout-interval", type=int, default=25)
    p.add_argument("--cluster-weight", type=float, default=None, help="fixed --moe-cluster-weight (default c*E^2/100)")
    p.add_argument("--cluster-coef", type=float, default=1.0, help="c in the default cluster weight c*E^2/100")
    p.add_argument("--beam", type=int, default=4)
    p.add_argument("--gen-batch", type=int, default=128)
    p.add_argument("--max-len-a", type=float, default=1.5, help="generation length cap a*src_len+b (weak models loop)")
    p.add_argument("--max-len-b", type=int, default=10)
    p.add_argument("--eval-checkpoints", default="best,last")
    p.add_argument("--plot", default=str(ROOT / "docs" / "img" / "study_valid_loss.png"))
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS of the fairseq commands (0 = inherit); "
                   "1 wastes less CPU on a machine shared with other jobs")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--pilot-updates", type=int, default=0, help="speed pilot: train each run this many updates under OUT/pilot")
    a = p.parse_args(argv)
    a.experts = [int(e) for e in a.experts.split(",") if e]
    a.only = [o for o in a.only.split(",") if o]
    a.seeds = list(range(a.first_seed, a.first_seed + a.seeds))
    a.eval_checkpoints = [w for w in a.eval_checkpoints.split(",") if w]
    return a


def main(argv=None):
    global THREADS
    args = parse_args(argv)
    THREADS = args.threads
    if args.table_only:
        report(args)
        return 0
    data_bin, spm_model, raw = prepare_data(args)
    pilot = args.pilot_updates > 0
    failed = []
    for seed in args.seeds:
        for spec in run_specs(args):
            try:
                do_run(args, spec, seed, data_bin, spm_model, raw, pilot=pilot)
            except (subprocess.CalledProcessError, SystemExit) as e:  # keep going: the table marks this run
                failed.append(f"{spec[0]}-s{seed}")
                log(f"{spec[0]}-s{seed}: FAILED ({e}); continuing with the next run")
            if not pilot:
                report(args)
    if pilot:
        for spec in run_specs(args):
            rdir = run_dir(args, spec[0], args.seeds[0], True)
            recs = parse_log(rdir / "train.log")["train_inner"]
            wps = [r.get("wps") for r in recs[1:] if isinstance(r.get("wps"), float)]
            ups = [r.get("ups") for r in recs[1:] if isinstance(r.get("ups"), float)]
            log(f"pilot {spec[0]}: {json.loads((rdir / STAMP).read_text())}, tgt tok/s {wps}, updates/s {ups}")
        return 0
    report(args)
    if failed:
        log(f"failed runs: {', '.join(failed)} (rerun the same command to retry them)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
