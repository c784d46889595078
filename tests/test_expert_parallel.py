"""Expert parallelism: 2 gloo processes on CPU against one process holding every expert; fairseq-train under
torchrun (train, save, resume, consolidate, generate on one process); a process dying mid-training."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fairseq_moec  # noqa: F401  (allowlists the globals of fairseq checkpoints for torch.load)
from fairseq_moec import sharded_checkpoint as sc
from fairseq_moec.modules import ExpertParallel, MoEConfig, MoELayer

from conftest import FIXTURE, PLUGIN, ROOT, TINY_MOEC_ARGS, cli, run

W, D, F = 2, 16, 24
# (config, tokens per process): top-1 with cluster dropout and padding; top-2 with token dropping (capacity)
# and process 1 holding padding only, so that it sends nothing and still serves its experts.
CASES = [
    (dict(moe_expert_count=8, moe_clusters=2, cluster_dropout=0.5, moe_expert_sublayers=2), (13, 9)),
    (dict(moe_expert_count=4, moe_clusters=2, moe_top_k=2, moe_capacity_factor=0.6, moe_router="cosine"), (17, 0)),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_inputs(case, rank):
    """Tokens of process ``rank`` (with a few padding positions), the padding mask and an output projection."""
    g = torch.Generator().manual_seed(100 + rank)
    n = case[1][rank]
    x = torch.randn(n + 3, D, generator=g, dtype=torch.float64)
    pad = torch.zeros(n + 3, dtype=torch.bool)
    pad[torch.randperm(n + 3, generator=g)[:3]] = True
    if n == 0:
        pad[:] = True
    return x.requires_grad_(), pad, torch.randn(n + 3, D, generator=g, dtype=torch.float64)


def build_layer(case, ep=None):
    torch.manual_seed(0)  # the same initial experts whatever the placement (see GroupedLinear)
    layer = MoELayer(MoEConfig(**case[0]), D, F, layer_id=3, expert_parallel=ep).double().train()
    layer.set_num_updates(0)
    return layer


def loss_of(model, x, pad, proj, moe=None):
    out = model(x, pad)
    aux = (moe or model).last_losses
    return out, (out * proj).sum() + aux["balance"] + 0.5 * aux["cluster"] + 0.1 * aux["z"]


class SharedThenMoE(torch.nn.Module):
    """A shared (data-parallel) linear map before a MoE layer: what fairseq's gradient handling sees."""

    def __init__(self, ep=None):
        super().__init__()
        torch.manual_seed(0)
        self.shared = torch.nn.Linear(D, D)
        self.moe = MoELayer(MoEConfig(**CASES[0][0]), D, F, expert_parallel=ep)
        self.double().train()

    def forward(self, x, pad):
        return self.moe(self.shared(x), pad)


def fairseq_grads(backend, rank):
    """Gradients as fairseq's trainer leaves them before clipping: DDP-averaged, then times W / sample_size."""
    from fairseq.distributed import LegacyDistributedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    from fairseq_moec.expert_parallel import prepare_for_expert_parallel

    model = SharedThenMoE(ExpertParallel(rank, W))
    prepare_for_expert_parallel(model, model.moe.expert_parallel)
    wrapped = (DistributedDataParallel(model) if backend == "pytorch_ddp"
               else LegacyDistributedDataParallel(model, dist.group.WORLD))
    x, pad, proj = make_inputs(CASES[0], rank)
    loss_of(wrapped, x.detach(), pad, proj, model.moe)[1].backward()
    if backend == "legacy_ddp":
        wrapped.all_reduce_grads()
    sample_size = sum((~make_inputs(CASES[0], r)[1]).sum().item() for r in range(W))
    return {n: p.grad * W / sample_size for n, p in model.named_parameters()}


def ep_worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W)
    results = []
    for case in CASES:
        layer = build_layer(case, ExpertParallel(rank, W))
        x, pad, proj = make_inputs(case, rank)
        out, loss = loss_of(layer, x, pad, proj)
        loss.backward()
        results.append({"out": out.detach(), "x_grad": x.grad,
                        "grads": {n: p.grad for n, p in layer.named_parameters()}})
    fairseq = {backend: fairseq_grads(backend, rank) for backend in ("pytorch_ddp", "legacy_ddp")}
    torch.save({"layer": results, "fairseq": fairseq}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_processes_match_one_process_holding_all_experts(tmp_path):
    # fork: the workers inherit the imported modules instead of importing fairseq again (seconds each)
    mp.start_processes(ep_worker, args=(free_port(), str(tmp_path)), nprocs=W, start_method="fork")
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(W)]
    ranks = [s["layer"] for s in saved]
    for c, case in enumerate(CASES):
        full = build_layer(case)  # one process, all experts, the two processes' batches one after the other
        for r in range(W):
            x, pad, proj = make_inputs(case, r)
            out, loss = loss_of(full, x, pad, proj)
            loss.backward()
            torch.testing.assert_close(ranks[r][c]["out"], out.detach(), atol=1e-5, rtol=0)
            torch.testing.assert_close(ranks[r][c]["x_grad"], x.grad, atol=1e-5, rtol=0)
        E = case[0]["moe_expert_count"]
        for name, p in full.named_parameters():
            if name.startswith("experts."):  # each process holds E/W experts: compare with its block
                for r in range(W):
                    block = slice(r * E // W, (r + 1) * E // W)
                    torch.testing.assert_close(ranks[r][c]["grads"][name], p.grad[block], atol=1e-5, rtol=0)
            else:  # router: replicated, its gradient is the sum over processes
                total = sum(ranks[r][c]["grads"][name] for r in range(W))
                torch.testing.assert_close(total, p.grad, atol=1e-5, rtol=0)

    # through fairseq's DDP wrappers and gradient scaling: single-process training on the union of the batches
    full = SharedThenMoE()
    sample_size = 0
    for r in range(W):
        x, pad, proj = make_inputs(CASES[0], r)
        loss_of(full, x.detach(), pad, proj, full.moe)[1].backward()
        sample_size += (~pad).sum().item()
    E = CASES[0][0]["moe_expert_count"]
    for backend in ("pytorch_ddp", "legacy_ddp"):
        for name, p in full.named_parameters():
            expected = p.grad / sample_size
            for r in range(W):
                got = saved[r]["fairseq"][backend][name]
                if ".experts." in name:
                    expected_r = expected[r * E // W:(r + 1) * E // W]
                else:
                    expected_r = expected
                torch.testing.assert_close(got, expected_r, atol=1e-5, rtol=0, msg=f"{backend} {name} rank {r}")
