#!/usr/bin/env python
"""Forward+backward time and peak activation memory of one MoE layer against a dense FFN and two peers.

    python benchmarks/bench_layer.py                       # CPU, fp32, 2 threads, T=4096, d=512, FFN 2048
    python benchmarks/bench_layer.py --quick               # smoke run (seconds idle, < 1 minute loaded)
    python benchmarks/bench_layer.py --device cuda --dtype bf16 --sync-check

Cases (one group per expert count E, each group with its own dense yardstick):
  dense           nn.Linear(d, f) -> ReLU -> nn.Linear(f, d): same per-token FLOPs as a top-1 MoE
  moec-k{1,2}     fairseq_moec.modules.MoELayer, dropless; G=1 without cluster dropout, or G=8 clusters
                  (G=4 at E=8, so that a cluster has 2 experts and dropout 0.5 drops one) with dropout 0.5
  fairscale-k2    fairscale 0.4.13 nn.moe.MOELayer + Top2Gate (capacity 2T/E, one-hot [T, E, C] dispatch)
  torchscale-k*   torchscale 0.3.0 component.xmoe MOELayer + Top1Gate (capacity factor 1.0) / Top2Gate
  mm-one/-loop/-bmm  forward fc1 matmul floors: one [T, d] x [d, f] matmul, E matmuls of T/E rows with E weights,
                  one bmm of the same
  gradwrite       allocate and zero E x (fc1 + fc2) weight-gradient bytes: the part of the floor that
                  grows with E whatever the kernel (fresh memory each step, as with gradients set to None)

Every step: parameter gradients set to None (as fairseq's zero_grad does), forward, backward of the output
with a fixed random output gradient plus the sum of the auxiliary losses (balance + cluster + z for ours,
l_aux for the peers), so that routing backward is measured. Timing is interleaved: every round runs every
case of the group once, in order; the first round is warm-up; the figure is the median over the rounds.
On CUDA each timed sample is the mean of --iters steps between CUDA events. Memory: layer_memory.py; the peers:
layer_peers.py; the rows and the JSON (machine, load, git commit and dirty state): layer_report.py.
"""

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import layer_peers
import layer_report
import torch
import torch.nn as nn
from layer_memory import backward, measure_memory

from fairseq_moec.modules import MoEConfig, MoELayer
from fairseq_moec.pipeline import machine

HERE = Path(__file__).resolve().parent


class Case:
    """One benchmarked configuration: ``step()`` runs one forward+backward (grads set to None first)."""

    def __init__(self, name, family, E, k, G, drop, fn, params, note=""):
        self.name, self.family, self.E, self.k, self.G, self.drop = name, family, E, k, G, drop
        self.fn, self.params, self.note = fn, list(params), note
        self.times = []
        self.mem = None
        self.error = None

    def step(self):
        for p in self.params:
            p.grad = None
        self.fn()


def ffn(d, f):
    return nn.Sequential(nn.Linear(d, f), nn.ReLU(), nn.Linear(f, d))


def build_group(E, args, peers, device, dtype):
    """All cases for one expert count (dense first)."""
    T, d, f = args.tokens, args.dim, args.ffn
    g = torch.Generator().manual_seed(1234 + E)
    x = torch.randn(T, d, generator=g).to(device, dtype)
    gout = torch.randn(T, d, generator=g).to(device, dtype)
    cases = []

    def leaf():
        return x.detach().requires_grad_()

    dense = ffn(d, f).to(device, dtype)
    if want(args, "dense"):

        def run_dense(m=dense):
            backward([m(leaf())], [gout])

        cases.append(Case("dense", "dense", E, 1, 1, 0.0, run_dense, dense.parameters()))

    # ours: one set of experts and one router shared by the four variants (routing and dropout differ)
    shared = None
    for k in (1, 2):
        for clustered in (False, True):
            G = (8 if E >= 16 else max(1, E // 2)) if clustered else 1
            drop = 0.5 if clustered else 0.0
            name = f"moec-k{k}" + (f"-G{G}-drop" if clustered else "")
            if not want(args, name):
                continue
            layer = MoELayer(MoEConfig(moe_expert_count=E, moe_clusters=G, moe_top_k=k, cluster_dropout=drop), d, f).to(
                device, dtype
            )
            if shared is None:
                shared = layer
            else:
                layer.experts, layer.router = shared.experts, shared.router
            layer.train()

            def run_moec(m=layer):
                out = m(leaf())
                backward([out, sum(m.last_losses.values())], [gout, None])

            cases.append(Case(name, "moec", E, k, G, drop, run_moec, layer.parameters()))

    # peers: one ModuleList of E expert FFNs shared by all peer cases
    if peers and T % E:
        print(f"[bench] E={E}: T={T} not divisible by E, peers skipped", file=sys.stderr)
    elif peers:
        experts = nn.ModuleList(ffn(d, f) for _ in range(E)).to(device, dtype)
        for name, k, fn, params, note in layer_peers.peer_steps(
            peers, experts, x, gout, leaf, device, dtype, lambda n: want(args, n)
        ):
            cases.append(Case(name, name.split("-")[0], E, k, 1, 0.0, fn, params, note=note))

    # floors: one matmul vs a loop of E matmuls vs one bmm (forward fc1 only, same FLOPs), and the
    # weight-gradient write that any MoE pays (fresh memory each step, as with grads set to None)
    if args.floors:
        n = T // E
        w1 = (torch.randn(E, f, d, generator=g) * d**-0.5).to(device, dtype)
        w2 = torch.randn(E, d, f, generator=g).to(device, dtype)
        W = w1[0].clone()
        xb = x.view(E, n, d)
        floors = (
            ("mm-one", lambda: torch.mm(x, W.t()), "x[T, d] @ W[d, f]: one matmul"),
            (
                "mm-loop",
                lambda: [torch.mm(x[e * n : (e + 1) * n], w1[e].t()) for e in range(E)],
                "E matmuls x[T/E, d] @ W_e[d, f]",
            ),
            ("mm-bmm", lambda: torch.bmm(xb, w1.transpose(1, 2)), "one bmm [E, T/E, d] @ [E, d, f]"),
            (
                "gradwrite",
                lambda: (torch.zeros_like(w1), torch.zeros_like(w2)),
                "allocate + zero E x (fc1 + fc2) weight-gradient bytes",
            ),
        )
        for name, fn, note in floors:
            if want(args, name) and (name != "mm-loop" or T % E == 0):
                cases.append(Case(name, "floor", E, 1, 1, 0.0, fn, [], note=note))
    return cases


def want(args, name):
    return not args.cases or any(c == name or name.startswith(c) for c in args.cases)


# ----------------------------------------------------------------------------------------------- timing
def time_step(case, device, iters):
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(iters):
            case.step()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / iters
    t0 = time.perf_counter()
    case.step()
    return time.perf_counter() - t0


def run_rounds(cases, args, device):
    gc.collect()
    gc.freeze()  # what exists now is never scanned again: a collection costs ~1 s on a busy host otherwise
    for r in range(args.rounds + args.warmup):
        for c in cases:
            if c.error:
                continue
            try:
                t = time_step(c, device, args.iters)
            except Exception as e:  # noqa: BLE001 - a peer that fails must not sink the run
                c.error = f"{type(e).__name__}: {e}"[:300]
                print(f"[bench] {c.name} E={c.E} failed: {c.error}", file=sys.stderr)
                continue
            if r >= args.warmup:
                c.times.append(t)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2; 1 with --quick)")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--ffn", type=int, default=2048)
    p.add_argument("--experts", default="8,16,32,64,128", help="comma-separated expert counts")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default 4 CPU, 10 CUDA)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--iters", type=int, default=None, help="CUDA: steps per timed sample (default 10)")
    p.add_argument("--cases", default="", help="comma-separated case-name prefixes to run (default all)")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument(
        "--floors",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="matmul floors and the weight-gradient write (cheap)",
    )
    p.add_argument("--sync-check", action="store_true", help="CUDA: count host synchronisations of our layer")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: T=256, d=128, FFN 512, E in {4, 8}, 1 round, no warm-up, 1 thread",
    )
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/layer_<device>.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.dim, args.ffn, args.experts = 256, 128, 512, "4,8"
        args.rounds = args.rounds or 1
        args.warmup = 0
        args.threads = args.threads or 1  # a smoke run: one thread is immune to OpenMP barrier waits on a busy host
    args.threads = args.threads or 2
    args.experts = [int(e) for e in str(args.experts).split(",") if e]
    args.cases = [c for c in args.cases.split(",") if c]
    return args


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    args.rounds = args.rounds or (10 if device.type == "cuda" else 4)
    args.iters = args.iters or (10 if device.type == "cuda" else 1)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    peers = {} if args.no_peers else layer_peers.import_peers()
    if peers:
        layer_peers.init_process_group(device)
    t_start = time.time()
    info = machine.machine_info(device, args.threads)
    print(
        f"[bench] {info.get('gpu') or info.get('cpu')} | torch {torch.__version__} | {args.threads} threads | "
        f"{args.dtype} | T={args.tokens} d={args.dim} ffn={args.ffn} | E={args.experts} | "
        f"{args.rounds} rounds (+{args.warmup} warm-up) | peers: {sorted(peers) or 'none'} | "
        f"git {info['git_commit']}{' (dirty tree)' if info['git_dirty'] else ''}",
        flush=True,
    )

    groups = []
    for E in args.experts:
        cases = build_group(E, args, peers, device, dtype)
        run_rounds(cases, args, device)
        if not args.no_memory:
            for c in cases:
                if c.error or c.family == "floor":
                    continue
                try:
                    c.mem = measure_memory(c, device)
                except Exception as e:  # noqa: BLE001
                    print(f"[bench] memory of {c.name} E={E} failed: {type(e).__name__}: {e}", file=sys.stderr)
        for c in cases:
            c.params = []  # let the group's tensors go
        groups.append(cases)
        med = {c.name: statistics.median(c.times) * 1e3 for c in cases if c.times}
        print(
            f"[bench] E={E:>4} done ({time.time() - t_start:.0f}s): "
            + ", ".join(f"{n} {t:.1f}ms" for n, t in med.items()),
            flush=True,
        )
        del cases
        gc.unfreeze()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    rows = layer_report.summarise(groups, args.tokens)
    print()
    layer_report.print_table(rows, device.type == "cuda")
    result = {
        "machine": info,
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "settings": {
            "device": args.device,
            "dtype": args.dtype,
            "threads": args.threads,
            "tokens": args.tokens,
            "dim": args.dim,
            "ffn": args.ffn,
            "experts": args.experts,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "iters": args.iters,
            "quick": args.quick,
        },
        "results": rows,
    }
    if args.sync_check and device.type == "cuda":
        import layer_sync

        result["sync_check"] = layer_sync.sync_check(args, device, dtype)
        print("\n[bench] host synchronisations per forward+backward (torch.cuda.set_sync_debug_mode('warn')):")
        for key, v in result["sync_check"].items():
            print(f"  {key:<34} {v['syncs']!s:>4}  {v.get('where', '')}  {v.get('profiler', '')} {v.get('error', '')}")
    machine.finish(info, t_start)
    out = (
        Path(args.out) if args.out else HERE / "results" / (f"layer_{device.type}{'_quick' if args.quick else ''}.json")
    )
    layer_report.write_json(out, result)
    print(f"\n[bench] wrote {out} ({time.time() - t_start:.0f}s)")
    return result


if __name__ == "__main__":
    main()
