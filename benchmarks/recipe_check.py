#!/usr/bin/env python
"""The WMT recipe's expert path on one device: what the precision choice costs against fp16, and the host
synchronisations of a training step of the recipe's MoE layer.

    python benchmarks/recipe_check.py --device cuda --out benchmarks/results/recipe_check_cuda.json
    python benchmarks/recipe_check.py --quick        # CPU smoke run: small sizes, no sync count (CUDA only)

Precision and memory: expert FFN stacks as in the recipe (3 sublayers, relu) on rows grouped by expert (uneven
counts, one expert without rows), forward + backward with a fixed output gradient, against fp64 computed from the
same (bf16- or fp16-representable) weights, input and output gradient. Figures: relative Frobenius error of the
output and the worst one over the gradients (input, every expert weight and bias); bytes autograd keeps for
backward (parameters excluded); on CUDA the peak memory of forward+backward. Three ways to run the experts:
  bf16          the plugin's bf16 path: one torch._grouped_mm per linear map (the recipe's choice)
  fp16-loop     the plugin's fp16 path: one matmul per expert
  fp16-as-bf16  the way not taken: fp16 weights and rows cast to bf16 for one grouped call, output cast back
With relu a pre-activation within rounding of zero can flip sign, which moves its whole gradient: part of the
gradient error of every low precision, and what a user gets. (tests/test_experts_bf16.py checks the arithmetic
alone, with the signs fixed.)

Weight updates: --memory-efficient-bf16 keeps the weights in bf16 (no fp32 master copy), so an optimizer step
smaller than half a unit in the last place is rounded away. For an expert weight of Transformer-big (fc1: fan-in
1024, nn.Linear's initialisation) and steps of the size of the learning rate (Adam's steps are about lr), the
fraction of elements left unchanged, bf16 against fp16 weights, at the recipe's peak, middle and last rates.

Syncs (CUDA): torch.cuda.set_sync_debug_mode('warn') over one forward + losses + backward of the recipe's MoE layer
(moec64_big: E=64 in 8 clusters, cluster dropout 0.5, top-1, cosine router, 3 sublayers, d 1024, FFN 4096), in
bf16 and fp16, with and without a padding mask; plus the profiler's device-to-host copies. A recipe step runs 2
MoE layers per micro-batch.
"""

import argparse
import collections
import json
import sys
from pathlib import Path

import layer_sync
import torch
import torch.nn.functional as F

from fairseq_moec.modules import MoEConfig, MoELayer
from fairseq_moec.modules.experts import ExpertFFNs, Groups
from fairseq_moec.pipeline import machine as machine_state

HERE = Path(__file__).resolve().parent

RECIPE_LAYER = dict(
    moe_expert_count=64,
    moe_clusters=8,
    moe_top_k=1,
    moe_router="cosine",
    moe_expert_sublayers=3,
    cluster_dropout=0.5,
    cluster_dropout_reroute="cluster",
    moe_cluster_loss="intra",
)


def cast_grouped_forward(experts: ExpertFFNs, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """fp16 weights and rows through one bf16 grouped call per linear map (the alternative to bf16 training)."""
    offs = counts.cumsum(0).to(torch.int32)
    row_expert = torch.repeat_interleave(torch.arange(len(counts), device=x.device), counts, output_size=x.shape[0])
    for fc1, fc2 in zip(experts.fc1, experts.fc2):
        for lin in (fc1, fc2):
            y = torch._grouped_mm(x.to(torch.bfloat16), lin.weight.to(torch.bfloat16).transpose(1, 2), offs=offs)
            x = y.to(x.dtype) + lin.bias[row_expert]
            x = F.relu(x) if lin is fc1 else x
    return x


def saved_bytes_and_output(fn, params):
    keep = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in keep:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def precision(device, E, d, ffn, rows):
    torch.manual_seed(0)
    counts = torch.randint(1, 2 * rows // E, (E,))
    counts[1] = 0
    counts = counts.to(device)
    n = int(counts.sum())
    with torch.device(device):  # built on the device: initialising big experts on the host takes long
        base = ExpertFFNs(E, d, ffn, 3)
    x0, g0 = torch.randn(n, d, device=device), torch.randn(n, d, device=device)
    res = {"experts": E, "dim": d, "ffn": ffn, "rows": n, "sublayers": 3, "activation": "relu", "methods": {}}
    for name, dtype in (("bf16", torch.bfloat16), ("fp16-loop", torch.float16), ("fp16-as-bf16", torch.float16)):
        if name == "fp16-as-bf16" and not hasattr(torch, "_grouped_mm"):
            continue
        with torch.device(device):
            experts = ExpertFFNs(E, d, ffn, 3).to(dtype)
        experts.load_state_dict(base.state_dict())
        x = x0.to(dtype).requires_grad_()
        fwd = (
            (lambda e=experts: cast_grouped_forward(e, x, counts))
            if name == "fp16-as-bf16"
            else (lambda e=experts: e(x, counts))
        )
        path = (
            "grouped"
            if name != "fp16-loop" and (name == "fp16-as-bf16" or Groups.of(x, counts).counts is None)
            else "loop"
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        saved, out = saved_bytes_and_output(fwd, list(experts.parameters()))
        out.backward(g0.to(dtype))
        peak = torch.cuda.max_memory_allocated() - before if device.type == "cuda" else None
        got = {"output": out, "input": x.grad, **{k: p.grad for k, p in experts.named_parameters()}}

        with torch.device(device):
            ref = ExpertFFNs(E, d, ffn, 3).to(torch.float64)
        ref.load_state_dict({k: v.double() for k, v in experts.state_dict().items()})
        x64 = x.detach().double().requires_grad_()
        ref_out = ref(x64, counts)
        ref_out.backward(g0.to(dtype).double())
        want = {"output": ref_out, "input": x64.grad, **{k: p.grad for k, p in ref.named_parameters()}}
        err = {k: float((got[k].detach().double() - want[k].detach()).norm() / want[k].detach().norm()) for k in want}
        grads = {k: v for k, v in err.items() if k != "output"}
        worst = max(grads, key=grads.get)
        res["methods"][name] = {
            "dtype": str(dtype).replace("torch.", ""),
            "path": path,
            "output_rel_err": err["output"],
            "output_rel_err_x2^-8": err["output"] / 2**-8,
            "worst_grad": worst,
            "worst_grad_rel_err": grads[worst],
            "worst_grad_rel_err_x2^-8": grads[worst] / 2**-8,
            "median_grad_rel_err": sorted(grads.values())[len(grads) // 2],
            "saved_for_backward_bytes": saved,
            "cuda_peak_bytes": peak,
        }
        del experts, ref, out, ref_out
    return res


def update_rounding(lrs=(5e-4, 1e-4, 4.4e-5)):
    torch.manual_seed(0)
    w = torch.empty(4096, 1024)
    torch.nn.init.kaiming_uniform_(w, a=5**0.5)
    res = {}
    for lr in lrs:
        step = lr * torch.randn_like(w).clamp(-3, 3)
        for dtype in (torch.bfloat16, torch.float16):
            w0 = w.to(dtype)
            lost = float(((w0.float() - step).to(dtype) == w0).float().mean())
            res[f"lr={lr:g} {str(dtype).replace('torch.', '')}"] = lost
    return res


def count_syncs(fn):
    """layer_sync.count's synchronisations of FN, plus the profiler's synchronize and device-to-host events."""
    n, where = layer_sync.count(fn)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = collections.Counter(e.name for e in prof.events())
    d2h = {k: v for k, v in names.items() if "DtoH" in k or "Synchronize" in k}
    return {"syncs": n, "where": where, "profiler": d2h}


def syncs(device, tokens):
    res = {"layer": RECIPE_LAYER, "dim": 1024, "ffn": 4096, "tokens": tokens}
    L, B = 64, tokens // 64
    for dtype in (torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        with torch.device(device):
            layer = MoELayer(MoEConfig(**RECIPE_LAYER), 1024, 4096).to(dtype).train()
        x = torch.randn(L, B, 1024, device=device, dtype=dtype, requires_grad=True)
        pad = torch.zeros(L, B, dtype=torch.bool, device=device)
        pad[-L // 8 :, ::2] = True  # padding at the end of every other sentence
        for padded in (False, True):

            def step(layer=layer, x=x, mask=pad if padded else None):
                out = layer(x, mask)
                torch.autograd.backward([out, sum(layer.last_losses.values())], [torch.ones_like(out), None])

            key = f"{str(dtype).replace('torch.', '')}-{'padding' if padded else 'no-padding'}"
            try:
                res[key] = count_syncs(step)
            except Exception as e:  # noqa: BLE001
                res[key] = {"syncs": None, "error": f"{type(e).__name__}: {e}"[:300]}
            print(
                f"[recipe] syncs per MoE-layer forward+backward, {key}: {res[key].get('syncs')} "
                f"{res[key].get('where', res[key].get('error'))}",
                flush=True,
            )
        del layer, x
        torch.cuda.empty_cache()
    return res


def machine(device):
    """The machine, its load, and the git commit and dirty state of the code (fairseq_moec.pipeline.machine)."""
    info = machine_state.machine_info(device)
    if device.type == "cuda":
        info["capability"] = list(torch.cuda.get_device_capability())
    return info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="small sizes (E=4, d 64, FFN 256, 512 rows)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens per batch of the sync count")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/recipe_check_<device>.json)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(min(torch.get_num_threads(), 2) if device.type == "cpu" else torch.get_num_threads())
    result = {"machine": machine(device), "command": " ".join([Path(sys.executable).name] + sys.argv)}
    sizes = (4, 64, 256, 512) if args.quick else (16, 1024, 4096, 8192)
    result["precision"] = precision(device, *sizes)
    print(f"[recipe] precision against fp64 (E={sizes[0]}, d {sizes[1]}, FFN {sizes[2]}, 3 sublayers, relu):")
    for name, r in result["precision"]["methods"].items():
        peak = "-" if r["cuda_peak_bytes"] is None else f"{r['cuda_peak_bytes'] / 2**20:.1f} MiB"
        print(
            f"  {name:<13} {r['path']:<8} output {r['output_rel_err_x2^-8']:6.2f} x 2^-8, worst gradient "
            f"{r['worst_grad_rel_err_x2^-8']:6.2f} x 2^-8 ({r['worst_grad']}), saved for backward "
            f"{r['saved_for_backward_bytes'] / 2**20:.2f} MiB, CUDA peak {peak}"
        )
    result["update_lost_to_rounding"] = update_rounding()
    print(
        "[recipe] expert weight updates of size lr lost to rounding: "
        + ", ".join(f"{k} {v:.1%}" for k, v in result["update_lost_to_rounding"].items())
    )
    if device.type == "cuda":
        result["syncs"] = syncs(device, args.tokens)
    out = Path(args.out) if args.out else HERE / "results" / f"recipe_check_{device.type}{'_quick' * args.quick}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"[recipe] wrote {out}")
    return result


if __name__ == "__main__":
    main()
