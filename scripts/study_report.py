"""The report of scripts/study.py: fairseq json logs -> per-run numbers, the tables of results.md, sacrebleu's paired
bootstrap tests (v2), the seed-aware paired bootstrap (v3), and the plots. Only finished runs (a DONE stamp) get
numbers; the others are listed with their state."""

import hashlib
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from fairseq_moec.analysis.plots import pyplot
from fairseq_moec.pipeline import files, machine, scores
from fairseq_moec.pipeline.logs import parse_log

# v3's records of its two decisions, in the study's work directory: written by study.py, read here
CHOICE, DECISION = "confirm_choice.json", "upper_decision.json"
SIGNIFICANCE = 0.05  # "MoEC beats MoE": higher mean BLEU and a seed-aware p below this
RESAMPLES = 10000  # of the seed-aware bootstrap: p near 0.05 to about +-0.005 (1,000 took 0.07 s at 966 lines)
TGT_LANG = "en"  # the study's target language: sacrebleu's BLEU tokenizer for it (13a), as in score.json
CO_ROUTING_LOG = re.compile(r"^moe_(\w+)_co_routing$")
LAYER_NAME = re.compile(r"^(enc|dec)(\d+)$")


def layer_order(name):
    """Encoder layers before decoder layers, each by index, as fairseq_moec.analyze lists them (fairseq's logs
    sort their keys alphabetically: dec1 before enc1)."""
    m = LAYER_NAME.match(name)
    return (m.group(1) == "dec", int(m.group(2)), "") if m else (True, 0, name)


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
    logged = [r for r in recs["train_inner"] if any(CO_ROUTING_LOG.match(k) for k in r)]
    if logged:  # the plugin logs co-routing per MoE layer with G > 1 (since e48432a): its last training values
        r = logged[-1]
        keys = {m.group(1): k for k in r if (m := CO_ROUTING_LOG.match(k))}  # layer name -> its log key
        s["co_routing_log"] = {
            name: {"rate": float(r[k]), "chance": float(r[f"{k}_chance"]), "update": int(float(r["num_updates"]))}
            for name, k in sorted(keys.items(), key=lambda item: layer_order(item[0]))
        }
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


def co_routing(summary):
    """Per MoE layer of fairseq_moec.analyze's summary.json: the share of tokens whose two most probable experts
    are in one cluster, its chance level (m - 1) / (E - 1), and G; None for a layer without clusters (G = 1,
    where both are 1)."""
    return {
        name: {
            "rate": layer["co_routing_rate"],
            "chance": layer["co_routing_chance"],
            "clusters": layer["num_clusters"],
        }
        if layer.get("num_clusters", 1) > 1
        else None
        for name, layer in summary["layers"].items()
    }


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
        if missing:
            return "done, without train_eval.json (the next run of the driver adds it)"
        return done_state(json.loads((rdir / "DONE").read_text()))
    s = summarize(rdir / "train.log")
    return f"trained to update {s['last_update']} of {updates}" if s["last_update"] else "not started"


def done_state(stamp):
    """'done', or for a run imported from another study's export, where from and at which commit."""
    imported = stamp.get("imported")
    return f"done (imported from v2 at {str(imported['commit'])[:7]})" if imported else "done"


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
    for path in [Path("data") / "DONE", Path("data") / "raw" / "test.en", Path(CHOICE), Path(DECISION)] + [
        Path("runs") / r.name / f for r in runs if (out / "runs" / r.name / "DONE").exists() for f in EXPORTED
    ]:
        if (out / path).exists():
            with files.atomic_path(dest / path) as tmp:
                shutil.copyfile(out / path, tmp)
            copied.append(str(path))
    return copied


def run_rows(out, runs):
    """(run, DONE stamp or None, summarize() with the co-routing of routing/summary.json when there is one) per RUN,
    in order. An evaluation-only entry gets its source run's summary."""
    rows = []
    for run in runs:
        rdir = out / "runs" / run.name
        trained = out / "runs" / (run.evaluate_of or run.name)
        s = summarize(trained / "train.log", trained / "train_eval.json")
        if (trained / "routing" / "summary.json").exists():
            s["co_routing"] = co_routing(json.loads((trained / "routing" / "summary.json").read_text()))
        rows.append((run, json.loads((rdir / "DONE").read_text()) if (rdir / "DONE").exists() else None, s))
    return rows


INTRO = (
    "Every run: {updates} updates; BLEU/chrF of the best-valid checkpoint on all test lines "
    "(all experts unless stated); valid loss in bits (label-smoothed CE); train (eval) = the same loss of the "
    "last checkpoint on the training data in eval mode (no dropout, all experts; fairseq-validate); "
    "gap = final valid - train (eval); allocation of the final model over 2,000 training sentences "
    "(per MoE layer: min / max token share, CV, experts below 1/(2E)); co-routing = the share of those tokens "
    "whose two most probable experts are in one cluster, against its chance level (m - 1)/(E - 1) in brackets "
    "(per MoE layer, G = 1: no clusters); in training: its last logged value over the surviving experts, chance "
    "(m' - 1)/(E' - 1) (logged since commit e48432a, so not in v2's logs)."
)
TABLE_HEAD = [
    "| run | state | BLEU | chrF | best valid (update) | final valid | train (eval) | gap | allocation enc / dec "
    "| co-routing enc; dec (chance) | in training, last log |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
]


def _co_routing_cells(run, s):
    """The table's two co-routing cells: the final model's (routing/summary.json) and the training log's."""
    if not run.experts:
        return "dense", "dense"
    layers = s.get("co_routing")
    final = (
        "–"
        if layers is None
        else "; ".join("G = 1" if c is None else f"{c['rate']:.3f} ({c['chance']:.3f})" for c in layers.values())
    )
    logged = s.get("co_routing_log")
    last = (
        "; ".join(f"{c['rate']:.3f} ({c['chance']:.3f})" for c in logged.values())
        + f" at {max(c['update'] for c in logged.values())}"
        if logged
        else "–"
    )
    return final, last


def runs_table(out, rows, updates, hidden=()):
    """The lines of the per-run table; HIDDEN: names of finished runs whose test scores wait for the choice."""
    lines = list(TABLE_HEAD)
    for run, stamp, s in rows:
        if not stamp:
            lines.append(f"| {run.name} | {state(out / 'runs' / run.name, run.updates or updates)} |" + " – |" * 9)
            continue
        if run.evaluate_of:  # another way to translate with a model of the table: its losses and routing are there
            same = f"as {run.evaluate_of}"
            lines.append(
                f"| {run.name} | done | {stamp['score']['bleu']:.2f} | {stamp['score']['chrf']:.2f} | "
                + " | ".join([same] * 7)
                + " |"
            )
            continue
        sc, alloc = stamp["score"], stamp.get("routing") or {}
        cells = "; ".join(
            f"{a['min']:.3f}/{a['max']:.3f}, CV {a['cv']:.2f}, {a['below_half_even']}" for a in alloc.values()
        ) or ("as trained" if run.evaluate_of else "dense")
        bleu, chrf = ("after the choice",) * 2 if run.name in hidden else (f"{sc['bleu']:.2f}", f"{sc['chrf']:.2f}")
        lines.append(
            f"| {run.name} | {done_state(stamp)} | {bleu} | {chrf} | "
            f"{_f(s.get('best_valid'))} ({s.get('best_update', '–')}) | {_f(s.get('final_valid'))} | "
            f"{_f(s.get('train_eval'))} | {_f(s.get('gap'), '{:+.3f}')} | {cells} | "
            + " | ".join(_co_routing_cells(run, s))
            + " |"
        )
    return lines


def signature_lines(done):
    sigs = {(st["score"]["bleu_signature"], st["score"]["chrf_signature"]) for _, st, _ in done}
    return [f"sacrebleu: BLEU `{b}`, chrF `{c}`" for b, c in sorted(sigs)]


def write(out, runs, updates, plot_dir):
    """Study v2's results.md, results.json and plots."""
    rows = run_rows(out, runs)
    done = {run.name: (run, stamp, s) for run, stamp, s in rows if stamp}
    lines = [INTRO.format(updates=updates), "", *runs_table(out, rows, updates)]
    lines += ["", *signature_lines(done.values())]
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


# --- seed-aware significance (v3) ----------------------------------------------------------------------------------
def study_metrics():
    """sacrebleu's BLEU (the target language's tokenizer) and chrF2, with the settings of every score.json."""
    from sacrebleu.metrics import CHRF

    return {"BLEU": scores.bleu_metric(TGT_LANG), "chrF2": CHRF()}


def sentence_stats(metric, hyps, refs):
    """sacrebleu's per-sentence sufficient statistics of METRIC (BLEU or chrF) for HYPS against REFS (one reference
    each): an [N, F] integer array. The corpus score of any multiset of sentences is METRIC's score of the sum of
    their rows, which is how sacrebleu's own paired bootstrap resamples."""
    return np.array(metric._extract_corpus_statistics(hyps, [refs]), dtype=np.int64)


def corpus_scores(metric, stats, counts):
    """METRIC's corpus score of each system of STATS ([k, N, F]) on each resample of COUNTS ([R, N]: how often
    each sentence is drawn): [R, k]."""
    totals = np.einsum("rn,knf->rkf", counts, stats)
    return np.array([[metric._compute_score_from_stats(t.tolist()).score for t in row] for row in totals])


def seed_aware_bootstrap(metric, base, system, resamples=RESAMPLES, seed=12345):
    """Two-level paired bootstrap of SYSTEM against BASE, each an [k, N, F] array of sentence_stats with one row
    per training seed (k may differ). Each resample draws k seeds with replacement within each system, and N test
    sentences with replacement, the same sentences for both systems; a system's score is the mean, over its drawn
    seeds, of the corpus score of that seed's hypotheses on the drawn sentences. The seeds of the two systems are
    drawn independently: a seed number means nothing across models. p: twice the share of resamples whose
    difference (system - base) is 0 or of the other sign than the observed one, with sacrebleu's +1, at most 1
    (1 when the observed difference is 0). With one seed a side it is the sentence-only paired bootstrap.
    Returns {base, system (means over seeds on all sentences), diff, low, high (2.5 and 97.5 percentiles of the
    resampled differences), p, resamples, seeds, diffs (the resampled differences)}."""
    rng = np.random.default_rng(seed)
    n = base.shape[1]
    if system.shape[1] != n:
        raise ValueError(f"{base.shape[1]} and {system.shape[1]} sentences: the systems must share the test set")
    counts = np.zeros((resamples, n), dtype=np.int64)
    np.add.at(counts, (np.arange(resamples)[:, None], rng.integers(0, n, size=(resamples, n))), 1)
    means = []
    for stats in (base, system):
        drawn = rng.integers(0, len(stats), size=(resamples, len(stats)))
        means.append(np.take_along_axis(corpus_scores(metric, stats, counts), drawn, axis=1).mean(axis=1))
    diffs = means[1] - means[0]
    observed = [statistics.mean(per_seed_scores(metric, stats)) for stats in (base, system)]
    diff = observed[1] - observed[0]
    other = np.count_nonzero(diffs <= 0 if diff > 0 else diffs >= 0)
    return {
        "base": observed[0],
        "system": observed[1],
        "diff": diff,
        "low": float(np.percentile(diffs, 2.5)),
        "high": float(np.percentile(diffs, 97.5)),
        "p": 1.0 if diff == 0 else min(1.0, 2 * (other + 1) / (resamples + 1)),
        "resamples": resamples,
        "seeds": [len(base), len(system)],
        "diffs": diffs,
    }


def per_seed_scores(metric, stats):
    """METRIC's corpus score of each seed's hypotheses ([k, N, F] stats) on all sentences."""
    return [metric._compute_score_from_stats(seed_stats.sum(axis=0).tolist()).score for seed_stats in stats]


def welch_p(base, system):
    """Welch's t-test (scipy) of two lists of per-seed scores: p, or None with fewer than 2 seeds a side or
    without spread."""
    if min(len(base), len(system)) < 2:
        return None
    from scipy import stats

    with warnings.catch_warnings():  # scipy warns of precision loss when a side's scores are all equal
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(stats.ttest_ind(system, base, equal_var=False).pvalue)
    return p if math.isfinite(p) else None


def compare_groups(out, base, system, metric_name, cache=None):
    """The seed-aware test of METRIC_NAME ('BLEU' or 'chrF2') between two groups of finished runs (lists of Run;
    their OUT/runs/NAME/hyp.txt against OUT/data/raw/test.en), the Welch t-test on their per-seed scores as a
    cross-check, and for contrast the sentence-only paired bootstrap of each seed both groups have. CACHE: a dict
    that keeps sentence statistics between calls. JSON-ready."""
    cache = {} if cache is None else cache
    metric = study_metrics()[metric_name]
    refs = files.read_lines(out / "data" / "raw" / "test.en")

    def stats(run):
        key = (metric_name, run.name)
        if key not in cache:
            cache[key] = sentence_stats(metric, files.read_lines(out / "runs" / run.name / "hyp.txt"), refs)
        return cache[key]

    sides = [np.stack([stats(r) for r in runs]) for runs in (base, system)]
    result = seed_aware_bootstrap(metric, *sides)
    del result["diffs"]
    per_seed = [per_seed_scores(metric, side) for side in sides]
    by_seed = [{r.seed: i for i, r in enumerate(runs)} for runs in (base, system)]
    common = sorted(set(by_seed[0]) & set(by_seed[1]))
    result.update(
        metric=metric_name,
        runs=[[r.name for r in runs] for runs in (base, system)],
        per_seed=per_seed,
        sd=[statistics.stdev(x) if len(x) > 1 else None for x in per_seed],
        p_welch=welch_p(*per_seed),
        p_sentences_only=[
            [s, seed_aware_bootstrap(metric, sides[0][[by_seed[0][s]]], sides[1][[by_seed[1][s]]])["p"]] for s in common
        ],
    )
    return result


# --- study v3 ------------------------------------------------------------------------------------------------------
def write_v3(out, runs, updates, plot_dir):
    """Study v3's results.md, results.json and the valid-loss plot: the screening, the choice (OUT/CHOICE), the
    confirmation with seed-aware tests, the E = 64 decision (OUT/DECISION) and runs. Until the choice is on disk
    the screening candidates' test scores are neither shown nor copied into results.json."""
    choice, decision = (json.loads((out / f).read_text()) if (out / f).exists() else None for f in (CHOICE, DECISION))
    rows = run_rows(out, runs)
    hidden = set() if choice else {run.name for run in runs if run.candidate}
    by_stage = {stage: [row for row in rows if row[0].stage == stage] for stage in ("screen", "confirm", "upper")}
    lines = [INTRO.format(updates=updates), "", "## Screening: E = 32, G = 4, seed 1", ""]
    lines += runs_table(out, by_stage["screen"], updates, hidden)
    lines += ["", "## The choice", "", *_choice_lines(choice, rows)]
    tests = []
    if choice:
        lines += ["", "## Confirmation: seeds 1-3", "", "Seed 1 of each group is in the screening table.", ""]
        lines += runs_table(out, by_stage["confirm"], updates)
        groups = [choice["group"], choice["moe_counterpart"], "dense"]
        members = {g: [row for row in rows if row[0].group == g] for g in groups}
        lines += ["", *_means_lines(members)]
        # MoEC against MoE (the decision's test), each against dense
        comparisons = [(groups[1], groups[0]), (groups[2], groups[0]), (groups[2], groups[1])]
        test_lines, tests = _confirmation_tests(out, members, comparisons)
        lines += ["", *test_lines]
        lines += ["", "## Upper bound: E = 64, seed 1", "", *_upper_lines(out, decision, by_stage["upper"], updates)]
    done = [row for row in rows if row[1]]
    lines += ["", *signature_lines(done)]
    text = "\n".join(lines) + "\n"
    files.write_text_atomic(out / "results.md", text)
    results = {
        run.name: {
            "stamp": {k: v for k, v in stamp.items() if k != "score"} if run.name in hidden else stamp,
            "summary": s,
        }
        for run, stamp, s in done
    }
    files.write_json_atomic(out / "results.json", {"runs": results, "choice": choice, "tests": tests})
    plot(rows, {}, plot_dir, prefix="study_v3", bleu_vs_experts=False)
    print(text)


def _choice_lines(choice, rows):
    if not choice:
        candidates = [stamp for run, stamp, _ in rows if run.candidate]
        return [
            f"Not made yet: {sum(1 for stamp in candidates if stamp)} of {len(candidates)} candidates finished. "
            f"Their test scores are shown once {CHOICE} is written (from the training logs alone, when every "
            "candidate is done)."
        ]
    return [
        f"**{choice['chosen']}**, to be confirmed against {choice['moe_counterpart']} and dense ({CHOICE}, written "
        f"{choice['written']}). Rule: {choice['rule']}.",
        "",
        "| candidate | best valid (update) |",
        "|---|---|",
        *(f"| {c['run']} | {c['best_valid']:.3f} ({c['best_update']}) |" for c in choice["candidates"]),
    ]


def _pm(values, fmt):
    """mean ± sd of VALUES (sd over seeds, n - 1), '–' when a value is missing."""
    if not values or any(v is None for v in values):
        return "–"
    sd = f" ± {fmt.format(statistics.stdev(values)).lstrip('+')}" if len(values) > 1 else ""
    return fmt.format(statistics.mean(values)) + sd


def _means_lines(members):
    """Mean ± sd over the finished seeds of each group of MEMBERS ({group: rows})."""
    lines = [
        "Mean ± sd over seeds (sd with n - 1):",
        "",
        "| group | seeds done | BLEU | chrF | best valid | final valid | train (eval) | gap |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g, rows in members.items():
        fin = [(stamp, s) for _, stamp, s in rows if stamp]
        cells = [_pm([st["score"][k] for st, _ in fin], "{:.2f}") for k in ("bleu", "chrf")]
        cells += [_pm([s.get(k) for _, s in fin], "{:.3f}") for k in ("best_valid", "final_valid", "train_eval")]
        cells.append(_pm([s.get("gap") for _, s in fin], "{:+.3f}"))
        lines.append(f"| {g} | {len(fin)} of {len(rows)} | " + " | ".join(cells) + " |")
    return lines


def _confirmation_tests(out, members, comparisons):
    """The seed-aware tests of each (baseline, system) group pair once all their seeds are done: (lines, results)."""
    lines = [
        f"Seed-aware paired bootstrap ({RESAMPLES} resamples; each draws the seeds of each system with replacement "
        "and the test sentences with replacement, the same sentences for both systems, and scores a system by the "
        "mean over its drawn seeds of sacrebleu's corpus score on the drawn sentences; p two-sided). Welch's t-test "
        "on the per-seed scores as a cross-check; the sentence-only paired bootstrap of the runs with the same "
        "seed for contrast (it does not cover the seed: study v2, finding 1):",
        "",
        "| baseline | system | metric | base / sys (mean of seeds) | difference [95% interval] | p (seeds and "
        "sentences) | p (Welch) | p (sentences only, per seed) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    results, cache = [], {}
    for base, system in comparisons:
        if not all(stamp for g in (base, system) for _, stamp, _ in members[g]):
            lines.append(f"| {base} | {system} | | waits for every seed of both | | | | |")
            continue
        for metric in ("BLEU", "chrF2"):
            t = compare_groups(out, *([row[0] for row in members[g]] for g in (base, system)), metric, cache)
            results.append(t)
            welch = "–" if t["p_welch"] is None else f"{t['p_welch']:.4f}"
            lines.append(
                f"| {base} | {system} | {metric} | {t['base']:.2f} / {t['system']:.2f} | {t['diff']:+.2f} "
                f"[{t['low']:+.2f}, {t['high']:+.2f}] | {t['p']:.4f} | {welch} | "
                + ", ".join(f"s{seed} {p:.4f}" for seed, p in t["p_sentences_only"])
                + " |"
            )
    return lines, results


def _upper_lines(out, decision, rows, updates):
    if not decision:
        return [f"Decided when the confirmation is done ({DECISION})."]
    verdict = "beats" if decision["beats"] else "does not beat"
    lines = [
        f"{decision['moec']} {verdict} {decision['moe']}: BLEU {decision['system']:.2f} against "
        f"{decision['base']:.2f} (means of seeds), p = {decision['p']:.4f} ({DECISION}; rule: {decision['rule']}). "
        + ("E = 64 for both, one seed:" if decision["beats"] else "So E = 64 is not run.")
    ]
    if decision["beats"]:
        lines += ["", *runs_table(out, rows, updates)]
        scores_64 = [stamp["score"]["bleu"] for _, stamp, _ in rows if stamp]
        if len(scores_64) == 2:  # the MoEC run first (study.upper)
            lines += [
                "",
                f"MoEC - MoE at E = 64, one seed: {scores_64[0] - scores_64[1]:+.2f} BLEU; at E = 32, mean of "
                f"seeds: {decision['diff']:+.2f}.",
            ]
    return lines


# --- the upcycling experiment (issue 24) --------------------------------------------------------------------------
UPCYCLE_PAIRS = (  # (baseline, system): each upcycled arm against dense continued, MoEC against MoE, and the base
    ("upc-dense-cont-s1", "upc-moe32-s1"),
    ("upc-dense-cont-s1", "upc-moec32-s1"),
    ("upc-moe32-s1", "upc-moec32-s1"),
    ("upc-dense-base-s1", "upc-dense-cont-s1"),
)
V2_SPREAD_GROUPS = ("dense", "moe32", "moec32")  # their seeds 1-2 in study v2's export: the seed spread
UPCYCLE_INTRO = (
    "Sparse upcycling (issue 24). upc-dense-base-s1: dense, seed 1, {base} updates (the row 'dense at {base}'). "
    "Its checkpoint_last.pt (update {base}) starts every continuation: {cont} more updates each with the study's "
    "dense settings and schedule, restarted (--finetune-from-model: optimizer, lr schedule, meters and data order "
    "reset), equal but for the model: upc-dense-cont-s1 the dense model itself; upc-moe32-s1 and upc-moec32-s1 the "
    "base upcycled (python -m fairseq_moec.upcycle; every expert a copy of the dense FFN, router init 'random', "
    "upcycle's default: a new model's router, seeded by --seed 1; no expert noise) to the study's moe32 and "
    "moec32 models, trained with their flags. Evaluation as in every study run: "
)


def v2_seed_spread(v2_dir):
    """Per group of V2_SPREAD_GROUPS, study v2's test BLEU and chrF of seeds 1-2 (runs/NAME/score.json of its
    export): the values, sd (n - 1) and range. Groups with a missing seed are left out."""
    spread = {}
    for group in V2_SPREAD_GROUPS:
        found = [Path(v2_dir) / "runs" / f"{group}-s{s}" / "score.json" for s in (1, 2)]
        if not all(f.exists() for f in found):
            continue
        scores_ = [json.loads(f.read_text()) for f in found]
        spread[group] = {
            metric: {
                "values": [sc[metric] for sc in scores_],
                "sd": statistics.stdev([sc[metric] for sc in scores_]),
                "range": max(sc[metric] for sc in scores_) - min(sc[metric] for sc in scores_),
            }
            for metric in ("bleu", "chrf")
        }
    return spread


def write_upcycle(out, runs, v2_dir):
    """The upcycling experiment's results.md and results.json: the runs' table, starts, updates and training
    wall time, sacrebleu's paired bootstrap for UPCYCLE_PAIRS, and the differences read against study v2's seed
    spread."""
    rows = run_rows(out, runs)
    done = {run.name: (run, stamp, s) for run, stamp, s in rows if stamp}
    base = next((r.updates for r in runs if not r.finetune_from), 0)
    cont = next((r.updates for r in runs if r.finetune_from), 0)
    intro = UPCYCLE_INTRO.format(base=base, cont=cont) + INTRO.split("; ", 1)[1]
    lines = [intro, "", *runs_table(out, rows, base)]
    lines += [
        "",
        "| run | starts from | updates | training wall time (s, the last session that trained it) |",
        "|---|---|---|---|",
    ]
    for run, stamp, _ in rows:
        start = "random init" if not run.finetune_from else f"{run.finetune_from} checkpoint_last.pt"
        if run.upcycled:
            start += ", upcycled (upcycled.pt)"
        wall = stamp.get("train_wall_s_last_session") if stamp else None
        lines.append(f"| {run.name} | {start} | {run.updates} | {'–' if wall is None else wall} |")
    lines += ["", *signature_lines(done.values())]
    lines += [
        "",
        "Paired bootstrap resampling (sacrebleu --paired-bs, 1000 resamples of the test sentences; it does not "
        "cover the training seed, see below):",
        "",
        "| baseline | system | BLEU base / sys | p | chrF base / sys | p |",
        "|---|---|---|---|---|---|",
    ]
    ref = out / "data" / "raw" / "test.en"
    tests = []
    for b_name, s_name in UPCYCLE_PAIRS:
        if b_name not in done or s_name not in done:
            lines.append(f"| {b_name} | {s_name} | waits for both runs | | | |")
            continue
        res = paired_bootstrap(ref, out / "runs" / b_name / "hyp.txt", [out / "runs" / s_name / "hyp.txt"])
        b, o = res[0], res[1]
        tests.append({"baseline": b_name, "system": s_name, "sacrebleu": res})
        lines.append(
            f"| {b_name} | {s_name} | {b['BLEU']['score']:.2f} / {o['BLEU']['score']:.2f} | "
            f"{o['BLEU']['p_value']:.4f} | {b['chrF2']['score']:.2f} / {o['chrF2']['score']:.2f} | "
            f"{o['chrF2']['p_value']:.4f} |"
        )
    spread = v2_seed_spread(v2_dir)
    lines += ["", *_spread_lines(done, spread)]
    text = "\n".join(lines) + "\n"
    files.write_text_atomic(out / "results.md", text)
    files.write_json_atomic(
        out / "results.json",
        {
            "runs": {n: {"stamp": st, "summary": s} for n, (_, st, s) in done.items()},
            "tests": tests,
            "v2_seed_spread": spread,
        },
    )
    print(text)


def _spread_lines(done, spread):
    """The upcycling differences next to study v2's seed-to-seed differences (seeds 1-2, one model each)."""
    if not spread:
        return ["Study v2's seed spread: not found (docs/study-v2/runs/*/score.json)."]
    cells = "; ".join(
        f"{g} {sp['bleu']['values'][0]:.2f} / {sp['bleu']['values'][1]:.2f} (sd {sp['bleu']['sd']:.2f}, range "
        f"{sp['bleu']['range']:.2f} BLEU; chrF range {sp['chrf']['range']:.2f})"
        for g, sp in spread.items()
    )
    widest = max(sp["bleu"]["range"] for sp in spread.values())
    lines = [
        f"Against the seed: study v2's test BLEU of seeds 1 / 2 (same settings, only the seed differs): {cells}. "
        f"A difference here within {widest:.2f} BLEU (v2's widest seed-to-seed range) is no larger than what the "
        "training seed alone gave there; this experiment has one seed per arm."
    ]
    for b_name, s_name in UPCYCLE_PAIRS[:3]:
        if b_name in done and s_name in done:
            diff = done[s_name][1]["score"]["bleu"] - done[b_name][1]["score"]["bleu"]
            verdict = "within" if abs(diff) <= widest else "beyond"
            lines.append(f"- {s_name} - {b_name}: {diff:+.2f} BLEU, {verdict} v2's seed range ({widest:.2f})")
    return lines


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


def plot(rows, means, plot_dir, prefix="study_v2", bleu_vs_experts=True):
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
            linestyle=("-", "--", ":")[(run.seed - 1) % 3],
            marker=".",
            label=run.name + ("" if stamp else " (unfinished)"),
        )
    ax.set(xlabel="update", ylabel="valid loss (bits, label-smoothed CE)", title="Valid loss, 8k-pair Bible es-en")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    _save(fig, plt, Path(plot_dir) / f"{prefix}_valid_loss.png")
    if not bleu_vs_experts:
        return
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
    _save(fig, plt, Path(plot_dir) / f"{prefix}_bleu_vs_experts.png")


def _save(fig, plt, path):
    fig.tight_layout()
    with files.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
