"""Dispatch and the whole MoE layer against naive per-token loops (outputs and every gradient)."""

import pytest
import torch

from fairseq_moec.modules import MoEConfig, MoELayer, capacity, dispatch_combine
from fairseq_moec.modules.experts import ExpertFFNs, GroupedLinear, Groups, _ExpertLoop


def naive_expert(experts: ExpertFFNs, e: int, v: torch.Tensor) -> torch.Tensor:
    for fc1, fc2 in zip(experts.fc1, experts.fc2):
        v = fc2.weight[e] @ torch.relu(fc1.weight[e] @ v + fc1.bias[e]) + fc2.bias[e]
    return v


def naive_keep(expert_idx, num_experts, slots):
    """GShard priority: all first choices (in token order) before any second choice; an expert takes
    assignments until its ``slots`` are full."""
    T, k = expert_idx.shape
    keep = [[False] * k for _ in range(T)]
    used = [0] * num_experts
    for j in range(k):
        for t in range(T):
            e = int(expert_idx[t, j])
            if slots is None or used[e] < slots:
                keep[t][j] = True
                used[e] += 1
    return torch.tensor(keep)


def naive_dispatch(x, expert_idx, gates, experts, slots):
    keep = naive_keep(expert_idx, experts.num_experts, slots)
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros_like(x[t])
        for j in range(expert_idx.shape[1]):
            if keep[t, j]:
                acc = acc + gates[t, j] * naive_expert(experts, int(expert_idx[t, j]), x[t])
        rows.append(acc)
    return torch.stack(rows), keep


def grads(*tensors_and_modules):
    out = []
    for obj in tensors_and_modules:
        params = [obj] if isinstance(obj, torch.Tensor) else list(obj.parameters())
        out += [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
    return out


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("factor", [None, 0.5, 1.0])
@pytest.mark.parametrize("sublayers", [1, 2])
def test_dispatch_matches_per_token_loop(top_k, factor, sublayers):
    torch.manual_seed(0)
    T, d, f, E = 23, 8, 12, 5
    experts = ExpertFFNs(E, d, f, sublayers).double()
    x = torch.randn(T, d, dtype=torch.double, requires_grad=True)
    # skewed assignments so that some experts overflow their capacity
    scores = torch.randn(T, E, dtype=torch.double) + torch.tensor([2.0, 1.0, 0, 0, -3.0], dtype=torch.double)
    expert_idx = scores.topk(top_k, dim=-1).indices
    gates = torch.rand(T, top_k, dtype=torch.double, requires_grad=True)
    slots = capacity(T, E, top_k, factor)

    out, kept = dispatch_combine(x, expert_idx, gates, E, experts, slots)
    (out * torch.linspace(-1, 1, d, dtype=torch.double)).sum().backward()
    fast = grads(x, gates, experts)

    ref, ref_keep = naive_dispatch(x, expert_idx, gates, experts, slots)
    (ref * torch.linspace(-1, 1, d, dtype=torch.double)).sum().backward()
    slow = grads(x, gates, experts)

    assert torch.equal(kept, ref_keep)
    if factor == 0.5:
        assert not kept.all()  # the case really drops tokens
    torch.testing.assert_close(out, ref)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b)


def test_capacity_formula():
    assert capacity(100, 8, 1, None) is None
    assert capacity(100, 8, 1, 1.0) == 13  # ceil(100 / 8)
    assert capacity(100, 8, 2, 1.25) == 32  # ceil(1.25 * 2 * 100 / 8) = ceil(31.25)


def test_expert_loop_gradients_match_finite_differences():
    """The fp32/fp64 path (one autograd node for all experts) against torch's numerical gradient, with an
    expert that gets no rows (its weight and bias gradients must be exact zeros, not stale memory)."""
    torch.manual_seed(0)
    lin = GroupedLinear(4, 3, 5).double()
    counts = [2, 0, 3, 1]
    x = torch.randn(sum(counts), 3, dtype=torch.double, requires_grad=True)
    groups = Groups(counts, None, None)
    assert torch.autograd.gradcheck(lambda x, w, b: _ExpertLoop.apply(x, w, b, counts), (x, lin.weight, lin.bias))
    lin(x, groups).pow(2).sum().backward()
    assert torch.all(lin.weight.grad[1] == 0) and torch.all(lin.bias.grad[1] == 0)
    rows = torch.cat([torch.full((n,), e) for e, n in enumerate(counts)])
    ref = torch.stack([lin.weight[e] @ v + lin.bias[e] for e, v in zip(rows.tolist(), x)])
    torch.testing.assert_close(lin(x, groups), ref)
    # no gradient wanted for the input (first layer of a frozen stack): none computed
    y = lin(x.detach(), groups)
    assert y.requires_grad and torch.autograd.grad(y.sum(), lin.weight)[0].shape == lin.weight.shape


@pytest.mark.parametrize("top_k", [1, 2])
def test_layer_matches_naive_layer_and_skips_padding(top_k):
    """Whole layer (eval: all experts, dropless) against a per-token reference that recomputes routing."""
    torch.manual_seed(1)
    cfg = MoEConfig(moe_expert_count=6, moe_clusters=3, moe_top_k=top_k)
    layer = MoELayer(cfg, 8, 16).double().eval()
    x = torch.randn(5, 3, 8, dtype=torch.double, requires_grad=True)  # [L, B, d]
    pad = torch.zeros(5, 3, dtype=torch.bool)
    pad[3:, 0] = True
    out = layer(x, pad)
    out.pow(2).sum().backward()
    fast = grads(x, layer)

    ref = torch.zeros_like(x)
    for t in range(5):
        for b in range(3):
            if pad[t, b]:
                continue
            v = x[t, b]
            p = torch.softmax(layer.router.weight @ v, dim=-1)
            gate, idx = p.topk(top_k)
            if top_k == 2:
                gate = gate / gate.sum()
            ref[t, b] = sum(g * naive_expert(layer.experts, int(e), v) for g, e in zip(gate, idx))
    # the reference has no graph through the padding rows; give it the same objective
    ref.pow(2).sum().backward()
    slow = grads(x, layer)

    assert torch.all(out[pad] == 0)
    # the router runs in fp32 by design, so agreement is to fp32 precision
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert float(layer.last_stats["tokens"]) == 15 - 2  # padding excluded from routing statistics


def test_capacity_train_and_eval_factors_are_separate():
    torch.manual_seed(0)
    cfg = MoEConfig(moe_expert_count=4, moe_capacity_factor=0.25, moe_eval_capacity_factor=None)
    layer = MoELayer(cfg, 8, 16)
    x = torch.randn(64, 8)
    layer.train()(x)
    assert float(layer.last_stats["dropped_frac"]) > 0.5  # 4 experts x 4 slots for 64 tokens
    layer.eval()(x)
    assert float(layer.last_stats["dropped_frac"]) == 0.0


# The MoE layers of the WMT'14 recipe (configs/wmt14_en_de: moe_layers/paper.yaml, method/moec.yaml, moec64_big.yaml):
# Transformer-big sizes, 64 experts in 8 clusters, top-1, cosine router, 3 sublayers per expert, dropless (no
# capacity factor), cluster dropout 0.5 with rerouting inside the cluster, intra cluster loss; trained in bf16.
WMT_BIG = dict(
    moe_expert_count=64,
    moe_clusters=8,
    moe_top_k=1,
    moe_router="cosine",
    moe_expert_sublayers=3,
    moe_capacity_factor=None,
    cluster_dropout=0.5,
    cluster_dropout_reroute="cluster",
    moe_cluster_loss="intra",
)
META_CASES = {
    "top1": (dict(moe_expert_count=8), 16, 32),
    "top2": (dict(moe_expert_count=8, moe_top_k=2), 16, 32),
    "top1-drop": (dict(moe_expert_count=8, moe_clusters=2, cluster_dropout=0.5), 16, 32),
    "wmt-big": (WMT_BIG, 1024, 4096),  # meta tensors hold no data: the real sizes cost nothing
    "token-loss": (dict(moe_expert_count=8, moe_clusters=2, cluster_dropout=0.5, moe_cluster_loss="token"), 16, 32),
    "official-recipe": (
        dict(
            WMT_BIG,
            moe_gate="sigmoid",
            moe_loss_temperature=0.07,
            moe_cluster_loss_norm="official",
            cluster_dropout_reroute="global",
        ),
        1024,
        4096,
    ),
}


def meta_training_step(cfg_kwargs, d, ffn, tokens, padding=False):
    """One training step of a bf16 MoE layer on the meta device: forward, the auxiliary losses, backward."""
    with torch.device("meta"):  # built there: no CPU initialisation of the big experts
        layer = MoELayer(MoEConfig(**cfg_kwargs), d, ffn)
    layer = layer.to(dtype=torch.bfloat16).train()
    layer.set_num_updates(1000)  # a later cluster-dropout period than the one built at construction
    x = torch.empty(tokens // 8, 8, d, dtype=torch.bfloat16, device="meta", requires_grad=True)  # [L, B, d]
    pad = torch.zeros(tokens // 8, 8, dtype=torch.bool, device="meta") if padding else None
    out = layer(x, pad)
    (out.float().sum() + sum(layer.last_losses.values())).backward()
    return layer, x, out


@pytest.mark.parametrize("case", list(META_CASES))
def test_grouped_path_never_reads_device_data_on_the_host(case):
    """GPU requirement (no host synchronisation in routing, dispatch, losses and statistics), checked on CPU:
    the meta device has no data, so every host read of device data (bincount, boolean masks, nonzero,
    .tolist(), .item(), repeat_interleave without output_size) raises there. The bf16 path must run a whole
    training step (forward, losses, statistics, backward) on meta tensors, also with the WMT recipe's flags and
    sizes. (The fp32/fp16 loop reads the split sizes once, counts.tolist(), by design; a capacity factor, which
    the recipe does not set, adds a read of the kept assignments.)"""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    cfg_kwargs, d, ffn = META_CASES[case]
    layer, x, out = meta_training_step(cfg_kwargs, d, ffn, tokens=4096)
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.shape == p.shape, name
    assert layer.experts.fc1[0].weight.dtype == torch.bfloat16 and len(layer.experts.fc1) == cfg_kwargs.get(
        "moe_expert_sublayers", 1
    )
    assert set(layer.last_stats) >= {"load_cv", "expert_load", "tokens"}
    with pytest.raises(NotImplementedError):  # the premise: meta refuses a host read
        torch.bincount(torch.zeros(3, dtype=torch.long, device="meta"))


def test_grouped_path_with_padding_never_reads_device_data_on_the_host():
    """fairseq batches carry padding: the dropless bf16 path routes the padding rows too and masks them out of
    the output, the losses and the statistics, with no host read (removing them with nonzero() would read the
    number of real tokens at every MoE layer and forward)."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm not available")
    cfg_kwargs, d, ffn = META_CASES["wmt-big"]
    meta_training_step(cfg_kwargs, d, ffn, tokens=4096, padding=True)
