"""Host synchronisations of the MoE layer on CUDA (bench_layer.py --sync-check): one forward+backward under
torch.cuda.set_sync_debug_mode('warn'), counted by source line, plus the profiler's synchronize and device-to-host
copy events; and, for comparison, those of torch.bincount and its scatter_add_ replacement."""

import collections
import warnings
from pathlib import Path

import torch

from fairseq_moec.modules import MoEConfig, MoELayer


def count(fn):
    """(number, {file:line: number}) of the host synchronisations of one call of FN, after an uncounted warm-up
    call (lazy init, first survivor mask), seen by torch.cuda.set_sync_debug_mode('warn')."""
    fn()
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


def sync_check(args, device, dtype):
    """Count host synchronisations of our layer (forward+backward) by source line, and of torch.bincount."""
    res = {}
    T, d, f = args.tokens, args.dim, args.ffn
    E = 64 if 64 in args.experts else args.experts[-1]

    dtypes = [dtype] + ([torch.float32] if dtype != torch.float32 else [])
    for dt in dtypes:
        for k, G, drop in ((1, 1, 0.0), (1, 8, 0.5), (2, 1, 0.0)):
            cfg = MoEConfig(moe_expert_count=E, moe_clusters=G, moe_top_k=k, cluster_dropout=drop)
            layer = MoELayer(cfg, d, f).to(device, dt).train()
            x = torch.randn(T, d, device=device, dtype=dt, requires_grad=True)

            def fwd_bwd(layer=layer, x=x):
                out = layer(x)
                torch.autograd.backward([out, sum(layer.last_losses.values())], [torch.ones_like(out), None])

            key = (
                f"moec-k{k}"
                + (f"-G{G}-drop" if drop else "")
                + f"-E{E}-"
                + ("bf16" if dt == torch.bfloat16 else "fp32")
            )
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
                res[key]["profiler"] = {
                    n_: c for n_, c in names.items() if any(s_ in n_ for s_ in ("Synchronize", "DtoH", "Memcpy"))
                }
            except Exception as e:  # noqa: BLE001
                res[key]["profiler_error"] = f"{type(e).__name__}: {e}"[:200]
    idx = torch.randint(0, E, (T,), device=device)
    res["torch.bincount(minlength=E)"] = {"syncs": count(lambda: torch.bincount(idx, minlength=E))[0]}
    res["zeros(E).scatter_add_"] = {
        "syncs": count(
            lambda: torch.zeros(E, dtype=torch.long, device=device).scatter_add_(0, idx, torch.ones_like(idx))
        )[0]
    }
    res["counts.tolist()"] = {"syncs": count(lambda: torch.bincount(idx, minlength=E).tolist())[0]}
    return res
