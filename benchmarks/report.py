#!/usr/bin/env python
"""Markdown tables and target verdicts from the JSON files of bench_layer.py and bench_e2e.py.

    python benchmarks/report.py [RESULTS_DIR]        (default: benchmarks/results)

Every table starts with the code it measured: the git commit, and whether the tree had uncommitted changes (then
the commit alone does not reproduce the figures; files written before the benchmarks recorded it say so), and the
machine's load. The verdicts take the headline runs: layer_cpu_quiet*.json with e2e_cpu*.json (CPU, idle
machine) and layer_cuda*.json (GPU) when there are any. The targets are defined once, in TARGETS below.
"""

import json
import sys
from pathlib import Path

RES = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results"
# The targets. Memory is compared per unit of expert work: top-k runs k expert FFNs per token where the dense
# layer runs one, so its activations are compared with k dense FFNs' (peak / k against dense).
TARGETS = {
    "cpu_time_E64": 1.15,
    "cpu_time_E128": 1.25,
    "cpu_growth_E8_E64": 0.10,
    "cpu_vs_peer": 4.0,
    "cpu_memory_per_k": 1.3,
    "e2e_train": 0.85,
    "e2e_generate": 0.85,
    "gpu_tokens_E64": 0.8,
}
HEADLINE = (("layer_cpu_quiet.json", "e2e_cpu.json"), ("layer_cpu_quiet_nommap.json", "e2e_cpu_nommap.json"))


def load(name):
    p = RES / name
    return json.loads(p.read_text()) if p.exists() else None


def f(v, spec=".2f", suffix=""):
    return "-" if v is None else format(v, spec) + suffix


def code(machine):
    commit = machine.get("git_commit") or machine.get("git") or "not recorded"
    dirty = {True: "uncommitted changes in the tree", False: "clean tree"}.get(
        machine.get("git_dirty"), "tree state not recorded"
    )
    return f"code: git {commit} ({dirty})"


def layer_table(res, cuda=False):
    rows = res["results"]
    m = res["machine"]
    s = res["settings"]
    print(
        f"Machine: {m.get('gpu') or m.get('cpu')}, {m.get('cores')} cores, torch {m['torch']}, "
        f"{s['threads']} threads, {s['dtype']}, T={s['tokens']}, d={s['dim']}, FFN {s['ffn']}; "
        f"{s['rounds']} rounds + {s['warmup']} warm-up; {m['date']}; load average at start/end "
        f"{m.get('loadavg_at_start')} / {m.get('loadavg_at_end')}; took {m.get('elapsed_s')} s; {code(m)}.\n"
    )
    head = (
        "| case | E | k | G | drop | median ms | x dense time | speed-up vs best peer (same k) | peak act. MB "
        "| x dense mem | per unit of work (/ k) |"
    )
    if cuda:
        head += " Mtokens/s |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        if r["family"] == "floor":
            continue
        peer = f(r.get("speedup_vs_best_peer"), ".2f", "x") + (f" ({r['best_peer']})" if r.get("best_peer") else "")
        mem = r.get("x_dense_mem")
        line = (
            f"| {r['case']} | {r['E']} | {r['k']} | {r['G']} | {r['cluster_dropout']} "
            f"| {f(r.get('median_ms'), '.1f')} | {f(r.get('x_dense_time'))} | {peer} "
            f"| {f(r.get('peak_mb'), '.1f')} | {f(mem)} | {f(mem / r['k'] if mem else None)} |"
        )
        if cuda:
            line += f" {f(r['tokens_per_s'] / 1e6 if r.get('tokens_per_s') else None)} |"
        if r.get("error"):
            line += " error: " + r["error"][:80]
        print(line)
    floors = [r for r in rows if r["family"] == "floor"]
    if floors:
        print("\nFloors (same group's dense step time as the yardstick):\n")
        print("| E | mm-one ms | mm-loop ms | mm-bmm ms | loop / one | gradwrite ms | gradwrite / dense |")
        print("|---|---|---|---|---|---|---|")
        by = {}
        for r in floors:
            by.setdefault(r["E"], {})[r["case"]] = r
        for E, d in by.items():
            one, loop, bmm, gw = (d.get(k, {}).get("median_ms") for k in ("mm-one", "mm-loop", "mm-bmm", "gradwrite"))
            print(
                f"| {E} | {f(one, '.1f')} | {f(loop, '.1f')} | {f(bmm, '.1f')} | "
                f"{f(loop / one if loop and one else None)} | {f(gw, '.1f')} | "
                f"{f(d.get('gradwrite', {}).get('x_dense_time'))} |"
            )


def pick(rows, case, E):
    return next((r for r in rows if r["case"] == case and r["E"] == E), None)


def memory_per_k(r):
    """Peak activation memory as a multiple of dense, per unit of expert work (k expert FFNs per token)."""
    return r["x_dense_mem"] / r["k"]


def verdicts(cpu, cuda, e2e):
    print("\n| target | measured | met? |")
    print("|---|---|---|")

    def line(name, value, ok):
        print(f"| {name} | {value} | {'yes' if ok else 'no'} |")

    if cpu:
        rows = cpu["results"]
        k1 = {E: pick(rows, "moec-k1", E) for E in (8, 64, 128)}
        for E, key in ((64, "cpu_time_E64"), (128, "cpu_time_E128")):
            r, lim = k1[E], TARGETS[key]
            if r and r.get("x_dense_time"):
                line(
                    f"CPU MoEC top-1 E={E} <= {lim}x dense time", f"{r['x_dense_time']:.2f}x", r["x_dense_time"] <= lim
                )
        if k1[8] and k1[64] and k1[8].get("median_ms") and k1[64].get("median_ms"):
            # growth on the dense-normalised times (each group has its own dense yardstick)
            g = k1[64]["x_dense_time"] / k1[8]["x_dense_time"] - 1
            raw = k1[64]["median_ms"] / k1[8]["median_ms"] - 1
            lim = TARGETS["cpu_growth_E8_E64"]
            line(
                f"CPU MoEC top-1 time grows <= {lim:.0%} from E=8 to E=64",
                f"{g * 100:+.0f}% dense-normalised, {raw * 100:+.0f}% raw",
                g <= lim,
            )
        for case in ("moec-k1", "moec-k2"):
            r = pick(rows, case, 64)
            if r and r.get("speedup_vs_best_peer"):
                peer = pick(rows, r["best_peer"], 64)
                ceiling = peer["x_dense_time"] / r["k"]  # a MoE layer costs at least k dense FFNs
                line(
                    f"CPU {case} E=64 >= {TARGETS['cpu_vs_peer']:.0f}x faster than best peer",
                    f"{r['speedup_vs_best_peer']:.2f}x ({r['best_peer']}; ceiling {ceiling:.1f}x = peer time / "
                    f"{r['k']} dense)",
                    r["speedup_vs_best_peer"] >= TARGETS["cpu_vs_peer"],
                )
        ours = [r for r in rows if r["family"] == "moec" and r.get("x_dense_mem")]
        if ours:
            worst = max(ours, key=memory_per_k)
            top2 = [r for r in ours if r["k"] == 2]
            lim = TARGETS["cpu_memory_per_k"]
            line(
                f"CPU peak activation memory per unit of expert work (peak / k) <= {lim}x dense, every MoEC case",
                f"worst {memory_per_k(worst):.2f}x ({worst['case']} E={worst['E']})"
                + (
                    f"; top-2 {min(r['x_dense_mem'] for r in top2):.2f}-{max(r['x_dense_mem'] for r in top2):.2f}x "
                    f"dense before dividing by k"
                    if top2
                    else ""
                ),
                memory_per_k(worst) <= lim,
            )
    if e2e and "train_wps_ratio_moec_over_dense" in e2e:
        r = e2e["train_wps_ratio_moec_over_dense"]
        line(f"end-to-end training wps >= {TARGETS['e2e_train']}x dense", f"{r:.2f}x", r >= TARGETS["e2e_train"])
        r = e2e["generate_sps_ratio_moec_over_dense"]
        line(
            f"end-to-end generation sentences/s >= {TARGETS['e2e_generate']}x dense",
            f"{r:.2f}x",
            r >= TARGETS["e2e_generate"],
        )
    for res in cuda:
        r = pick(res["results"], "moec-k1", 64)
        if r and r.get("x_dense_time"):
            tok, lim = 1 / r["x_dense_time"], TARGETS["gpu_tokens_E64"]
            line(
                f"GPU ({res['machine'].get('gpu')}, {res['settings']['dtype']}, T={res['settings']['tokens']}) "
                f"MoEC top-1 E=64 >= {lim}x dense tokens/s",
                f"{tok:.2f}x",
                tok >= lim,
            )


def main():
    layers = sorted(p.name for p in RES.glob("layer_*.json") if "_quick" not in p.name)
    cuda = [(n, load(n)) for n in layers if n.startswith("layer_cuda")]
    for n in layers:
        res = load(n)
        print(f"\n### {'GPU' if n.startswith('layer_cuda') else 'CPU'} layer ({n})\n")
        layer_table(res, n.startswith("layer_cuda"))
        if res.get("sync_check"):
            print("\nHost synchronisations per forward+backward:\n")
            print("| case | syncs | where (file:line: count) |")
            print("|---|---|---|")
            for k, v in res["sync_check"].items():
                where = ", ".join(f"{a}: {b}" for a, b in (v.get("where") or {}).items())
                print(f"| {k} | {v.get('syncs')} | {where or v.get('error', '')} |")
    for name in sorted(p.name for p in RES.glob("e2e_*.json") if "_quick" not in p.name):
        e2e = load(name)
        print(f"\n### End to end ({name})\n")
        print(
            f"{code(e2e['machine'])}; load average at start/end {e2e['machine'].get('loadavg_at_start')} / "
            f"{e2e['machine'].get('loadavg_at_end')}\n"
        )
        print("| model | train wps (median) | generate sentences/s (median) |")
        print("|---|---|---|")
        for m in e2e["train"]:
            print(
                f"| {m} | {f(e2e['train'][m]['wps_median'], '.0f')} | "
                f"{f(e2e['generate'].get(m, {}).get('sentences_per_s_median'))} |"
            )
    for cpu_name, e2e_name in HEADLINE:
        cpu, e2e = load(cpu_name), load(e2e_name)
        if cpu or e2e:
            print(f"\n### Targets ({cpu_name}, {e2e_name})\n")
            verdicts(cpu, [r for _, r in cuda], e2e)


if __name__ == "__main__":
    main()
