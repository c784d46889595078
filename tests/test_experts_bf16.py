"""The bf16 expert path (one torch._grouped_mm per linear map), which the WMT recipe trains with on GPUs.

Against an independent fp64 reference (a per-expert loop written here), outputs and every gradient (input, every
expert weight and bias) to a tolerance scaled to bf16's precision, and what it keeps for backward against the fp16
loop. On the CPU torch._grouped_mm runs in bf16 (torch 2.13) through torch's fallback, a loop of matmuls with fp32
accumulation, not the fused CUDA kernel of H100-class GPUs: benchmarks/recipe_check.py measures that one (run by
benchmarks/gpu_check.sh).
"""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from fairseq_moec.modules.experts import ExpertFFNs, Groups

pytestmark = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch._grouped_mm not available")

BF16_EPS = 2.0**-8  # bf16 keeps 8 significant bits: one rounding is off by up to 2^-9 relative
# Measured here: outputs 0.7 x 2^-8, gradients 0.4-1.5 x 2^-8 (3 sublayers). A 5% error is 12.8 x 2^-8.
TOL = 3 * BF16_EPS
COUNTS = [150, 0, 300, 62]  # uneven, one expert without rows
E, D, FFN, SUBLAYERS = len(COUNTS), 64, 256, 3  # 3 sublayers per expert, as in the WMT configs


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error ||a - ref|| / ||ref||."""
    return float((a.detach().double() - ref.detach()).norm() / ref.detach().norm())


def reference(params, x, counts, activation, relu_masks=None):
    """fp64 per-expert loop: v <- W2 act(W1 v + b1) + b2 for each sublayer. For relu, ``relu_masks`` (one [N, ffn]
    bool per sublayer, from the run under test) fixes which units are active: a pre-activation within rounding of
    zero may have the other sign in bf16, and that flips its whole gradient, whatever the arithmetic's precision."""
    outs, start = [], 0
    for e, n in enumerate(counts):
        v = x[start : start + n]
        for s in range(SUBLAYERS):
            h = v @ params[f"fc1.{s}.weight"][e].t() + params[f"fc1.{s}.bias"][e]
            if activation == "gelu":
                h = F.gelu(h)
            else:
                h = h * relu_masks[s][start : start + n]
            v = h @ params[f"fc2.{s}.weight"][e].t() + params[f"fc2.{s}.bias"][e]
        outs.append(v)
        start += n
    return torch.cat(outs)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_bf16_grouped_path_matches_fp64_reference_outputs_and_all_gradients(activation):
    torch.manual_seed(0)
    experts = ExpertFFNs(E, D, FFN, SUBLAYERS, activation=activation).to(torch.bfloat16)
    counts = torch.tensor(COUNTS)
    x = torch.randn(sum(COUNTS), D).to(torch.bfloat16).requires_grad_()
    grad_out = torch.randn(sum(COUNTS), D).to(torch.bfloat16)
    assert Groups.of(x, counts).counts is None  # really the grouped path

    masks = []  # relu: which units the bf16 run kept active
    hooks = [fc1.register_forward_hook(lambda m, i, out: masks.append(out.detach() > 0)) for fc1 in experts.fc1]
    out = experts(x, counts)
    for h in hooks:
        h.remove()
    out.backward(grad_out)
    got = {"output": out, "input": x.grad, **{n: p.grad for n, p in experts.named_parameters()}}

    # the reference starts from the same (bf16-representable) weights, input and output gradient, in fp64
    params = {n: p.detach().double().requires_grad_() for n, p in experts.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    ref_out = reference(params, x64, COUNTS, activation, masks)
    ref_out.backward(grad_out.double())
    want = {"output": ref_out, "input": x64.grad, **{n: p.grad for n, p in params.items()}}

    assert set(got) == set(want) and len(want) == 2 + 4 * SUBLAYERS  # output, input, every weight and bias
    errors = {name: rel_err(got[name], want[name]) for name in want}
    assert all(math.isfinite(e) for e in errors.values()), errors
    bad = {name: f"{e / BF16_EPS:.2f} x 2^-8" for name, e in errors.items() if e > TOL}
    assert not bad, f"relative error above {TOL / BF16_EPS:.0f} x 2^-8: {bad}"
    # the empty expert gets exact zero gradients
    for name, p in experts.named_parameters():
        assert torch.all(p.grad[1] == 0), name
    # the tolerance catches a 5% error in the output
    assert rel_err(ref_out.detach() * 1.05, ref_out.detach()) > TOL


def saved_activation_bytes(experts: ExpertFFNs, x: torch.Tensor, counts: torch.Tensor) -> int:
    """Bytes that autograd keeps for backward in a forward pass, parameters (and views of them) left out; each
    storage counted once."""
    params = {p.untyped_storage().data_ptr() for p in experts.parameters()}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        experts(x, counts)
    return sum(seen.values())


def test_bf16_grouped_path_keeps_no_more_for_backward_than_the_fp16_loop():
    """Memory of the choice: the bf16 grouped path keeps the same activations as the fp16 per-expert loop (same
    bytes per element), plus the row -> expert index. No cast copy of the weights or of the rows, which is what
    running fp16 weights through the bf16 kernel would keep (E x the expert weights per linear map)."""
    torch.manual_seed(0)
    counts = torch.tensor(COUNTS)
    n = sum(COUNTS)
    bf16 = ExpertFFNs(E, D, FFN, SUBLAYERS).to(torch.bfloat16)
    fp16 = ExpertFFNs(E, D, FFN, SUBLAYERS).to(torch.float16)
    x = torch.randn(n, D, requires_grad=True)
    x16 = x.detach().to(torch.float16).requires_grad_()
    assert Groups.of(x16, counts).counts is not None  # fp16: the loop

    grouped_bytes = saved_activation_bytes(bf16, x.detach().to(torch.bfloat16).requires_grad_(), counts)
    loop_bytes = saved_activation_bytes(fp16, x16, counts)
    index_bytes = n * 8 + E * 4  # row_expert (int64) and the offsets (int32)
    # per sublayer: the rows into fc1 and the relu output (which is fc2's input), 2 bytes each
    assert loop_bytes == SUBLAYERS * n * (D + FFN) * 2
    assert grouped_bytes <= loop_bytes + index_bytes, (grouped_bytes, loop_bytes)
    one_weight_copy = E * D * FFN * 2
    assert grouped_bytes < loop_bytes + one_weight_copy / 2  # the premise: a cast copy would show


@pytest.mark.parametrize(
    "device,capability,dtype,grouped",
    [
        ("cuda", (9, 0), torch.bfloat16, True),  # H100, H200: the fused kernel
        ("cuda", (10, 0), torch.bfloat16, True),  # B200
        ("cuda", (8, 0), torch.bfloat16, False),  # A100: torch's fallback would read the offsets to the host
        ("cuda", (9, 0), torch.float16, False),  # fp16: no grouped kernel in torch
        ("cpu", None, torch.bfloat16, True),
        ("cpu", None, torch.float32, False),
    ],
)
def test_grouped_call_only_where_torch_has_the_fused_kernel(monkeypatch, device, capability, dtype, grouped):
    from types import SimpleNamespace

    from fairseq_moec.modules.experts import grouped_mm_available

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    rows = SimpleNamespace(dtype=dtype, device=torch.device(device))  # no GPU here: a stand-in for the rows
    assert grouped_mm_available(rows) is grouped


@pytest.mark.slow  # two short fairseq-train runs
@pytest.mark.parametrize("precision", [["--bf16"], ["--memory-efficient-bf16", "--optimizer", "adam"]])
def test_fairseq_train_in_bf16_with_the_recipe_moe_flags(tiny_corpus, tmp_path, precision):
    """fairseq-train --bf16 (fp32 master weights) and --memory-efficient-bf16 (bf16 weights, fairseq's adam with
    fp32 moments) train on the CPU with the WMT recipe's MoE flags. fairseq 0.12 turns --bf16 into --tpu too;
    without the plugin's patches/bf16_without_tpu the run stops at torch_xla."""
    from conftest import TINY_MOEC_ARGS, cli, run

    _, _, data_bin = tiny_corpus
    recipe_moe = [
        "--moe-expert-count",
        "8",
        "--moe-clusters",
        "2",
        "--cluster-dropout",
        "0.5",
        "--cluster-dropout-reroute",
        "cluster",
        "--moe-top-k",
        "1",
        "--moe-router",
        "cosine",
        "--moe-expert-sublayers",
        "3",
        "--moe-cluster-loss",
        "intra",
        "--clip-norm",
        "0.1",
    ]
    proc = run(
        [
            cli("fairseq-train"),
            data_bin,
            *TINY_MOEC_ARGS,
            *recipe_moe,
            *precision,
            "--max-update",
            "2",
            "--save-dir",
            tmp_path,
        ]
    )
    log = proc.stdout + proc.stderr
    assert "torch_xla is not installed, so no TPU: training in bf16 on the CPU" in log
    losses = [float(v) for v in re.findall(r'"loss": "([0-9.naninf-]+)"', log)]
    assert len(losses) >= 2 and all(math.isfinite(v) for v in losses), log[-2000:]
    state = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    # fairseq saves weights as fp32 whatever the training dtype; the run's config and optimizer wrapper tell
    common = state["cfg"]["common"]
    assert common["bf16"] and not common["tpu"] and not common["fp16"]
    wrapper = "MemoryEfficientFP16Optimizer" if "--memory-efficient-bf16" in precision else "FP16Optimizer"
    assert state["optimizer_history"][-1]["optimizer_name"] == wrapper  # fairseq's bf16 wrappers (no loss scale)
    assert state["optimizer_history"][-1]["num_updates"] == 2
    experts = [k for k in state["model"] if ".experts.fc" in k]
    assert len(experts) == 2 * 2 * 3 * 2  # enc + dec layer, fc1 + fc2, 3 sublayers, weight + bias


def test_grouped_linear_backward_of_a_plain_sum():
    """The gradient of out.sum() is an expanded tensor (stride 0), which torch._grouped_mm's backward refuses
    ('Invalid strides/sizes'); the grouped path must still give d sum / dx[row] = sum over outputs of W[e]."""
    from fairseq_moec.modules.experts import GroupedLinear

    torch.manual_seed(0)
    lin = GroupedLinear(4, 16, 32).to(torch.bfloat16)
    counts = torch.tensor([5, 0, 7, 4])
    x = torch.randn(16, 16).to(torch.bfloat16).requires_grad_()
    groups = Groups.of(x, counts)
    assert groups.counts is None
    lin(x, groups).sum().backward()
    rows = torch.repeat_interleave(torch.arange(4), counts)
    want = lin.weight.detach().double().sum(1)[rows]  # [rows, in]
    assert rel_err(x.grad, want) < TOL
    assert torch.equal(lin.bias.grad.double(), counts[:, None].double().expand(4, 32))  # rows per expert, exactly
