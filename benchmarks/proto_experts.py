"""Prototypes of faster fp32 CPU expert kernels for fairseq_moec/modules/experts.py.

Not used by the plugin: bench_layer.py swaps it into a MoELayer ("proto-k1") to measure what the current
``GroupedLinear.forward`` loop costs. The current loop runs one ``F.linear`` per expert on
``weight.unbind(0)`` slices and ``torch.cat``s the outputs, so autograd
  * keeps E per-expert weight gradients alive until ``UnbindBackward`` stacks them into a fresh [E, out, in]
    tensor: one extra full copy of the layer's weight gradient per step (time) and a transient of that size
    (memory), for fc1 and fc2;
  * copies the outputs once more in forward (cat) and the output gradient once more in backward (split);
  * runs 3E small autograd nodes.
``_LoopLinear`` does the same arithmetic in one autograd.Function: outputs written in place into one [N, out]
buffer, and each expert's weight gradient written straight into its slice of the [E, out, in] gradient.
"""
import torch


class _LoopLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, counts):
        E, out_f, _ = weight.shape
        y = x.new_empty(x.shape[0], out_f)
        s = 0
        for e, c in enumerate(counts):
            if c:
                torch.addmm(bias[e], x[s:s + c], weight[e].t(), out=y[s:s + c])
            s += c
        ctx.save_for_backward(x, weight)
        ctx.counts = counts
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        counts = ctx.counts
        gy = gy.contiguous()
        gx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        gw = torch.empty_like(weight)
        gb = weight.new_empty(weight.shape[:2])
        s = 0
        for e, c in enumerate(counts):
            if c:
                g = gy[s:s + c]
                if gx is not None:
                    torch.mm(g, weight[e], out=gx[s:s + c])
                torch.mm(g.t(), x[s:s + c], out=gw[e])
                torch.sum(g, 0, out=gb[e])
            else:
                gw[e].zero_()
                gb[e].zero_()
            s += c
        return gx, gw, gb, None


def patch_experts(experts):
    """Make an ExpertFFNs instance (fp32 loop path) use _LoopLinear in every GroupedLinear."""
    for lin in list(experts.fc1) + list(experts.fc2):
        def fwd(x, groups, lin=lin):
            if groups.counts is None:  # grouped_mm path: unchanged
                return type(lin).forward(lin, x, groups)
            return _LoopLinear.apply(x, lin.weight, lin.bias, groups.counts)
        lin.forward = fwd
    return experts


class PaddedBmmExperts(torch.nn.Module):
    """Drop-in for ExpertFFNs.forward (one sublayer, fp32 on CPU): pad every expert's rows to the largest
    count C and run each linear map as ONE torch.baddbmm over the [E, out, in] weights.

    Why: on CPU a Python loop of E small matmuls pays one OpenMP fork/join per call (3 per linear map and
    expert, forward+backward); on a loaded machine every barrier can wait for a descheduled thread, and small
    M also runs MKL below its peak. One bmm parallelises over the batch inside a single region. The maps are
    computed transposed (h^T = W x^T, [E, out, C]) so that bmm's backward writes each weight gradient
    straight in the parameter's own [E, out, in] layout (no unbind/stack, no layout-fixing copy).
    Cost: (E*C - N) padded rows of wasted work and memory (random routing at T=4096: C is about 1.3x the
    mean count at E=64). Uses the weights of an existing ExpertFFNs (shared, not copied)."""

    def __init__(self, experts):
        super().__init__()
        assert len(experts.fc1) == 1, "prototype handles one sublayer"
        self.inner = experts
        self.num_experts = experts.num_experts

    def forward(self, x, counts):
        fc1, fc2 = self.inner.fc1[0], self.inner.fc2[0]
        E, N = self.num_experts, x.shape[0]
        if N == 0:
            return x.new_zeros(0, fc2.weight.shape[1])
        C = max(counts.tolist())  # the one host read of the split sizes
        row_expert = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=N)
        starts = counts.cumsum(0) - counts
        slot = row_expert * C + (torch.arange(N, device=x.device) - starts[row_expert])
        xp = x.new_zeros(E * C, x.shape[1]).index_copy(0, slot, x).view(E, C, -1)
        hT = torch.baddbmm(fc1.bias[:, :, None], fc1.weight, xp.transpose(1, 2))  # [E, f, C]
        hT = self.inner.activation_dropout(self.inner.activation(hT))
        yT = torch.baddbmm(fc2.bias[:, :, None], fc2.weight, hT)  # [E, d, C]
        return yT.transpose(1, 2).reshape(E * C, -1)[slot]


def patch_padded_bmm(layer):
    layer.experts = PaddedBmmExperts(layer.experts)
    return layer
