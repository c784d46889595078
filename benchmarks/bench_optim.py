#!/usr/bin/env python
"""Optimizer step time: fairseq's `adam` (a Python loop of several ops per parameter) against the plugin's
`torch_adam` (fairseq's Adam options run by torch.optim.AdamW(fused=True)), on the parameters of the end-to-end
benchmark's MoEC model: bench_e2e.py's model, i.e. the small Transformer with 64 experts (8 clusters) in encoder and
decoder layer 1, built by fairseq with a joined dictionary of the 8k sentencepiece vocabulary's size.

    python benchmarks/bench_optim.py                 # CPU, 2 threads, 10 timed rounds + 2 warm-up
    python benchmarks/bench_optim.py --quick         # smoke run: 8 experts, 2 rounds, 1 thread

Each optimizer updates its own copy of the parameters with the same fixed random fp32 gradients. The timing is
interleaved: every round times one optimizer.step() of each (the order alternates between rounds), so that the
ratio adam / torch_adam is measured side by side; the figures are medians over the rounds. Writes JSON with the
machine, its load, the git commit and dirty state, the settings and every time.
"""

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import bench_e2e
import torch

from fairseq_moec.pipeline import machine, small_model

HERE = Path(__file__).resolve().parent
OPTIMIZERS = ("adam", "torch_adam")


def fairseq_args(data, experts, clusters, optimizer):
    """fairseq-train's parsed arguments for bench_e2e.py's MoEC model and OPTIMIZER (its Adam settings)."""
    from fairseq import options

    sizes = SimpleNamespace(
        **{k: str(v) for k, v in small_model.SIZES.items()},
        experts=str(experts),
        clusters=str(clusters),
        moe_layers="1",
    )
    argv = [
        str(data),
        "--source-lang",
        "es",
        "--target-lang",
        "en",
        "--cpu",
        "--optimizer",
        optimizer,
        "--adam-betas",
        "(0.9, 0.98)",
        "--lr",
        "2e-3",
        *bench_e2e.criterion_args("moec"),
        *(str(a) for a in bench_e2e.model_args(sizes, "moec")),
    ]
    return options.parse_args_and_arch(options.get_training_parser(), argv)


def build(args):
    """The model's parameters, and one optimizer per name over its own copy of them, with equal gradients."""
    from fairseq import optim, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    import fairseq_moec  # noqa: F401  (registers the model and torch_adam)

    with tempfile.TemporaryDirectory() as data:
        # a joined dictionary as fairseq-preprocess writes it: 4 specials + symbols, padded to a multiple of 8
        words = "".join(f"w{i} 1\n" for i in range(args.vocab + (-(args.vocab + 4)) % 8))
        for lang in ("es", "en"):
            Path(data, f"dict.{lang}.txt").write_text(words)
        parsed = {name: fairseq_args(data, args.experts, args.clusters, name) for name in OPTIMIZERS}
        task = tasks.setup_task(parsed["adam"])
        model = task.build_model(parsed["adam"])
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(p.shape, generator=g) * 1e-3 for p in model.parameters()]
    opts = {}
    for name in OPTIMIZERS:
        params = [copy.deepcopy(p.detach()).requires_grad_() for p in model.parameters()]
        for p, grad in zip(params, grads):
            p.grad = grad.clone()
        opts[name] = optim.build_optimizer(convert_namespace_to_omegaconf(parsed[name]).optimizer, params)
    shapes = [list(p.shape) for p in model.parameters()]
    return shapes, opts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2; 1 with --quick)")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--clusters", type=int, default=8)
    p.add_argument("--vocab", type=int, default=8000, help="dictionary symbols besides the 4 specials")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="smoke run: 8 experts in 4 clusters, 2 rounds, 1 thread")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/optim_cpu.json)")
    args = p.parse_args(argv)
    if args.quick:
        args.experts, args.clusters, args.rounds, args.warmup = 8, 4, 2, 1
        args.threads = args.threads or 1
    args.threads = args.threads or 2
    torch.set_num_threads(args.threads)
    t_start = time.time()
    info = machine.machine_info("cpu", args.threads)
    shapes, opts = build(args)
    n_params = sum(torch.Size(s).numel() for s in shapes)
    print(
        f"[optim] {info.get('cpu')} | torch {torch.__version__} | {args.threads} threads | load "
        f"{info['loadavg_at_start']} | git {info['git_commit']}{' (dirty tree)' if info['git_dirty'] else ''} | "
        f"{len(shapes)} tensors, {n_params / 1e6:.1f}M parameters (E={args.experts})",
        flush=True,
    )
    times = {name: [] for name in OPTIMIZERS}
    for r in range(args.warmup + args.rounds):
        for name in OPTIMIZERS if r % 2 == 0 else OPTIMIZERS[::-1]:
            t0 = time.perf_counter()
            opts[name].step()
            dt = time.perf_counter() - t0
            if r >= args.warmup:
                times[name].append(dt * 1e3)
    median = {name: statistics.median(t) for name, t in times.items()}
    ratio = median["adam"] / median["torch_adam"]
    for name in OPTIMIZERS:
        print(f"{name:<12} median {median[name]:8.1f} ms per step  ({', '.join(f'{t:.0f}' for t in times[name])})")
    print(f"adam / torch_adam: {ratio:.2f}x")
    result = {
        "machine": machine.finish(info, t_start),
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "settings": vars(args),
        "parameters": n_params,
        "tensors": len(shapes),
        "step_ms": times,
        "median_ms": median,
        "ratio_adam_over_torch_adam": ratio,
    }
    out = Path(args.out) if args.out else HERE / "results" / f"optim_cpu{'_quick' if args.quick else ''}.json"
    from layer_report import write_json

    write_json(out, result)
    print(f"[optim] wrote {out}")
    return result


if __name__ == "__main__":
    main()
