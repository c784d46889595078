#!/usr/bin/env python
"""Markdown tables and target verdicts from the JSON files of bench_layer.py and bench_e2e.py.

    python benchmarks/report.py [benchmarks/results]
"""
import json
import sys
from pathlib import Path

RES = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent / "results"


def load(name):
    p = RES / name
    return json.loads(p.read_text()) if p.exists() else None


def f(v, spec=".2f", suffix=""):
    return "-" if v is None else format(v, spec) + suffix


def layer_table(res, cuda=False):
    rows = res["results"]
    m = res["machine"]
    s = res["settings"]
    print(f"Machine: {m.get('gpu') or m.get('cpu')}, {m.get('cores')} cores, torch {m['torch']}, "
          f"{s['threads']} threads, {s['dtype']}, T={s['tokens']}, d={s['dim']}, FFN {s['ffn']}; "
          f"{s['rounds']} rounds + {s['warmup']} warm-up; {m['date']}; load average at start/end "
          f"{m.get('loadavg_at_start')} / {m.get('loadavg_at_end')}; took {m.get('elapsed_s')} s.\n")
    head = "| case | E | k | G | drop | median ms | x dense time | speed-up vs best peer (same k) | peak act. MB | x dense mem |"
    if cuda:
        head += " Mtokens/s |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        if r["family"] == "floor":
            continue
        peer = f(r.get("speedup_vs_best_peer"), ".2f", "x") + (f" ({r['best_peer']})" if r.get("best_peer") else "")
        line = (f"| {r['case']} | {r['E']} | {r['k']} | {r['G']} | {r['cluster_dropout']} | {f(r.get('median_ms'), '.1f')} "
                f"| {f(r.get('x_dense_time'))} | {peer} | {f(r.get('peak_mb'), '.1f')} | {f(r.get('x_dense_mem'))} |")
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
            print(f"| {E} | {f(one, '.1f')} | {f(loop, '.1f')} | {f(bmm, '.1f')} | "
                  f"{f(loop / one if loop and one else None)} | {f(gw, '.1f')} | "
                  f"{f(d.get('gradwrite', {}).get('x_dense_time'))} |")


def pick(rows, case, E):
    return next((r for r in rows if r["case"] == case and r["E"] == E), None)


def verdicts(cpu, cuda, e2e):
    print("\n| target | measured | met? |")
    print("|---|---|---|")

    def line(name, value, ok):
        print(f"| {name} | {value} | {'yes' if ok else 'no'} |")
    if cpu:
        rows = cpu["results"]
        k1 = {E: pick(rows, "moec-k1", E) for E in (8, 64, 128)}
        for E, lim in ((64, 1.15), (128, 1.25)):
            r = k1[E]
            if r and r.get("x_dense_time"):
                line(f"CPU MoEC top-1 E={E} <= {lim}x dense time", f"{r['x_dense_time']:.2f}x", r["x_dense_time"] <= lim)
        if k1[8] and k1[64] and k1[8].get("median_ms") and k1[64].get("median_ms"):
            # growth on the dense-normalised times (each group has its own dense yardstick)
            g = k1[64]["x_dense_time"] / k1[8]["x_dense_time"] - 1
            raw = k1[64]["median_ms"] / k1[8]["median_ms"] - 1
            line("CPU MoEC top-1 time grows <= 10% from E=8 to E=64", f"{g * 100:+.0f}% dense-normalised, "
                 f"{raw * 100:+.0f}% raw", g <= 0.10)
        for case in ("moec-k1", "moec-k2"):
            r = pick(rows, case, 64)
            if r and r.get("speedup_vs_best_peer"):
                peer = pick(rows, r["best_peer"], 64)
                ceiling = peer["x_dense_time"] / r["k"]  # a MoE layer costs at least k dense FFNs
                line(f"CPU {case} E=64 >= 4x faster than best peer",
                     f"{r['speedup_vs_best_peer']:.2f}x ({r['best_peer']}; ceiling {ceiling:.1f}x = peer time / "
                     f"{r['k']} dense)", r["speedup_vs_best_peer"] >= 4)
        worst = max((r for r in rows if r["family"] == "moec" and r.get("x_dense_mem")),
                    key=lambda r: r["x_dense_mem"], default=None)
        r64 = pick(rows, "moec-k1", 64)
        if r64 and r64.get("x_dense_mem"):
            line("CPU peak activation memory <= 1.3x dense (moec-k1, E=64)", f"{r64['x_dense_mem']:.2f}x", r64["x_dense_mem"] <= 1.3)
        if worst:
            line(f"CPU peak activation memory <= 1.3x dense (worst: {worst['case']} E={worst['E']})",
                 f"{worst['x_dense_mem']:.2f}x", worst["x_dense_mem"] <= 1.3)
    if e2e and "train_wps_ratio_moec_over_dense" in e2e:
        r = e2e["train_wps_ratio_moec_over_dense"]
        line("end-to-end training wps >= 0.85x dense", f"{r:.2f}x", r >= 0.85)
        r = e2e["generate_sps_ratio_moec_over_dense"]
        line("end-to-end generation sentences/s >= 0.85x dense", f"{r:.2f}x", r >= 0.85)
    for res in cuda:
        if not res:
            continue
        r = pick(res["results"], "moec-k1", 64)
        if r and r.get("x_dense_time"):
            tok = 1 / r["x_dense_time"]
            line(f"GPU ({res['machine'].get('gpu')}, bf16, T={res['settings']['tokens']}) MoEC top-1 E=64 >= 0.8x dense tokens/s",
                 f"{tok:.2f}x", tok >= 0.8)


def main():
    cuda, cuda32 = (load(n) for n in ("layer_cuda.json", "layer_cuda_T32768.json"))
    e2e_runs = [(n, load(n)) for n in ("e2e_cpu.json", "e2e_cpu_nommap.json", "e2e_cpu_before.json")]
    e2e_runs = [(n, r) for n, r in e2e_runs if r]
    cpu_runs = [(n, load(n)) for n in ("layer_cpu_quiet.json", "layer_cpu_quiet_nommap.json",
                                       "layer_cpu_quiet_before.json", "layer_cpu.json", "layer_cpu_run1_load10.json")]
    cpu_runs = [(n, r) for n, r in cpu_runs if r]
    for title, res, is_cuda in ([(f"CPU layer ({n})", r, False) for n, r in cpu_runs]
                                + [("GPU layer", cuda, True), ("GPU layer, T=32768", cuda32, True)]):
        if res:
            print(f"\n### {title}\n")
            layer_table(res, is_cuda)
    if cuda and cuda.get("sync_check"):
        print("\n### Host synchronisations per forward+backward (GPU)\n")
        print("| case | syncs | where (file:line: count) |")
        print("|---|---|---|")
        for k, v in cuda["sync_check"].items():
            where = ", ".join(f"{a}: {b}" for a, b in (v.get("where") or {}).items())
            print(f"| {k} | {v.get('syncs')} | {where or v.get('error', '')} |")
    for name, e2e in e2e_runs:
        print(f"\n### End to end (CPU, {name})\n")
        print("| model | train wps (median) | generate sentences/s (median) |")
        print("|---|---|---|")
        for m in e2e["train"]:
            print(f"| {m} | {f(e2e['train'][m]['wps_median'], '.0f')} | "
                  f"{f(e2e['generate'].get(m, {}).get('sentences_per_s_median'))} |")
    # verdicts: the current code on the idle machine, with glibc's default allocator and without mmap
    for cpu_name, e2e_name in (("layer_cpu_quiet.json", "e2e_cpu.json"),
                               ("layer_cpu_quiet_nommap.json", "e2e_cpu_nommap.json")):
        cpu, e2e = load(cpu_name), load(e2e_name)
        if cpu or e2e:
            print(f"\n### Targets ({cpu_name}, {e2e_name})\n")
            verdicts(cpu, [cuda, cuda32], e2e)


if __name__ == "__main__":
    main()
