"""The rows, table and JSON of bench_layer.py: each case's median time, its ratio to the dense FFN of its group, the
speed-up over the faster peer of the same k, and its peak activation memory (absolute, x dense, and x dense per
unit of expert work: top-k does k FFNs of work per token, so its memory is also divided by k)."""

import json
import statistics

from fairseq_moec.pipeline import files


def summarise(groups, T):
    rows = []
    for cases in groups:
        by = {c.name: c for c in cases}
        dense = by.get("dense")
        dense_t = statistics.median(dense.times) if dense and dense.times else None
        dense_m = dense.mem["peak_bytes"] if dense and dense.mem else None
        best_peer = {}
        for c in cases:
            if c.family in ("fairscale", "torchscale") and c.times:
                t = statistics.median(c.times)
                if c.k not in best_peer or t < best_peer[c.k][0]:
                    best_peer[c.k] = (t, c.name)
        for c in cases:
            med = statistics.median(c.times) if c.times else None
            row = {
                "case": c.name,
                "family": c.family,
                "E": c.E,
                "k": c.k,
                "G": c.G,
                "cluster_dropout": c.drop,
                "median_ms": med * 1e3 if med else None,
                "times_ms": [round(t * 1e3, 3) for t in c.times],
                "note": c.note,
            }
            if med:
                row["tokens_per_s"] = T / med
            if med and dense_t:
                row["x_dense_time"] = med / dense_t
            if med and c.family == "moec" and c.k in best_peer:
                row["best_peer"] = best_peer[c.k][1]
                row["speedup_vs_best_peer"] = best_peer[c.k][0] / med
            if c.mem:
                row.update({key: v for key, v in c.mem.items()})
                row["peak_mb"] = c.mem["peak_bytes"] / 2**20
                if dense_m:
                    row["x_dense_mem"] = c.mem["peak_bytes"] / dense_m
                    row["x_dense_mem_per_k"] = row["x_dense_mem"] / c.k
            if c.error:
                row["error"] = c.error
            rows.append(row)
    return rows


def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def print_table(rows, cuda):
    head = (
        f"{'case':<20}{'E':>5}{'k':>3}{'G':>4}{'drop':>5}{'median ms':>11}{'x dense':>9}"
        f"{'vs best peer':>14}{'peak MB':>9}{'x dense':>8}{'saved MB':>10}"
    )
    if cuda:
        head += f"{'Mtok/s':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        peer = f"{r['speedup_vs_best_peer']:.2f}x" if "speedup_vs_best_peer" in r else "-"
        line = (
            f"{r['case']:<20}{r['E']:>5}{r['k']:>3}{r['G']:>4}{r['cluster_dropout']:>5.1f}"
            f"{fmt(r['median_ms'], '11.1f')}{fmt(r.get('x_dense_time'), '9.2f')}{peer:>14}"
            f"{fmt(r.get('peak_mb'), '9.1f')}{fmt(r.get('x_dense_mem'), '8.2f')}"
            f"{fmt(r.get('saved_bytes', 0) / 2**20 if 'saved_bytes' in r else None, '10.1f')}"
        )
        if cuda:
            line += fmt(r.get("tokens_per_s", 0) / 1e6 if r.get("tokens_per_s") else None, "9.2f")
        if r.get("error"):
            line += "  ERROR " + r["error"][:60]
        print(line)


def write_json(path, result):
    files.write_text_atomic(path, json.dumps(result, indent=1))
