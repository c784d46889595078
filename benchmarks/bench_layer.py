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
  padbmm-k1       (CPU) our layer with experts padded to the largest count and run as one baddbmm per map
                  (a prototype in benchmarks/proto_experts.py, not in the plugin)
  mm-one/-loop/-bmm  forward fc1 matmul floors: one [T, d] x [d, f] matmul, E matmuls of T/E rows with E weights,
                  one bmm of the same
  gradwrite       allocate and zero E x (fc1 + fc2) weight-gradient bytes: the part of the floor that
                  grows with E whatever the kernel (fresh memory each step, as with gradients set to None)

Every step: parameter gradients set to None (as fairseq's zero_grad does), forward, backward of the output
with a fixed random output gradient plus the sum of the auxiliary losses (balance + cluster + z for ours,
l_aux for the peers), so that routing backward is measured. Timing is interleaved: every round runs every
case of the group once, in order; the first round is warm-up; the figure is the median over the rounds.
On CUDA each timed sample is the mean of --iters steps between CUDA events.

Peak activation memory (parameters and parameter gradients excluded), CPU: one extra step of each case under
torch.profiler.profile(profile_memory=True). Every allocation and free of the CPU allocator during the step is
an event with its byte count and address; we replay them in order, drop the allocations that end up as a
parameter's .grad (found by address after the step), and take the running maximum. `saved` is the same count
at the end of forward (what autograd holds for backward, plus the output). CUDA: torch.cuda.max_memory_allocated
over the step minus what was allocated before it, minus the bytes of the parameter gradients.
"""
import argparse
import copy
import datetime
import gc
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def load_moec_modules():
    """Import fairseq_moec/modules as a stand-alone package: its __init__ imports no fairseq, but
    fairseq_moec/__init__.py does (and fairseq is not on the GPU machine)."""
    pkg = ROOT / "fairseq_moec" / "modules"
    spec = importlib.util.spec_from_file_location("moec_modules", pkg / "__init__.py",
                                                  submodule_search_locations=[str(pkg)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["moec_modules"] = mod
    spec.loader.exec_module(mod)
    return mod


def load_proto():
    spec = importlib.util.spec_from_file_location("bench_proto_experts", HERE / "proto_experts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------------------------- peers
def init_process_group(device):
    import torch.distributed as dist
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    except Exception:  # pragma: no cover - nccl missing
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port + 1}", rank=0, world_size=1)


def import_peers():
    """(fairscale, torchscale) namespaces or None each, with the reason printed."""
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from fairscale.nn.moe import MOELayer, Top2Gate
            out["fairscale"] = SimpleNamespace(MOELayer=MOELayer, Top2Gate=Top2Gate)
        except Exception as e:  # noqa: BLE001
            print(f"[bench] fairscale not available ({type(e).__name__}: {e}); "
                  "install with benchmarks/install_peers.sh", file=sys.stderr)
        # torchscale's xmoe tries `from fairseq.modules.moe import MOELayer` (absent in fairseq 0.12, so it
        # falls back to nn.Module): hide fairseq for that import instead of paying its ~5-20 s start-up
        hide = "fairseq" not in sys.modules
        if hide:
            sys.modules["fairseq"] = None
        try:
            from torchscale.component.xmoe.moe_layer import MOELayer
            from torchscale.component.xmoe import routing
            from torchscale.component.xmoe.routing import Top1Gate, Top2Gate
            routing.torch = _HistcFloatTorch()  # see _HistcFloatTorch
            out["torchscale"] = SimpleNamespace(MOELayer=MOELayer, Top1Gate=Top1Gate, Top2Gate=Top2Gate)
        except Exception as e:  # noqa: BLE001
            print(f"[bench] torchscale not available ({type(e).__name__}: {e}); "
                  "install with benchmarks/install_peers.sh", file=sys.stderr)
        finally:
            if hide:
                del sys.modules["fairseq"]
    return out


def shallow_clone(module):
    """A copy of a module tree that shares its parameters and buffers."""
    new = copy.copy(module)
    new._modules = {k: shallow_clone(v) for k, v in module._modules.items()}
    new._parameters, new._buffers = dict(module._parameters), dict(module._buffers)
    return new


class _HistcFloatTorch:
    """torchscale's gates log a histogram with torch.histc on int64 expert indices, which CPU torch does not
    implement ("histogram_cpu" not implemented for 'Long'). Its routing module gets this stand-in for `torch`:
    the same module, except that histc casts its input to float (a logging-only call, a few microseconds)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def histc(input, *args, **kwargs):
        return torch.histc(input.float(), *args, **kwargs)


def ffn(d, f):
    return nn.Sequential(nn.Linear(d, f), nn.ReLU(), nn.Linear(f, d))


# ----------------------------------------------------------------------------------------------- cases
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


def backward(outputs, grads):
    torch.autograd.backward(outputs, grads)


def build_group(E, args, M, proto, peers, device, dtype):
    """All cases for one expert count (dense first)."""
    T, d, f = args.tokens, args.dim, args.ffn
    g = torch.Generator().manual_seed(1234 + E)
    x = torch.randn(T, d, generator=g).to(device, dtype)
    gout = torch.randn(T, d, generator=g).to(device, dtype)
    peer_ctx = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else None
    cases = []

    def leaf():
        return x.detach().requires_grad_()

    # dense yardstick
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
            cfg = M.MoEConfig(moe_expert_count=E, moe_clusters=G, moe_top_k=k, cluster_dropout=drop)
            layer = M.MoELayer(cfg, d, f).to(device, dtype)
            if shared is None:
                shared = layer
            else:
                layer.experts, layer.router = shared.experts, shared.router
            layer.train()

            def run_moec(m=layer):
                out = m(leaf())
                backward([out, sum(m.last_losses.values())], [gout, None])
            cases.append(Case(name, "moec", E, k, G, drop, run_moec, layer.parameters()))

    # the padded-bmm prototype expert kernel on the same layer (top-1, G=1), sharing the experts' weights
    if proto is not None and device.type == "cpu" and want(args, "padbmm-k1"):
        layer = M.MoELayer(M.MoEConfig(moe_expert_count=E, moe_top_k=1), d, f).to(device, dtype)
        if shared is not None:  # same weights, in module trees of its own (patching leaves them alone)
            layer.router, layer.experts = shared.router, shallow_clone(shared.experts)
        proto.patch_padded_bmm(layer).train()

        def run_proto(m=layer):
            out = m(leaf())
            backward([out, sum(m.last_losses.values())], [gout, None])
        cases.append(Case("padbmm-k1", "proto", E, 1, 1, 0.0, run_proto, layer.parameters(),
                          note="experts padded to the largest count, one baddbmm"))

    # peers: one ModuleList of E expert FFNs shared by all peer cases
    peer_experts = None
    if T % E == 0 and peers:
        peer_experts = nn.ModuleList(ffn(d, f) for _ in range(E)).to(device, dtype)
    elif peers:
        print(f"[bench] E={E}: T={T} not divisible by E, peers skipped", file=sys.stderr)

    def autocast_run(fn):
        if peer_ctx is None:
            return fn
        def wrapped():
            with torch.autocast(device.type, dtype=dtype):
                fn()
        return wrapped

    if peer_experts is not None and "fairscale" in peers and want(args, "fairscale-k2"):
        P = peers["fairscale"]
        moe = P.MOELayer(P.Top2Gate(d, E), peer_experts).to(device, dtype)

        def run_fs(m=moe):
            out = m(leaf().view(T, 1, d))
            backward([out, m.l_aux], [gout.view(T, 1, d), None])
        cases.append(Case("fairscale-k2", "fairscale", E, 2, 1, 0.0, autocast_run(run_fs), moe.parameters(),
                          note="capacity 2T/E"))
    if peer_experts is not None and "torchscale" in peers:
        P = peers["torchscale"]
        for k in (1, 2):
            if not want(args, f"torchscale-k{k}"):
                continue
            gate = (P.Top1Gate(d, E, use_fp32=True) if k == 1 else P.Top2Gate(d, E, use_fp32=True))
            targs = SimpleNamespace(moe_expert_count=E, batch_size=1, batch_size_valid=1)
            moe = P.MOELayer(gate, peer_experts, targs).to(device, dtype)
            moe.train()

            def run_ts(m=moe):
                out, l_aux = m(leaf().view(1, T, d))
                backward([out, l_aux], [gout.view(1, T, d), None])
            cases.append(Case(f"torchscale-k{k}", "torchscale", E, k, 1, 0.0, autocast_run(run_ts),
                              moe.parameters(),
                              note="capacity factor 1.0" if k == 1 else "capacity 2*ceil(T/E)"))

    # floors: one matmul vs a loop of E matmuls vs one bmm (forward fc1 only, same FLOPs), and the
    # weight-gradient write that any MoE pays (fresh memory each step, as with grads set to None)
    if args.floors:
        n = T // E
        w1 = (torch.randn(E, f, d, generator=g) * d ** -0.5).to(device, dtype)
        w2 = torch.randn(E, d, f, generator=g).to(device, dtype)
        W = w1[0].clone()
        xb = x.view(E, n, d)
        floors = (
            ("mm-one", lambda: torch.mm(x, W.t()), "x[T, d] @ W[d, f]: one matmul"),
            ("mm-loop", lambda: [torch.mm(x[e * n:(e + 1) * n], w1[e].t()) for e in range(E)],
             "E matmuls x[T/E, d] @ W_e[d, f]"),
            ("mm-bmm", lambda: torch.bmm(xb, w1.transpose(1, 2)), "one bmm [E, T/E, d] @ [E, d, f]"),
            ("gradwrite", lambda: (torch.zeros_like(w1), torch.zeros_like(w2)),
             "allocate + zero E x (fc1 + fc2) weight-gradient bytes"),
        )
        for name, fn, note in floors:
            if want(args, name) and (name != "mm-loop" or T % E == 0):
                cases.append(Case(name, "floor", E, 1, 1, 0.0, fn, [], note=note))
    return cases


def want(args, name):
    return not args.cases or any(c == name or name.startswith(c) for c in args.cases)


# ----------------------------------------------------------------------------------------------- timing
def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


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


# ----------------------------------------------------------------------------------------------- memory
def grad_bytes(params):
    return sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)


def measure_memory_cpu(case):
    from torch.profiler import ProfilerActivity, profile, record_function
    for p in case.params:
        p.grad = None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("bench_step"):
            case_fn_marked(case, record_function)
    grad_addrs = {p.grad.data_ptr() for p in case.params if p.grad is not None}
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        path = tmp.name
    try:
        prof.export_chrome_trace(path)
        with open(path) as fh:
            events = json.load(fh)["traceEvents"]
    finally:
        os.unlink(path)
    bwd_ts = min((e["ts"] for e in events if e.get("name") == "bench_backward"), default=None)
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0),
                 key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
    last_alloc = {}
    for i, e in enumerate(mem):
        if e["args"]["Bytes"] > 0:
            last_alloc[e["args"]["Addr"]] = i
    grad_events = {last_alloc[a] for a in grad_addrs if a in last_alloc}
    total = peak = fwd_peak = 0
    saved = None
    for i, e in enumerate(mem):
        if bwd_ts is not None and saved is None and e["ts"] >= bwd_ts:
            saved = total
        if i not in grad_events:
            total += e["args"]["Bytes"]
        peak = max(peak, total)
        if saved is None:
            fwd_peak = peak
    if saved is None:
        saved = total
    return {"peak_bytes": peak, "fwd_peak_bytes": fwd_peak, "saved_bytes": saved,
            "param_grad_bytes": grad_bytes(case.params), "method": "torch.profiler profile_memory replay"}


def case_fn_marked(case, record_function):
    """Run the case with the start of backward marked (autograd.backward wrapped for the duration)."""
    global backward
    orig = backward

    def marked(outputs, grads):
        with record_function("bench_backward"):
            orig(outputs, grads)
    backward = marked
    try:
        case.fn()
    finally:
        backward = orig


def measure_memory_cuda(case):
    for p in case.params:
        p.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    case.fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    gb = grad_bytes(case.params)
    return {"peak_bytes": peak - gb, "param_grad_bytes": gb,
            "method": "cuda max_memory_allocated - before - param grads"}


# ----------------------------------------------------------------------------------------------- sync check
def sync_check(M, args, device, dtype):
    """Count host synchronisations of our layer (forward+backward) by source line, and of torch.bincount."""
    import collections
    res = {}
    T, d, f = args.tokens, args.dim, args.ffn
    E = 64 if 64 in args.experts else args.experts[-1]

    def count(fn):
        fn()  # warm-up (lazy init, first survivor mask) outside the count
        torch.cuda.synchronize()
        where = collections.Counter()
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        for w in rec:
            if "synchroniz" in str(w.message).lower():
                where[f"{Path(w.filename).name}:{w.lineno}"] += 1
        return sum(where.values()), dict(where)

    dtypes = [dtype] + ([torch.float32] if dtype != torch.float32 else [])
    for dt in dtypes:
        for k, G, drop in ((1, 1, 0.0), (1, 8, 0.5), (2, 1, 0.0)):
            cfg = M.MoEConfig(moe_expert_count=E, moe_clusters=G, moe_top_k=k, cluster_dropout=drop)
            layer = M.MoELayer(cfg, d, f).to(device, dt).train()
            x = torch.randn(T, d, device=device, dtype=dt, requires_grad=True)

            def fwd_bwd(layer=layer, x=x):
                out = layer(x)
                torch.autograd.backward([out, sum(layer.last_losses.values())], [torch.ones_like(out), None])
            key = (f"moec-k{k}" + (f"-G{G}-drop" if drop else "") + f"-E{E}-"
                   + ("bf16" if dt == torch.bfloat16 else "fp32"))
            try:
                n, where = count(fwd_bwd)
            except Exception as e:  # noqa: BLE001
                res[key] = {"syncs": None, "error": f"{type(e).__name__}: {e}"[:300]}
                continue
            res[key] = {"syncs": n, "where": where}
            # the same with the profiler: cudaStreamSynchronize calls and device-to-host copies
            try:
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    fwd_bwd()
                    torch.cuda.synchronize()
                names = collections.Counter(e.name for e in prof.events())
                res[key]["profiler"] = {n_: c for n_, c in names.items()
                                        if any(s_ in n_ for s_ in ("Synchronize", "DtoH", "Memcpy"))}
            except Exception as e:  # noqa: BLE001
                res[key]["profiler_error"] = f"{type(e).__name__}: {e}"[:200]
    idx = torch.randint(0, E, (T,), device=device)
    res["torch.bincount(minlength=E)"] = {"syncs": count(lambda: torch.bincount(idx, minlength=E))[0]}
    res["zeros(E).scatter_add_"] = {"syncs": count(
        lambda: torch.zeros(E, dtype=torch.long, device=device).scatter_add_(0, idx, torch.ones_like(idx)))[0]}
    res["counts.tolist()"] = {"syncs": count(lambda: torch.bincount(idx, minlength=E).tolist())[0]}
    return res


# ----------------------------------------------------------------------------------------------- report
def machine_info(device):
    info = {"host": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    try:
        with open("/proc/cpuinfo") as fh:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except Exception:  # noqa: BLE001
        pass
    info["cores"] = os.cpu_count()
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    info["env"] = {k: os.environ[k] for k in ("THP_MEM_ALLOC_ENABLE", "OMP_NUM_THREADS", "OMP_WAIT_POLICY",
                                               "MKL_NUM_THREADS", "LD_PRELOAD", "MALLOC_MMAP_MAX_",
                                               "MALLOC_TRIM_THRESHOLD_") if k in os.environ}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        pass
    return info


def summarise(groups, device, T):
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
            row = {"case": c.name, "family": c.family, "E": c.E, "k": c.k, "G": c.G, "cluster_dropout": c.drop,
                   "median_ms": med * 1e3 if med else None,
                   "times_ms": [round(t * 1e3, 3) for t in c.times], "note": c.note}
            if med:
                row["tokens_per_s"] = T / med
            if med and dense_t:
                row["x_dense_time"] = med / dense_t
            if med and c.family in ("moec", "proto") and c.k in best_peer:
                row["best_peer"] = best_peer[c.k][1]
                row["speedup_vs_best_peer"] = best_peer[c.k][0] / med
            if c.mem:
                row.update({key: v for key, v in c.mem.items()})
                row["peak_mb"] = c.mem["peak_bytes"] / 2 ** 20
                if dense_m:
                    row["x_dense_mem"] = c.mem["peak_bytes"] / dense_m
            if c.error:
                row["error"] = c.error
            rows.append(row)
    return rows


def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def print_table(rows, cuda):
    head = (f"{'case':<20}{'E':>5}{'k':>3}{'G':>4}{'drop':>5}{'median ms':>11}{'x dense':>9}"
            f"{'vs best peer':>14}{'peak MB':>9}{'x dense':>8}{'saved MB':>10}")
    if cuda:
        head += f"{'Mtok/s':>9}"
    print(head)
    print("-" * len(head))
    for r in rows:
        peer = (f"{r['speedup_vs_best_peer']:.2f}x" if "speedup_vs_best_peer" in r else "-")
        line = (f"{r['case']:<20}{r['E']:>5}{r['k']:>3}{r['G']:>4}{r['cluster_dropout']:>5.1f}"
                f"{fmt(r['median_ms'], '11.1f')}{fmt(r.get('x_dense_time'), '9.2f')}{peer:>14}"
                f"{fmt(r.get('peak_mb'), '9.1f')}{fmt(r.get('x_dense_mem'), '8.2f')}"
                f"{fmt(r.get('saved_bytes', 0) / 2 ** 20 if 'saved_bytes' in r else None, '10.1f')}")
        if cuda:
            line += fmt(r.get("tokens_per_s", 0) / 1e6 if r.get("tokens_per_s") else None, "9.2f")
        if r.get("error"):
            line += "  ERROR " + r["error"][:60]
        print(line)


def main(argv=None):
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
    p.add_argument("--no-proto", action="store_true", help="skip the prototype expert kernel (CPU)")
    p.add_argument("--floors", action=argparse.BooleanOptionalAction, default=True,
                   help="matmul floors and the weight-gradient write (cheap)")
    p.add_argument("--sync-check", action="store_true", help="CUDA: count host synchronisations of our layer")
    p.add_argument("--quick", action="store_true", help="smoke run: T=256, d=128, FFN 512, E in {4, 8}, 1 round, no warm-up, 1 thread")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/layer_<device>.json)")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    if args.quick:
        args.tokens, args.dim, args.ffn, args.experts = 256, 128, 512, "4,8"
        args.rounds = args.rounds or 1
        args.warmup = 0
        args.threads = args.threads or 1  # a smoke run: one thread is immune to OpenMP barrier waits on a busy host
    args.threads = args.threads or 2
    args.experts = [int(e) for e in str(args.experts).split(",") if e]
    args.cases = [c for c in args.cases.split(",") if c]
    args.rounds = args.rounds or (10 if device.type == "cuda" else 4)
    args.iters = args.iters or (10 if device.type == "cuda" else 1)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    M = load_moec_modules()
    proto = None if args.no_proto else load_proto()
    peers = {} if args.no_peers else import_peers()
    if peers:
        init_process_group(device)
    info = machine_info(device)
    print(f"[bench] {info.get('gpu') or info.get('cpu')} | torch {torch.__version__} | {args.threads} threads | "
          f"{args.dtype} | T={args.tokens} d={args.dim} ffn={args.ffn} | E={args.experts} | "
          f"{args.rounds} rounds (+{args.warmup} warm-up) | peers: {sorted(peers) or 'none'}", flush=True)

    groups = []
    t_start = time.time()
    for E in args.experts:
        cases = build_group(E, args, M, proto, peers, device, dtype)
        run_rounds(cases, args, device)
        if not args.no_memory:
            for c in cases:
                if c.error or c.family == "floor":
                    continue
                try:
                    c.mem = measure_memory_cuda(c) if device.type == "cuda" else measure_memory_cpu(c)
                except Exception as e:  # noqa: BLE001
                    print(f"[bench] memory of {c.name} E={E} failed: {type(e).__name__}: {e}", file=sys.stderr)
        for c in cases:
            c.params = []  # let the group's tensors go
        groups.append(cases)
        med = {c.name: statistics.median(c.times) * 1e3 for c in cases if c.times}
        print(f"[bench] E={E:>4} done ({time.time() - t_start:.0f}s): " +
              ", ".join(f"{n} {t:.1f}ms" for n, t in med.items()), flush=True)
        del cases
        gc.unfreeze()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    rows = summarise(groups, device, args.tokens)
    print()
    print_table(rows, device.type == "cuda")
    result = {"machine": info, "command": " ".join([Path(sys.executable).name] + sys.argv),
              "settings": {"device": args.device, "dtype": args.dtype, "threads": args.threads,
                           "tokens": args.tokens, "dim": args.dim, "ffn": args.ffn, "experts": args.experts,
                           "rounds": args.rounds, "warmup": args.warmup, "iters": args.iters,
                           "quick": args.quick},
              "results": rows}
    if args.sync_check and device.type == "cuda":
        result["sync_check"] = sync_check(M, args, device, dtype)
        print("\n[bench] host synchronisations per forward+backward (torch.cuda.set_sync_debug_mode('warn')):")
        for key, v in result["sync_check"].items():
            print(f"  {key:<34} {v['syncs']!s:>4}  {v.get('where', '')}  {v.get('profiler', '')} {v.get('error', '')}")
    try:
        info["loadavg_at_end"] = os.getloadavg()
    except OSError:
        pass
    info["elapsed_s"] = round(time.time() - t_start)
    out = Path(args.out) if args.out else HERE / "results" / (
        f"layer_{device.type}{'_quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\n[bench] wrote {out} ({time.time() - t_start:.0f}s)")
    return result


if __name__ == "__main__":
    main()
