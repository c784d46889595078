"""Peak activation memory of one forward+backward step of a bench_layer.py case (parameters and parameter gradients
excluded).

CPU: one step under torch.profiler.profile(profile_memory=True). Every allocation and free of the CPU allocator is
an event with its byte count and address; they are replayed in order, the allocations that end up as a parameter's
.grad (found by address after the step) are dropped, and the running maximum is the peak. `saved` is the same count
when backward starts (what autograd holds for backward, plus the output). CUDA: torch.cuda.max_memory_allocated
over the step minus what was allocated before it, minus the bytes of the parameter gradients.
"""

import json
import os
import tempfile

import torch

_mark = None  # torch.profiler.record_function while measure_memory_cpu runs a step


def backward(outputs, grads):
    """The backward of every case's step; marked for the profiler, so that the replay knows where it starts."""
    if _mark is None:
        torch.autograd.backward(outputs, grads)
    else:
        with _mark("bench_backward"):
            torch.autograd.backward(outputs, grads)


def grad_bytes(params):
    return sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)


def measure_memory_cpu(case):
    global _mark
    from torch.profiler import ProfilerActivity, profile, record_function

    for p in case.params:
        p.grad = None
    _mark = record_function
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with record_function("bench_step"):
                case.fn()
    finally:
        _mark = None
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
    mem = sorted(
        (e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type", 0) == 0),
        key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)),
    )
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
    return {
        "peak_bytes": peak,
        "fwd_peak_bytes": fwd_peak,
        "saved_bytes": saved,
        "param_grad_bytes": grad_bytes(case.params),
        "method": "torch.profiler profile_memory replay",
    }


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
    return {
        "peak_bytes": peak - gb,
        "param_grad_bytes": gb,
        "method": "cuda max_memory_allocated - before - param grads",
    }


def measure_memory(case, device):
    return measure_memory_cuda(case) if device.type == "cuda" else measure_memory_cpu(case)
