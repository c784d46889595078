"""The report of scripts/study.py: fairseq json logs -> per-run numbers, the tables of results.md, sacrebleu's paired
bootstrap tests, and the plots. Only finished runs (a DONE stamp) get numbers; the others are listed with their
state."""

import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from fairseq_moec.analysis.plots import pyplot
from fairseq_moec.pipeline import files, machine
from fairseq_moec.pipeline.logs import parse_log


# --- fairseq json logs -------------------------------------------------------------------------------------------
def summarize(path, train_eval=None):
    """Valid-loss curve, best and final valid loss; with TRAIN_EVAL (a run's train_eval.json, when it exists) the
    loss of the last checkpoint on the training data in eval mode and the gap: final valid - that loss. Also the
    training-mode train loss of the log over the last validation interval (dropout and cluster dropout on, which
    raise it unequally across models) and its gap, kept for reference. fairseq's losses: label-smoothed CE in
    bits per target token."""
    recs = parse_log(path)
    curve = [(int(float(r["valid_num_updates"])), float(r["valid_loss"])) for r in recs["valid"]]
    inner = [(int(float(r["num_updates"])), float(r["loss"])) for r in recs["train_inner"]]
    s = {"curve": curve, "last_update": max([u for u, _ in inner + curve], default=0)}
    if curve:
        best_update, best = min(curve, key=lambda c: (c[1], c[0]))
        last_update, last = curve[-1]
        prev = curve[-2][0] if len(curve) > 1 else 0
        window = [loss for u, loss in inner if prev < u <= last_update]
        s.update(best_valid=best, best_update=best_update, final_valid=last, final_update=last_update)
        if window:
            s["train_mode_end"] = sum(window) / len(window)
            s["train_mode_gap"] = last - s["train_mode_end"]
    if train_eval is not None and Path(train_eval).exists():
        s["train_eval"] = json.loads(Path(train_eval).read_text())["loss"]
        if curve:
            s["gap"] = s["final_valid"] - s["train_eval"]
    return s


# --- routing -----------------------------------------------------------------------------------------------------
def allocation(summary):
    """Per MoE layer of fairseq_moec.analyze's summary.json: the token share of every expert, min, max, CV and the
    number of experts below half the even share 1/(2E)."""
    out = {}
    for name, layer in summary["layers"].items():
        share, E = layer["load"], layer["num_experts"]
        mean = sum(share) / E
        cv = statistics.pstdev(share) / mean if mean else float("nan")
        out[name] = {
            "share": [round(x, 4) for x in share],
            "min": min(share),
            "max": max(share),
            "cv": cv,
            "below_half_even": sum(x < 1 / (2 * E) for x in share),
            "experts": E,
        }
    return out


def code_state(root):
    """git HEAD, whether fairseq_moec/ differs from it, a hash of the plugin's sources, and the load average."""
    h = hashlib.sha1()
    for p in sorted((Path(root) / "fairseq_moec").rglob("*.py")):
        h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return {
        "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "git_head": machine.git_commit(root) or "",
        "plugin_dirty": bool(machine.git_changes(root, "fairseq_moec")),
        "plugin_sha1": h.hexdigest()[:12],
        "loadavg": list(machine.loadavg() or []),  # a list, as it reads back from json
    }


def state(rdir, updates, trained=True):
    """A run's state for --list and the table; TRAINED: a training run, which also needs train_eval.json."""
    if (rdir / "DONE").exists():
        missing = trained and not (rdir / "train_eval.json").exists()
        return "done, without train_eval.json (the next run of the driver adds it)" if missing else "done"
    s = summarize(rdir / "train.log")
    return f"trained to update {s['last_update']} of {updates}" if s["last_update"] else "not started"


# --- report ------------------------------------------------------------------------------------------------------
def _f(v, fmt="{:.3f}"):
    return "–" if v is None else fmt.format(v)


def paired_bootstrap(ref, baseline, systems, n=1000):
    """sacrebleu's paired bootstrap resampling of SYSTEMS against BASELINE (BLEU and chrF): its JSON output."""
    cmd = [
        str(Path(sys.executable).parent / "sacrebleu"),
        str(ref),
        "-i",
        str(baseline),
        *map(str, systems),
        "-m",
        "bleu",
        "chrf",
        "--paired-bs",
        "--paired-bs-n",
        str(n),
        "--no-color",
    ]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


# What a finished run keeps in the repository (docs/study-v2/): enough to rebuild the report, no checkpoints
EXPORTED = (
    "DONE",
    "command.json",
    "code_state.jsonl",
    "train.log",
    "hyp.txt",
    "score.json",
    "routing/summary.json",
    "train_eval.json",
)


def export(out, runs, dest):
    """Copy the small outputs of every finished run, and the test references, from OUT to DEST, so that
    `study.py --out DEST --report-only` rebuilds the report from the repository. Written atomically per file."""
    copied = []
    for path in [Path("data") / "DONE", Path("data") / "raw" / "test.en"] + [
        Path("runs") / r.name / f for r in runs if (out / "runs" / r.name / "DONE").exists() for f in EXPORTED
    ]:
        if (out / path).exists():
            with files.atomic_path(dest / path) as tmp:
                shutil.copyfile(out / path, tmp)
            copied.append(str(path))
    return copied


def write(out, runs, updates, plot_dir):
    rows, done = [], {}
    for run in runs:
        rdir = out / "runs" / run.name
        trained = out / "runs" / (run.evaluate_of or run.name)  # an evaluation-only entry: its source's numbers
        s = summarize(trained / "train.log", trained / "train_eval.json")
        stamp = json.loads((rdir / "DONE").read_text()) if (rdir / "DONE").exists() else None
        if stamp:
            done[run.name] = (run, stamp, s)
        rows.append((run, stamp, s))
    lines = [
        f"Every run: {updates} updates; BLEU/chrF of the best-valid checkpoint on all test lines "
        f"(all experts unless stated); valid loss in bits (label-smoothed CE); train (eval) = the same loss of the "
        f"last checkpoint on the training data in eval mode (no dropout, all experts; fairseq-validate); "
        f"gap = final valid - train (eval); allocation of the final model over 2,000 training sentences "
        f"(per MoE layer: min / max token share, CV, experts below 1/(2E)).",
        "",
        "| run | state | BLEU | chrF | best valid (update) | final valid | train (eval) | gap | allocation enc / dec |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run, stamp, s in rows:
        if not stamp:
            lines.append(f"| {run.name} | {state(out / 'runs' / run.name, updates)} | – | – | – | – | – | – | – |")
            continue
        if run.evaluate_of:  # another way to translate with a model of the table: its losses and routing are there
            same = f"as {run.evaluate_of}"
            lines.append(
                f"| {run.name} | done | {stamp['score']['bleu']:.2f} | {stamp['score']['chrf']:.2f} | "
                + " | ".join([same] * 5)
                + " |"
            )
            continue
        sc, alloc = stamp["score"], stamp.get("routing") or {}
        cells = "; ".join(
            f"{a['min']:.3f}/{a['max']:.3f}, CV {a['cv']:.2f}, {a['below_half_even']}" for a in alloc.values()
        ) or ("as trained" if run.evaluate_of else "dense")
        lines.append(
            f"| {run.name} | done | {sc['bleu']:.2f} | {sc['chrf']:.2f} | "
            f"{_f(s.get('best_valid'))} ({s.get('best_update', '–')}) | {_f(s.get('final_valid'))} | "
            f"{_f(s.get('train_eval'))} | {_f(s.get('gap'), '{:+.3f}')} | {cells} |"
        )
    sigs = {(d[1]["score"]["bleu_signature"], d[1]["score"]["chrf_signature"]) for d in done.values()}
    lines += ["", *(f"sacrebleu: BLEU `{b}`, chrF `{c}`" for b, c in sorted(sigs))]
    lines += [
        "",
        "Mean over finished seeds:",
        "",
        "| group | seeds | BLEU | chrF | best valid | final valid | train (eval) | gap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups, source_group = {}, {}
    for run, stamp, s in done.values():
        groups.setdefault(run.group, []).append((stamp, s))
        if run.evaluate_of:
            source_group[run.group] = done[run.evaluate_of][0].group if run.evaluate_of in done else run.evaluate_of
    means = {}
    for g, items in groups.items():
        m = {k: statistics.mean(st["score"][k] for st, _ in items) for k in ("bleu", "chrf")}
        for k in ("best_valid", "final_valid", "train_eval", "gap"):  # a mean over every seed, or none
            m[k] = statistics.mean(s[k] for _, s in items) if all(k in s for _, s in items) else None
        means[g] = m
        losses = [_f(m["best_valid"]), _f(m["final_valid"]), _f(m["train_eval"]), _f(m["gap"], "{:+.3f}")]
        if g in source_group:
            losses = [f"as {source_group[g]}"] * 4
        lines.append(f"| {g} | {len(items)} | {m['bleu']:.2f} | {m['chrf']:.2f} | " + " | ".join(losses) + " |")
    lines += [
        "",
        "Paired bootstrap resampling (sacrebleu --paired-bs, 1000 resamples of the test sentences; p: that the "
        "difference comes from the choice of test sentences. It does not cover the training seed: compare the "
        "seed-against-seed rows):",
        "",
        "| baseline | system | BLEU base / sys | p | chrF base / sys | p |",
        "|---|---|---|---|---|---|",
    ]
    ref = out / "data" / "raw" / "test.en"
    for base, other in pairs(done):
        res = paired_bootstrap(ref, out / "runs" / base / "hyp.txt", [out / "runs" / other / "hyp.txt"])
        b, o = res[0], res[1]
        lines.append(
            f"| {base} | {other} | {b['BLEU']['score']:.2f} / {o['BLEU']['score']:.2f} | "
            f"{o['BLEU']['p_value']:.4f} | {b['chrF2']['score']:.2f} / {o['chrF2']['score']:.2f} | "
            f"{o['chrF2']['p_value']:.4f} |"
        )
    text = "\n".join(lines) + "\n"
    files.write_text_atomic(out / "results.md", text)
    files.write_json_atomic(out / "results.json", {n: {"stamp": st, "summary": s} for n, (_, st, s) in done.items()})
    plot(rows, means, plot_dir)
    print(text)


def pairs(done):
    """(baseline, system) run names to test: MoEC against MoE at the same E and seed; the E=32 ablations and the
    kept-mask evaluation against MoEC with all its parts, the training ablations also against MoE32 (which part of
    MoEC costs or gains over plain MoE); MoE and MoEC against dense at the same seed; every later seed against the
    first seed of its group (the same system: what the test calls significant when only the training seed
    differs)."""
    out = []
    for name, (run, _, _) in done.items():
        bases = [] if run.seed == 1 else [f"{run.group}-s1"]
        if run.group == f"moec{run.experts}":
            bases += [f"moe{run.experts}-s{run.seed}", f"dense-s{run.seed}"]
        elif run.group.startswith("moec32-"):
            bases += [f"moec32-s{run.seed}"] + ([] if run.evaluate_of else [f"moe32-s{run.seed}"])
        elif run.group == f"moe{run.experts}":
            bases += [f"dense-s{run.seed}"]
        out += [(base, name) for base in bases if base in done]
    return out


def plot(rows, means, plot_dir):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = {}
    for run, stamp, s in rows:
        if run.evaluate_of or not s["curve"]:
            continue
        color = colors.setdefault(run.group, f"C{len(colors)}")
        ax.plot(
            *zip(*s["curve"]),
            color=color,
            linestyle="-" if run.seed == 1 else "--",
            marker=".",
            label=run.name + ("" if stamp else " (unfinished)"),
        )
    ax.set(xlabel="update", ylabel="valid loss (bits, label-smoothed CE)", title="Valid loss, 8k-pair Bible es-en")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, plt, Path(plot_dir) / "study_v2_valid_loss.png")
    by_kind = {  # the finished main MoE and MoEC runs (their group is the kind and E; ablations are not)
        kind: [(run, stamp) for run, stamp, _ in rows if stamp and run.experts and run.group == f"{kind}{run.experts}"]
        for kind in ("moe", "moec")
    }
    if not any(by_kind.values()):
        return  # BLEU against E needs at least one finished MoE or MoEC run
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for kind, color, shift in (("moe", "C1", 0.96), ("moec", "C2", 1.04)):  # shift: the two kinds' seeds apart
        if not by_kind[kind]:
            continue
        pts = sorted({run.experts: means[run.group]["bleu"] for run, _ in by_kind[kind]}.items())
        ax.plot(*zip(*pts), marker="o", color=color, label=kind.upper() + " (mean over seeds)")
        seeds = [(run.experts * shift, stamp["score"]["bleu"]) for run, stamp in by_kind[kind]]
        # the spread between seeds, next to the differences between the means
        ax.scatter(*zip(*seeds), marker="x", s=30, color=color, label=kind.upper() + " (each seed)")
    if "dense" in means:
        ax.axhline(means["dense"]["bleu"], color="C0", linestyle=":", label="dense (mean)")
        for run, stamp, _ in rows:
            if stamp and run.group == "dense":
                ax.axhline(stamp["score"]["bleu"], color="C0", linestyle=":", linewidth=0.7, alpha=0.5)
    ax.set(
        xscale="log",
        xlabel="experts E",
        ylabel="test BLEU (best-valid checkpoint)",
        title="BLEU against E (thin dotted: each dense seed)",
    )
    ax.set_xticks([8, 32], ["8", "32"])
    ax.set_xlim(5, 50)  # both E values inside the frame, even while only one has runs
    ax.minorticks_off()
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, fontsize=8)  # below: never on a point
    _save(fig, plt, Path(plot_dir) / "study_v2_bleu_vs_experts.png")


def _save(fig, plt, path):
    fig.tight_layout()
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
