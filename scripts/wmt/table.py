"""Collect the BLEU scores of experiment configs into a markdown table, with the commands that produce them.

    table.py --out FILE [--gpus N] CONFIG...

For each config, the results are SAVE_DIR/eval-test/results.json (written by scripts/evaluate.sh), SAVE_DIR
being the config's checkpoint.save_dir relative to the current directory. A config without results is listed as
"not run", never with a number. The training command shown is the one recorded in SAVE_DIR/train_commands.log
when the model was trained, else the command scripts/train.sh would run.
"""

import argparse
import json
import os
import shlex
import time

import hydra_config
from wmt_common import log, main_guard, write_text_atomic

MODEL_NAMES = {"dense": "Dense Transformer", "moe": "MoE (top-1, no clusters)", "moec": "MoEC"}


def describe(cfg) -> dict:
    """Model kind and size of a composed experiment config (hydra_config.compose)."""
    arch = cfg.model._name
    moe = arch.startswith("moec_")
    clusters = int(cfg.model.get("moe_clusters") or 1) if moe else None
    kind = "dense" if not moe else ("moec" if clusters and clusters > 1 else "moe")
    return {
        "kind": kind,
        "model": MODEL_NAMES[kind],
        "size": "big" if arch.endswith("_big") else "base",
        "experts": str(cfg.model.moe_expert_count) if moe else "-",
        "clusters": str(clusters) if moe else "-",
        "cluster_dropout": str(cfg.model.cluster_dropout) if moe else "-",
    }


def last_train_command(save_dir: str):
    log_path = os.path.join(save_dir, "train_commands.log")
    if not os.path.isfile(log_path):
        return None
    lines = [line for line in open(log_path, encoding="utf-8").read().splitlines() if line and not line.startswith("#")]
    return lines[-1] if lines else None


def load_results(path: str):
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            res = json.load(f)
        return res if isinstance(res["sacrebleu"]["score"], (int, float)) else None
    except (ValueError, KeyError, TypeError):
        log(f"[table] ignoring unreadable results file {path}")
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("configs", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--gpus",
        type=int,
        default=8,
        help="GPU count for the training commands shown for runs that have not been trained yet (default 8)",
    )
    args = ap.parse_args()
    rows, sections = [], []
    for config in args.configs:
        config_dir, name = hydra_config.locate(config)
        cfg = hydra_config.compose(config)
        info = describe(cfg)
        save_dir = cfg.checkpoint.save_dir
        res_path = os.path.join(save_dir, "eval-test", "results.json")
        res = load_results(res_path)
        if res:
            sacre = f"{res['sacrebleu']['score']:.2f}"
            tok = res.get("tokenized_bleu_compound_split", {}).get("score")
            tok = f"{tok:.2f}" if isinstance(tok, (int, float)) else "not run"
            where = f"`{res_path}`"
        else:
            sacre = tok = "not run"
            where = "-"
        rows.append(
            f"| {info['model']} | {info['size']} | {info['experts']} | {info['clusters']} | "
            f"{sacre} | {tok} | [{name}](#{name}) | {where} |"
        )
        trained = last_train_command(save_dir)
        uf = hydra_config.update_freq(hydra_config.TOKENS_PER_UPDATE, cfg.dataset.max_tokens, args.gpus)
        resolved = " ".join(
            shlex.quote(a)
            for a in [
                "fairseq-hydra-train",
                "--config-dir",
                config_dir,
                "--config-name",
                name,
                f"common.user_dir={hydra_config.REPO}/fairseq_moec",
                f"optimization.update_freq=[{uf}]",
            ]
        )
        lines = [
            f"### {name}",
            "",
            "```bash",
            f"bash scripts/train.sh {name}",
            f"bash scripts/evaluate.sh --config {name}",
            "```",
            "",
        ]
        if trained:
            lines += ["Training command as run (from `train_commands.log`):", "", "```bash", trained, "```", ""]
        else:
            lines += [
                f"Training command that `train.sh` runs on {args.gpus} GPUs (not trained yet):",
                "",
                "```bash",
                resolved,
                "```",
                "",
            ]
        if res and res.get("generate_command"):
            lines += [
                "fairseq-generate command as run:",
                "",
                "```bash",
                res["generate_command"],
                "```",
                "",
                f"sacreBLEU signature: `{res['sacrebleu'].get('signature', '?')}`",
                "",
            ]
        sections.append("\n".join(lines))
    n_done = sum(1 for r in rows if "not run" not in r.split("|")[5])
    text = "\n".join(
        [
            "# WMT'14 English-German (newstest2014), MoEC reproduction",
            "",
            f"Collected {time.strftime('%Y-%m-%d %H:%M')} by `scripts/reproduce_table.sh`: {n_done} of {len(rows)} "
            "runs have results. sacreBLEU is on detokenized output; the tokenized BLEU is the compound-split, "
            "Moses-tokenized score most WMT'14 en-de papers report (docs/wmt14.md).",
            "",
            "| Model | Size | Experts | Clusters | sacreBLEU | BLEU (tok., compound split) | Commands | Results |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            "## Commands",
            "",
            *sections,
        ]
    )
    write_text_atomic(args.out, text)
    log(f"[table] wrote {args.out} ({n_done} of {len(rows)} runs with results)")
    print(text)


if __name__ == "__main__":
    main_guard(main)
