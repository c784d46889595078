"""all_to_all with variable split sizes, differentiable: the gradient goes back the way the rows came."""

from typing import List

import torch
import torch.distributed as dist


def _all_to_all(x: torch.Tensor, output_splits: List[int], input_splits: List[int], group) -> torch.Tensor:
    out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
    return out


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        return _all_to_all(x, output_splits, input_splits, group)

    @staticmethod
    def backward(ctx, grad):
        # the rows this process received came from the others: their gradients return with the splits swapped
        return _all_to_all(grad, ctx.input_splits, ctx.output_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, output_splits: List[int], input_splits: List[int], group=None) -> torch.Tensor:
    """Send rows ``x[sum(input_splits[:j]) : sum(input_splits[:j + 1])]`` to process j of ``group``; return the
    rows received, ``output_splits[j]`` of them from process j, in process order. Every process of the group
    must call it (with matching split sizes), also with no rows to send."""
    return _AllToAll.apply(x, output_splits, input_splits, group)


def exchange_counts(send: torch.Tensor, group=None) -> torch.Tensor:
    """send: [W, n] integer counts, row j for process j. Returns [W, n]: row j is what process j sent here."""
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send.contiguous(), group=group)
    return recv
