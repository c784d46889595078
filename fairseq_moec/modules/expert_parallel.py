"""Expert parallelism: W processes each hold E/W experts; tokens travel to their expert's process and back.

Placement is by contiguous blocks: process r holds experts r*E/W .. (r+1)*E/W - 1. Clusters are contiguous
blocks too (expert e is in cluster e // (E/G)), so whenever G % W == 0 every cluster sits whole on one
process (--moe-expert-placement cluster insists on it); otherwise each cluster spans W/G processes. Routing,
cluster dropout and the auxiliary losses run on every process for its own tokens with the replicated
router: only the expert computation is distributed, so a rerouted token simply travels to another expert.
"""

from typing import NamedTuple

import torch
import torch.distributed as dist

from .all_to_all import all_to_all, exchange_counts


class ExpertParallel(NamedTuple):
    """This process's place among the ``world_size`` processes of ``group`` that share the experts."""

    rank: int
    world_size: int
    group: object = None  # a torch.distributed process group; None = the default (world) group

    @classmethod
    def from_default_group(cls) -> "ExpertParallel":
        return cls(dist.get_rank(), dist.get_world_size())

    def local_experts(self, num_experts: int) -> range:
        n = num_experts // self.world_size
        return range(self.rank * n, (self.rank + 1) * n)


def run_experts_remotely(rows: torch.Tensor, counts: torch.Tensor, local_experts, ep: ExpertParallel) -> torch.Tensor:
    """The expert function of an expert-parallel layer: ``rows`` [N, d] are this process's routed tokens sorted
    by (global) expert, ``counts`` [E] how many go to each expert. Each expert's rows go to the process that
    holds it, run through ``local_experts`` (an ExpertFFNs of E/W experts) there, and come back in the same
    order. Autograd flows through both exchanges, so expert gradients land on the expert's process."""
    W = ep.world_size
    send_counts = counts.view(W, -1)  # [W, E/W]: rows for each process, per expert it holds
    recv_counts = exchange_counts(send_counts, ep.group)  # [W, E/W]: rows from each process, per local expert
    send_splits, recv_splits = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()
    received = all_to_all(rows, recv_splits, send_splits, ep.group)  # grouped by source, then local expert
    # the local experts want their rows grouped by expert: reorder source-major -> expert-major and back
    block_expert = torch.arange(recv_counts.shape[1], device=rows.device).repeat(W)
    row_expert = torch.repeat_interleave(block_expert, recv_counts.reshape(-1), output_size=received.shape[0])
    order = torch.argsort(row_expert, stable=True)
    out = local_experts(received[order], recv_counts.sum(0))
    back = torch.empty_like(order)
    back[order] = torch.arange(order.numel(), device=order.device)
    return all_to_all(out[back], send_splits, recv_splits, ep.group)
