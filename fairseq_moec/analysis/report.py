"""report.md of the routing analysis: the per-layer table and the most frequent tokens of every expert."""

from typing import Dict


def _fmt(x, spec=".3f"):
    return "n/a" if x is None else format(x, spec)


def _md_token(sym: str) -> str:
    return "`" + sym.replace("`", "'").replace("|", "\\|") + "`"


def write_report(summary: Dict, path: str) -> None:
    lines = [
        "# Routing analysis",
        "",
        f"- checkpoint: `{summary['checkpoint']}`",
        f"- data: `{summary['data']}`, split `{summary['split']}`: {summary['sentences']} sentence pairs "
        f"(skipped as too long: {summary['skipped_sentences']}), teacher forcing, eval mode (all experts)",
        f"- routing: top-{summary['top_k']}; load counts every routing choice",
        "",
        "| layer | tokens | load CV | load entropy (max) | co-routing (chance) | cluster loads | intra var "
        "| inter var |",
        "|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name, s in summary["layers"].items():
        lines.append(
            f"| {name} | {s['tokens']} | {s['load_cv']:.3f} | {s['load_entropy']:.3f} ({s['load_entropy_max']:.3f}) "
            f"| {_fmt(s['co_routing_rate'])} ({_fmt(s['co_routing_chance'])}) "
            f"| {' '.join(f'{x:.2f}' for x in s['cluster_loads'])} | {s['intra_var']:.2e} | {s['inter_var']:.2e} |"
        )
    lines += [
        "",
        "![expert load](load_heatmap.png)",
        "",
        "![co-routing](co_routing.png)",
        "",
        "![cluster load](cluster_load.png)",
        "",
        "## Most frequent tokens per expert",
        "",
        "`token` count (share of that token's routings that went to this expert). Encoder layers: source "
        "tokens; decoder layers: the previous output token (target side, teacher forcing).",
        "",
    ]
    for name, s in summary["layers"].items():
        side = "source tokens" if s["side"] == "encoder" else "previous target tokens"
        lines += [f"### {name} ({side})", "", "| expert | cluster | load | tokens |", "|---:|---:|---:|---|"]
        for e, toks in enumerate(s["top_tokens"]):
            cell = ", ".join(f"{_md_token(t['token'])} {t['count']} ({t['share']:.0%})" for t in toks) or "-"
            lines.append(f"| {e} | {e // s['cluster_size']} | {s['load'][e]:.1%} | {cell} |")
        lines.append("")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))
