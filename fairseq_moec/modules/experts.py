"""Experts: E independent FFNs applied to tokens already sorted by expert (contiguous groups)."""

from typing import List, NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


def grouped_mm_available(x: torch.Tensor) -> bool:
    """Whether the experts run as one ``torch._grouped_mm`` call per linear map (no host synchronisation).

    torch has a fused grouped kernel only for bf16 on CUDA devices of compute capability 9.x and 10.x (H100,
    H200, B200). Elsewhere on CUDA ``_grouped_mm`` falls back to a loop that copies the group offsets to the host
    at every call, three times per linear map and step, worse than our loop's one read of the split sizes: there
    (an A100 in bf16, any GPU in fp16) the loop runs. On the CPU and the meta device (tests) bf16 takes the
    grouped call (on the CPU torch's fallback loop, which needs no device-to-host copy).
    """
    if not hasattr(torch, "_grouped_mm") or x.dtype != torch.bfloat16:
        return False
    if x.device.type == "cuda":
        return torch.cuda.get_device_capability(x.device)[0] in (9, 10)
    return True


class Groups(NamedTuple):
    """Row layout for one grouped call: host counts for the per-expert loop, or device offsets and the
    expert of every row for torch._grouped_mm (then no host synchronisation at all)."""

    counts: Optional[List[int]]
    offsets: Optional[torch.Tensor]
    row_expert: Optional[torch.Tensor]

    @staticmethod
    def of(x: torch.Tensor, counts: torch.Tensor) -> "Groups":
        if grouped_mm_available(x):
            row_expert = torch.repeat_interleave(
                torch.arange(len(counts), device=x.device), counts, output_size=x.shape[0]
            )
            return Groups(None, counts.cumsum(0).to(torch.int32), row_expert)
        return Groups(counts.tolist(), None, None)  # the one host read of the split sizes


class GroupedLinear(nn.Module):
    """E linear maps stored as one [E, out, in] weight (nn.Linear layout per expert).

    ``local_experts`` (expert parallelism): hold only these of the ``num_experts`` experts. The initial weights
    are drawn for all experts in turn, keeping the local ones, so that every expert starts from the same
    weights whatever the number of processes (and the random stream after the layer is the same too).
    """

    def __init__(self, num_experts: int, in_features: int, out_features: int, local_experts: Optional[range] = None):
        super().__init__()
        local = range(num_experts) if local_experts is None else local_experts
        self.weight = nn.Parameter(torch.empty(len(local), out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(len(local), out_features))
        with torch.no_grad():
            for e in range(num_experts):  # the initialisation nn.Linear uses, per expert
                w = self.weight[e - local.start] if e in local else torch.empty(out_features, in_features)
                nn.init.kaiming_uniform_(w, a=5**0.5)
            bias = torch.empty(num_experts, out_features).uniform_(-(in_features**-0.5), in_features**-0.5)
            self.bias.copy_(bias[local.start : local.stop])

    def forward(self, x: torch.Tensor, groups: "Groups") -> torch.Tensor:
        """x: [N, in] rows grouped by expert (``groups`` says how many rows each expert has)."""
        if groups.counts is None:
            offsets, row_expert = groups.offsets, groups.row_expert
            y = torch._grouped_mm(x, self.weight.transpose(1, 2), offs=offsets)
            return _AddExpertBias.apply(y, self.bias, row_expert)
        return _ExpertLoop.apply(x, self.weight, self.bias, groups.counts)


class _AddExpertBias(torch.autograd.Function):
    """y + bias[row_expert] for the grouped path, with the bias gradient summed in fp32.

    Why not autograd's indexing: its backward adds the bf16 gradient rows of an expert one by one in bf16, so
    the error grows with the rows per expert (4.3 x 2^-8 relative at 150-300 rows, against 1.3 x 2^-8 for the
    weights). Here they are added in fp32 and rounded to the bias dtype once, as ``torch.sum`` does in the loop.
    """

    @staticmethod
    def forward(ctx, y, bias, row_expert):
        ctx.save_for_backward(row_expert)
        ctx.bias_shape, ctx.bias_dtype = bias.shape, bias.dtype
        return y + bias[row_expert].to(y.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        (row_expert,) = ctx.saved_tensors
        grad_y = grad_y.contiguous()  # _grouped_mm's backward refuses expanded gradients, e.g. that of a sum()
        grad_b = None
        if ctx.needs_input_grad[1]:
            grad_b = grad_y.new_zeros(ctx.bias_shape, dtype=torch.float32).index_add_(0, row_expert, grad_y.float())
            grad_b = grad_b.to(ctx.bias_dtype)
        return grad_y, grad_b, None


class _ExpertLoop(torch.autograd.Function):
    """y[rows of e] = x[rows of e] @ weight[e].T + bias[e], one matmul per expert, as ONE autograd node.

    Why not per-expert F.linear on ``weight.unbind(0)``: unbind's backward keeps E weight gradients alive and
    then stacks them into a fresh [E, out, in] tensor (a second full copy of the gradient per step), and the
    outputs need a cat forward and a split backward. Here outputs are written in place into one buffer and each
    expert's gradient straight into its slice of the parameter-shaped gradient.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, counts: List[int]):
        y = x.new_empty(x.shape[0], weight.shape[1])
        start = 0
        for e, n in enumerate(counts):
            if n:
                torch.addmm(bias[e], x[start : start + n], weight[e].t(), out=y[start : start + n])
            start += n
        ctx.save_for_backward(x, weight)
        ctx.counts = counts
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_y = grad_y.contiguous()
        grad_x = torch.empty_like(x) if need_x else None
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = weight.new_empty(weight.shape[:2]) if need_b else None
        start = 0
        for e, n in enumerate(ctx.counts):
            if n:
                g = grad_y[start : start + n]
                if need_x:
                    torch.mm(g, weight[e], out=grad_x[start : start + n])
                if need_w:
                    torch.mm(g.t(), x[start : start + n], out=grad_w[e])
                if need_b:
                    torch.sum(g, 0, out=grad_b[e])
            else:  # an expert with no rows: zero gradient (zeroing only these, not the whole buffer)
                if need_w:
                    grad_w[e].zero_()
                if need_b:
                    grad_b[e].zero_()
            start += n
        return grad_x, grad_w, grad_b, None


class ExpertFFNs(nn.Module):
    """E experts, each a stack of ``sublayers`` FFNs (fc1 -> activation -> dropout -> fc2) applied in turn.
    With ``local_experts`` only those experts are held, and ``forward`` takes rows for them alone."""

    def __init__(
        self,
        num_experts: int,
        embed_dim: int,
        ffn_dim: int,
        sublayers: int = 1,
        activation: str = "relu",
        activation_dropout: float = 0.0,
        local_experts: Optional[range] = None,
    ):
        super().__init__()
        self.local_experts = range(num_experts) if local_experts is None else local_experts
        self.num_experts = len(self.local_experts)  # experts held here (all of them without expert parallelism)
        self.fc1 = nn.ModuleList(
            GroupedLinear(num_experts, embed_dim, ffn_dim, local_experts) for _ in range(sublayers)
        )
        self.fc2 = nn.ModuleList(
            GroupedLinear(num_experts, ffn_dim, embed_dim, local_experts) for _ in range(sublayers)
        )
        self.activation = {"relu": F.relu, "gelu": F.gelu}[activation]
        self.activation_dropout = nn.Dropout(activation_dropout)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x: [N, d] sorted by expert; counts: [E] rows per expert (a device tensor)."""
        groups = Groups.of(x, counts)
        for fc1, fc2 in zip(self.fc1, self.fc2):
            x = fc2(self.activation_dropout(self.activation(fc1(x, groups))), groups)
        return x
