#!/usr/bin/env python3
"""Limited-data study (docs/study.md): dense vs MoE vs MoEC on a subset of the bundled Bible es-en corpus, at a
scale where the models translate. Equal updates for every run; one training process at a time.

    python scripts/study.py                        # study v3: screening, the choice, confirmation, E = 64, report
    python scripts/study.py --stage confirm        # one stage of v3 (screen, confirm, upper)
    python scripts/study.py --only official32-s1   # some runs (names as in `--list`)
    python scripts/study.py --list                 # the plan and the state of every run
    python scripts/study.py --report-only          # rewrite results.md/json and the plots from what is on disk
    python scripts/study.py --plan v2              # study v2, as it ran (work/study_v2)
    python scripts/study.py --plan upcycle         # issue 24's sparse upcycling experiment (work/study_upcycle)

The same command again continues where it stopped: the data step and every run write their outputs under
temporary names and a stamp last; an interrupted training resumes from checkpoint_last.pt. Runs use the CPU,
or CUDA when it is available (`--device`).

Per run (OUT/runs/NAME): train.log (fairseq json log), checkpoints/checkpoint_{best,last}.pt, the test
translations of the best-valid checkpoint (hyp.txt, every one of the 966 lines, sacrebleu BLEU/chrF in
score.json), the routing of the last checkpoint over training sentences (routing/summary.json), the loss of the
last checkpoint on the training data in eval mode (train_eval.json: fairseq-validate, no dropout, all experts; the
report's gap), DONE (json). A finished run without train_eval.json gets it when the driver runs again.
v2's evaluation-only entry (moec32-s1-keepmask) translates with the training-time cluster-dropout mask kept.

v3 (docs/study.md): a screening of MoEC settings at E = 32, G = 4, seed 1; the best MoEC of the screening by
valid loss (OUT/confirm_choice.json, written from the training logs alone when every candidate is done); it, its
MoE counterpart and dense with seeds 1-3; E = 64 for both only when MoEC beats MoE (OUT/upper_decision.json).
A v3 run whose training command equals a finished v2 run's (docs/study-v2/runs/NAME, up to the places it ran
from) is imported from there instead of trained again; its DONE says so.
"""

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import study_report

from fairseq_moec.pipeline import binarize, files, hypotheses, machine, scores, small_model
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
    extra_args: tuple = ()  # flags beyond the study's defaults, appended to the training command
    seed: int = 1
    evaluate_of: str = ""
    inference_experts: str = "all"
    stage: str = ""  # v3: screen, confirm or upper
    candidate: bool = False  # v3: a MoEC run of the screening, one of those the choice picks from
    family: str = ""  # v3: the key of its Family in FAMILIES
    updates: int = 0  # --max-update of this run; 0: the study's (--updates)
    finetune_from: str = ""  # upcycle plan: the run whose checkpoint_last.pt this run starts from
    upcycled: bool = False  # upcycle plan: that checkpoint upcycled to this run's MoE model first (upcycled.pt)


NO_CLUSTERS = ("--moe-cluster-weight", "0")


def plan_v2(seeds=(1, 2)):
    """Study v2: main runs for every seed, then the E=32 ablations (first seed only). MoE runs turn every
    cluster feature off; MoEC runs use the defaults (cluster weight 0.01 on the relative scale) with clusters of
    the paper's size (8) where E allows and at least 2 clusters, and cluster dropout 0.5 as the paper."""
    runs = []
    for seed in seeds:
        runs.append(Run(f"dense-s{seed}", "dense", seed=seed))
        for e in (32, 8):
            g = max(2, e // 8)
            runs.append(Run(f"moe{e}-s{seed}", f"moe{e}", e, 1, 0.0, NO_CLUSTERS, seed))
            runs.append(Run(f"moec{e}-s{seed}", f"moec{e}", e, g, 0.5, (), seed))
        if seed == seeds[0]:
            s = seeds[0]
            runs += [
                Run(f"moec32-lossonly-s{s}", "moec32-lossonly", 32, 4, 0.0, (), s),
                Run(f"moec32-droponly-s{s}", "moec32-droponly", 32, 4, 0.5, NO_CLUSTERS, s),
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


# --- study v3 ----------------------------------------------------------------------------------------------------
# The official MoEC code's recipe as one set of flags, as docs/method.md ("The official recipe as a whole") gives it
# (a test keeps the two equal); the run adds the paper's cluster dropout 0.5 and the study's clusters of 8.
OFFICIAL_RECIPE = (
    "--moe-router",
    "cosine",
    "--moe-gate",
    "sigmoid",
    "--moe-loss-temperature",
    "0.07",
    "--moe-cluster-loss",
    "intra",
    "--moe-cluster-loss-norm",
    "official",
    "--moe-cluster-weight",
    "0.01",
    "--cluster-dropout-reroute",
    "global",
    "--clip-norm",
    "0.1",
)
# the flags of the recipe that act only on clusters: its MoE twin keeps the router, the gate and the clipping
CLUSTER_FLAGS = ("--moe-cluster-loss", "--moe-cluster-loss-norm", "--moe-cluster-weight", "--cluster-dropout-reroute")


def without(flags, names):
    """FLAGS (name, value pairs in a flat tuple) without the flags in NAMES and their values."""
    pairs = zip(flags[::2], flags[1::2])
    return tuple(x for name, value in pairs if name not in names for x in (name, value))


OFFICIAL_TWIN = without(OFFICIAL_RECIPE, CLUSTER_FLAGS) + NO_CLUSTERS
# the token loss at the plugin's default weight, the scale at which the small training run of
# tests/test_token_cluster_loss.py forms clusters quickly (1.0), and the decade between: 100x in all
TOKEN_WEIGHTS = ("0.01", "0.1", "1")
INTRA_WEIGHTS = ("0.1", "1")  # 10x and 100x intra's default 0.01, which is v2's moec32 (imported)
SCREEN_EXPERTS, UPPER_EXPERTS = 32, 64
CONFIRM_SEEDS = (1, 2, 3)


@dataclasses.dataclass(frozen=True)
class Family:
    """A training setting at any E and seed; runs are named STEM E SUFFIX -sSEED (token32-w0.1-s1, dense-s2)."""

    stem: str
    suffix: str = ""
    clustered: bool = False  # MoEC: clusters of 8 (at least 2) and cluster dropout 0.5; else MoE with G = 1
    args: tuple = ()
    twin: str = ""  # a MoEC family: the key of its MoE counterpart (same router, gate and clipping)

    @property
    def key(self):
        return self.stem + self.suffix

    def group(self, experts):
        return f"{self.stem}{experts or ''}{self.suffix}"

    def run(self, experts, seed, stage):
        group = self.group(experts)
        clusters, dropout = (max(2, experts // 8), 0.5) if self.clustered else (1, 0.0)
        return Run(
            f"{group}-s{seed}",
            group,
            experts,
            clusters,
            dropout,
            self.args,
            seed,
            stage=stage,
            candidate=self.clustered and stage == "screen",
            family=self.key,
        )


FAMILIES = {
    f.key: f
    for f in (
        Family("dense"),
        Family("moe", args=NO_CLUSTERS),
        Family("moec", clustered=True, twin="moe"),  # intra at its default weight: v2's MoEC
        Family("official", clustered=True, args=OFFICIAL_RECIPE, twin="official-moe"),
        Family("official-moe", args=OFFICIAL_TWIN),
        *(
            Family("token", f"-w{w}", True, ("--moe-cluster-loss", "token", "--moe-cluster-weight", w), "moe")
            for w in TOKEN_WEIGHTS
        ),
        *(Family("intra", f"-w{w}", True, ("--moe-cluster-weight", w), "moe") for w in INTRA_WEIGHTS),
    )
}


def screening():
    """E = 32, G = 4, seed 1: dense, MoE and v2's MoEC (imported), the official recipe and its MoE twin, the
    token loss at three weights, intra at 10x and 100x its default."""
    keys = ["dense", "moe", "moec", "official", "official-moe"]
    keys += [f"token-w{w}" for w in TOKEN_WEIGHTS] + [f"intra-w{w}" for w in INTRA_WEIGHTS]
    return [FAMILIES[k].run(0 if k == "dense" else SCREEN_EXPERTS, 1, "screen") for k in keys]


def confirmation(choice):
    """Seeds 1-3 of the chosen MoEC, of its MoE counterpart and of dense (seed 1 of each is a screening run)."""
    moec = FAMILIES[choice["family"]]
    keys = (moec.key, moec.twin, "dense")
    return [FAMILIES[k].run(0 if k == "dense" else SCREEN_EXPERTS, s, "confirm") for k in keys for s in CONFIRM_SEEDS]


def upper(choice):
    """E = 64 (G = 8), seed 1, of the chosen MoEC and its MoE counterpart."""
    moec = FAMILIES[choice["family"]]
    return [FAMILIES[k].run(UPPER_EXPERTS, 1, "upper") for k in (moec.key, moec.twin)]


CHOICE, DECISION = study_report.CHOICE, study_report.DECISION


def read_json(path):
    return json.loads(Path(path).read_text()) if Path(path).exists() else None


def plan_v3(out):
    """The runs of v3 known so far: the screening; the confirmation once OUT holds the choice; E = 64 once the
    decision says MoEC beats MoE. A run of two stages (the screening's seed 1) is listed once, at its first."""
    runs = screening()
    choice, decision = read_json(Path(out) / CHOICE), read_json(Path(out) / DECISION)
    if choice:
        runs += confirmation(choice)
    if choice and decision and decision["beats"]:
        runs += upper(choice)
    names = set()
    return [r for r in runs if not (r.name in names or names.add(r.name))]


# --- the upcycling experiment (issue 24) ----------------------------------------------------------------------
# 400 continuation updates: the base and three continuations fit one 3-hour session on this CPU
UPCYCLE_BASE, UPCYCLE_BASE_UPDATES, UPCYCLE_UPDATES = "upc-dense-base-s1", 1200, 400
UPCYCLED = "upcycled.pt"  # in the run directory of an upcycled arm: the base's checkpoint_last.pt, upcycled
# the flags of a training command that are MoE model options: what the upcycle step gives fairseq_moec.upcycle
UPCYCLE_MODEL_FLAGS = (
    "--moe-encoder-layers",
    "--moe-decoder-layers",
    "--moe-expert-count",
    "--moe-clusters",
    "--cluster-dropout",
    "--cluster-dropout-interval",
    "--moe-seed",
)


def plan_upcycle():
    """Issue 24: dense seed 1 to update 1200 (the base), then three continuations of 400 updates from its
    checkpoint_last.pt, equal but for the model: dense, and the base upcycled to the study's moe32 and moec32
    (their families' runs at E = 32, seed 1: v2's moe32-s1 and moec32-s1 settings) with upcycle's default router
    init. Each continuation is --finetune-from-model (optimizer, lr schedule, meters and data order restart)."""
    base = dataclasses.replace(
        FAMILIES["dense"].run(0, 1, "base"), name=UPCYCLE_BASE, group="upc-dense-base", updates=UPCYCLE_BASE_UPDATES
    )
    arms = [
        ("dense", 0, "upc-dense-cont"),
        ("moe", SCREEN_EXPERTS, "upc-moe32"),
        ("moec", SCREEN_EXPERTS, "upc-moec32"),
    ]
    runs = [base]
    for key, experts, group in arms:
        run = FAMILIES[key].run(experts, 1, "continue")
        runs.append(
            dataclasses.replace(
                run,
                name=f"{group}-s1",
                group=group,
                candidate=False,
                updates=UPCYCLE_UPDATES,
                finetune_from=UPCYCLE_BASE,
                upcycled=bool(experts),
            )
        )
    return runs


def base_checkpoint(run, rdir):
    """The checkpoint_last.pt of the run that RUN (in its run directory RDIR) continues from."""
    return Path(rdir).parent / run.finetune_from / "checkpoints" / "checkpoint_last.pt"


def start_checkpoint(run, rdir):
    """The file RUN starts from (--finetune-from-model): its upcycled.pt, or the base's checkpoint_last.pt."""
    return Path(rdir) / UPCYCLED if run.upcycled else base_checkpoint(run, rdir)


def upcycle_cmd(args, run, rdir):
    """python -m fairseq_moec.upcycle BASE/checkpoint_last.pt RDIR/upcycled.pt with the MoE model flags of RUN's
    own training command (placement, E, G, cluster dropout, the MoE seed) and upcycle's default router init
    (random, seeded by --seed = the run's seed)."""
    train = [str(c) for c in train_cmd(args, run, Path(args.out) / "data" / "bin", rdir)]
    model = [x for f in UPCYCLE_MODEL_FLAGS if f in train for x in (f, train[train.index(f) + 1])]
    base = base_checkpoint(run, rdir)
    return [sys.executable, "-m", "fairseq_moec.upcycle", str(base), str(Path(rdir) / UPCYCLED), *model] + [
        "--seed",
        str(run.seed),
    ]


def prepare_start(args, run, rdir):
    """Before RUN trains: its base must be done (its checkpoint_last.pt is the final one); an upcycled arm gets
    its upcycled.pt, unless it is there already (upcycle writes it atomically and refuses an existing file)."""
    ckpt = base_checkpoint(run, rdir)
    if not (ckpt.parents[1] / "DONE").exists() or not ckpt.exists():
        raise SystemExit(f"{run.name}: needs {ckpt} of the finished run {run.finetune_from}: run it first")
    if run.upcycled and not (Path(rdir) / UPCYCLED).exists():
        Path(rdir).mkdir(parents=True, exist_ok=True)
        with files.atomic_path(Path(rdir) / "upcycle.log") as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                sh(upcycle_cmd(args, run, rdir), stdout=f)


def plan(args):
    if args.plan == "upcycle":
        return plan_upcycle()
    return plan_v2(args.seeds) if args.plan == "v2" else plan_v3(args.out)


def choose(out, runs):
    """OUT/confirm_choice.json once every screening candidate is done: the MoEC run with the lowest best valid
    loss (that of checkpoint_best, from its train.log; ties: the earlier in the plan), the valid losses of all
    candidates, and the MoE counterpart. Only the training logs are read, no test score. Written once and kept:
    a later call returns it (refusing a plan whose candidates changed). None while candidates are unfinished."""
    path = Path(out) / CHOICE
    candidates = [r for r in runs if r.candidate]
    if path.exists():
        choice = json.loads(path.read_text())
        if sorted(c["run"] for c in choice["candidates"]) != sorted(r.name for r in candidates):
            raise SystemExit(f"{path} was chosen from other candidates than this plan's: remove it, or another --out")
        return choice
    if not all((Path(out) / "runs" / r.name / "DONE").exists() for r in candidates):
        return None
    losses = []
    for r in candidates:
        s = study_report.summarize(Path(out) / "runs" / r.name / "train.log")
        losses.append({"run": r.name, "best_valid": s["best_valid"], "best_update": s["best_update"]})

    def rank(i):  # a diverged run's nan ranks last (nan compares false with every number: min would keep it)
        loss = losses[i]["best_valid"]
        return (loss if math.isfinite(loss) else math.inf, i)

    order = sorted(range(len(losses)), key=rank)
    chosen, best = candidates[order[0]], order[0]
    choice = {
        "rule": "the screening's MoEC run with the lowest best valid loss (checkpoint_best, train.log), chosen "
        "before any of their test scores is read; ties: the earlier in the plan",
        "chosen": chosen.name,
        "group": chosen.group,
        "family": chosen.family,
        "moe_counterpart": FAMILIES[FAMILIES[chosen.family].twin].group(chosen.experts),
        "candidates": [losses[i] for i in order],
        "written": now(),
        "code_state": study_report.code_state(ROOT),
    }
    files.write_json_atomic(path, choice)
    log(f"the choice: {chosen.name} (best valid loss {losses[best]['best_valid']}), written to {path}")
    return choice


def decide(out, choice, runs):
    """OUT/upper_decision.json once every confirmation run is done: does the chosen MoEC beat its MoE counterpart
    (mean test BLEU over seeds 1-3 higher, and the seed-aware bootstrap's p < 0.05)? Kept once written. None
    while runs are unfinished."""
    path = Path(out) / DECISION
    if path.exists():
        return json.loads(path.read_text())
    by_group = {g: [r for r in runs if r.group == g] for g in (choice["moe_counterpart"], choice["group"])}
    if not all(len(rs) == len(CONFIRM_SEEDS) for rs in by_group.values()) or not all(
        (Path(out) / "runs" / r.name / "DONE").exists() for rs in by_group.values() for r in rs
    ):
        return None
    moe, moec = by_group.values()
    test = study_report.compare_groups(Path(out), moe, moec, "BLEU")
    beats = test["diff"] > 0 and test["p"] < study_report.SIGNIFICANCE
    decision = dict(test, moec=choice["group"], moe=choice["moe_counterpart"], beats=beats, written=now())
    decision["rule"] = (
        f"MoEC beats MoE: its mean test BLEU over seeds {CONFIRM_SEEDS[0]}-{CONFIRM_SEEDS[-1]} is higher and the "
        f"seed-aware paired bootstrap's p < {study_report.SIGNIFICANCE}"
    )
    files.write_json_atomic(path, decision)
    verdict = "beats" if beats else "does not beat"
    log(f"{choice['group']} {verdict} {choice['moe_counterpart']}: {test['diff']:+.2f} BLEU, p = {test['p']:.4f}")
    return decision


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
        + [("max-update", run.updates or args.updates), ("seed", run.seed), ("num-workers", "0")]
        + [("validate-interval-updates", args.valid_interval), ("validate-interval", "100000")]
        + [("save-interval-updates", args.valid_interval), ("save-interval", "100000")]
        + [("keep-interval-updates", "1"), ("no-epoch-checkpoints", None), ("best-checkpoint-metric", "loss")]
        + [("save-dir", rdir / "checkpoints"), ("log-format", "json"), ("log-interval", "25")]
        + [("log-file", rdir / "train.log"), ("no-progress-bar", None)]
        + ([("cpu", None)] if args.device == "cpu" else [])
        + ([("finetune-from-model", start_checkpoint(run, rdir))] if run.finetune_from else [])
    )
    if not run.experts:
        dense = [("task", DENSE_TASK[0]), ("arch", "transformer"), ("criterion", DENSE_TASK[1])]
        return cmd + flag_list(dense)
    moe = [("task", MOE_TASK[0]), ("arch", "moec_transformer")]
    moe += [("criterion", MOE_TASK[1]), ("moe-encoder-layers", "1")]
    moe += [("moe-decoder-layers", "1"), ("moe-expert-count", run.experts), ("moe-clusters", run.clusters)]
    moe += [("cluster-dropout", run.cluster_dropout), ("cluster-dropout-interval", args.dropout_interval)]
    moe += [("moe-seed", run.seed)]  # the seeds differ in their cluster-dropout masks too
    return cmd + flag_list(moe) + list(run.extra_args)


# --- data --------------------------------------------------------------------------------------------------------
def data_key(args):
    """What the data step's output depends on (its stamp's key)."""
    return {"train_pairs": args.train_pairs, "subset_seed": args.subset_seed, "vocab": args.vocab}


def prepare_data(args):
    """OUT/data: a seeded random training subset (kept in corpus order), all valid and test lines, a joint
    sentencepiece model trained on the subset only, fairseq-preprocess --joined-dictionary. Stamp: data/DONE."""
    d = Path(args.out) / "data"
    key = data_key(args)
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
    if import_v2(args, run, data):
        return
    if run.finetune_from:
        prepare_start(args, run, rdir)
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
    if run.candidate:  # the screening's choice reads valid losses only: its candidates' test scores wait for it
        log(f"{run.name}: done; its test scores are reported after the choice ({CHOICE})")
    else:
        log(f"{run.name}: BLEU {score['bleu']} chrF {score['chrf']}")


def reusable(args, run):
    """The finished run of ARGS.reuse (a study's export, docs/study-v2) that RUN may import instead of training,
    or None: REUSE/runs/NAME is done, its command.json equals RUN's training command up to the places it ran from
    (settings_of), and its data stamp has OUT's key (the same subset and vocabulary)."""
    if not args.reuse or run.evaluate_of:
        return None
    src = Path(args.reuse) / "runs" / run.name
    if not (src / "DONE").exists() or not (src / "command.json").exists():
        return None
    out = Path(args.out)
    cmd = [str(c) for c in train_cmd(args, run, out / "data" / "bin", out / "runs" / run.name)]
    if settings_of(json.loads((src / "command.json").read_text())) != settings_of(cmd):
        return None
    return src if files.stamp_matches(Path(args.reuse) / "data" / "DONE", data_key(args)) else None


def import_v2(args, run, data):
    """Copy RUN's finished copy in ARGS.reuse (see reusable) into OUT/runs/NAME, unless that directory holds
    anything (a run started here): the exported files and DONE, v2's stamp with an 'imported' entry (where from, the
    checkout's commit and whether the copy differs from it, the commits it trained at), all at once (a directory
    renamed into place). True when imported."""
    rdir = Path(args.out) / "runs" / run.name
    src = reusable(args, run)
    if src is None or (rdir.exists() and any(rdir.iterdir())):
        return False
    theirs, ours = Path(args.reuse) / "data" / "raw" / f"test.{TGT}", data / "raw" / f"test.{TGT}"
    if files.read_lines(theirs) != files.read_lines(ours):
        raise SystemExit(f"{theirs} differs from {ours}: {src} was scored against other references")
    trained = [json.loads(line) for line in files.read_lines(src / "code_state.jsonl")]
    changes = machine.git_changes(ROOT, str(src))
    imported = {
        "from": str(src),
        "commit": machine.git_commit(ROOT),
        "copy_differs_from_commit": None if changes is None else bool(changes),
        "trained_at": sorted({state["git_head"] for state in trained}),
        "imported": now(),
    }
    with files.atomic_path(rdir, mode="dir") as tmp:
        for name in study_report.EXPORTED:
            if name != "DONE" and (src / name).exists():
                (Path(tmp) / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / name, Path(tmp) / name)
        files.write_json_atomic(Path(tmp) / "DONE", dict(json.loads((src / "DONE").read_text()), imported=imported))
    log(f"{run.name}: imported from {src} (the same command; at commit {str(imported['commit'])[:7]})")
    return True


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


STAGES = {"all": ("screen", "confirm", "upper"), "screen": ("screen",), "confirm": ("confirm",), "upper": ("upper",)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--plan",
        choices=("v3", "v2", "upcycle"),
        default="v3",
        help="the study (v2: as it ran; upcycle: the sparse-upcycling experiment of issue 24, work/study_upcycle)",
    )
    p.add_argument("--stage", choices=tuple(STAGES), default="all", help="v3: the stages to run (default: all)")
    p.add_argument("--out", default=None, help="default: work/study_v3 (work/study_v2 with --plan v2)")
    p.add_argument(
        "--reuse",
        default=str(ROOT / "docs" / "study-v2"),
        help="v3: import finished runs with the "
        "same command from this study export instead of training them ('' = train every run)",
    )
    p.add_argument("--only", default="", help="comma-separated run names (default: the whole plan)")
    p.add_argument("--seeds", default=None, help="v2: its seeds (default 1,2); v3's are fixed by its plan")
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
    p.add_argument("--export", default="", help="also copy the finished runs' small outputs here (docs/study-v3)")
    p.add_argument("--plot-dir", default=str(ROOT / "docs" / "img"))
    args = p.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.plan == "upcycle" and args.seeds is not None:
        p.error("--seeds: not with --plan upcycle (seed 1)")
    if args.plan == "v3" and args.seeds is not None:
        p.error("--seeds: only with --plan v2 (v3 has seed 1 in the screening, seeds 1-3 in the confirmation)")
    args.seeds = tuple(int(s) for s in (args.seeds or "1,2").split(","))
    args.out = args.out or str(ROOT / "work" / f"study_{args.plan}")
    if args.plan in ("v2", "upcycle"):
        args.reuse = ""  # v2 and upcycle train every run
    names = {r.name for r in plan(args)}
    args.only = [o for o in args.only.split(",") if o]
    unknown = sorted(set(args.only) - names)
    if unknown:
        p.error(f"--only: unknown run(s) {', '.join(unknown)}; the plan has: {', '.join(sorted(names))}")
    return args


def selected(args, runs):
    return [r for r in runs if not args.only or r.name in args.only]


def run_v3(args, data):
    """The stages of ARGS.stage in order; each goes as far as the finished runs allow and says what it waits for."""
    out, stages = Path(args.out), STAGES[args.stage]
    if "screen" in stages:
        for run in selected(args, screening()):
            do_run(args, run, data)
    choice = choose(out, screening())
    if choice is None:
        waits = "the confirmation waits for the screening: every candidate must be done before the choice"
        if args.stage in ("confirm", "upper"):  # asked for what cannot run yet
            raise SystemExit(waits)
        if args.stage == "all":
            log(waits)
        return
    if "confirm" in stages:
        for run in selected(args, confirmation(choice)):
            do_run(args, run, data)
    if "upper" not in stages:
        return
    decision = decide(out, choice, plan_v3(out))
    if decision is None:
        waits = "E = 64 waits for the confirmation: every seed of the chosen MoEC and of its MoE counterpart"
        if args.stage == "upper":
            raise SystemExit(waits)
        log(waits)
    elif not decision["beats"]:
        log(f"E = 64 is not run: {decision['moec']} does not beat {decision['moe']} ({DECISION})")
    else:
        for run in selected(args, upper(choice)):
            do_run(args, run, data)


def list_plan(args):
    """--list: each run of the plan with its state (v3: by stage, and which v2 run it would import)."""
    out = Path(args.out)
    runs = selected(args, plan(args))
    stage = None
    for r in runs:
        if args.plan == "v3" and r.stage != stage:
            stage = r.stage
            print(f"# {V3_STAGE_TITLES[stage]}")
        state = study_report.state(out / "runs" / r.name, r.updates or args.updates, not r.evaluate_of)
        if r.upcycled and state == "not started" and (out / "runs" / r.name / UPCYCLED).exists():
            state += f" ({UPCYCLED} written)"
        if r.finetune_from:
            state += f"  [from {r.finetune_from}'s checkpoint_last.pt{', upcycled' if r.upcycled else ''}]"
        if state == "not started" and reusable(args, r):
            state += f" (the same command as {Path(args.reuse) / 'runs' / r.name}: imported, not trained)"
        print(f"{r.name:24s} {state}")
    if args.plan == "v3":
        choice, decision = read_json(out / CHOICE), read_json(out / DECISION)
        if not choice:
            print("# confirmation (seeds 1-3): planned when every screening candidate is done (the choice)")
        elif not decision:
            print(
                f"# E = 64: decided when the confirmation is done ({choice['group']} against "
                f"{choice['moe_counterpart']})"
            )
        elif not decision["beats"]:
            print(f"# E = 64: not run, {decision['moec']} does not beat {decision['moe']} (p = {decision['p']:.4f})")


V3_STAGE_TITLES = {
    "screen": "screening (E = 32, G = 4, seed 1)",
    "confirm": "confirmation (seeds 1-3 of the chosen MoEC, its MoE counterpart and dense)",
    "upper": "upper bound (E = 64, G = 8, seed 1)",
}


def main(argv=None):
    args = parse_args(argv)
    if args.list:
        list_plan(args)
        return 0
    out = Path(args.out)
    if not args.report_only:
        data = prepare_data(args)
        if args.plan in ("v2", "upcycle"):
            for run in selected(args, plan(args)):
                do_run(args, run, data)
        else:
            run_v3(args, data)
    if args.plan == "v2":
        study_report.write(out, plan(args), args.updates, Path(args.plot_dir))
    elif args.plan == "upcycle":
        study_report.write_upcycle(out, plan(args), ROOT / "docs" / "study-v2")
    else:
        choose(out, screening())  # never a report of the candidates' test scores before the choice is on disk
        study_report.write_v3(out, plan(args), args.updates, Path(args.plot_dir))
    if args.export:
        copied = study_report.export(out, plan(args), Path(args.export))
        log(f"exported {len(copied)} files to {args.export}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
