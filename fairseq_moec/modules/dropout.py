"""Cluster-level expert dropout: in every cluster, drop round(p * m) of its m experts during training."""
import torch
import torch.nn as nn


class ClusterDropout(nn.Module):
    """Holds the current survivor mask and resamples it every ``interval`` optimizer updates.

    The mask for resample period k is drawn from a generator seeded by (seed, layer_id, k), so every process
    and every resumed run draws the same masks; the mask and its period are buffers, saved in checkpoints.
    """

    def __init__(self, num_experts: int, num_clusters: int, rate: float, interval: int, seed: int, layer_id: int):
        super().__init__()
        self.num_clusters, self.cluster_size = num_clusters, num_experts // num_clusters
        self.num_dropped = int(round(rate * self.cluster_size))
        self.interval, self.seed, self.layer_id = interval, seed, layer_id
        self.register_buffer("survivors", torch.ones(num_experts, dtype=torch.bool))
        self.register_buffer("period", torch.tensor(-1, dtype=torch.long))
        self._period = -1  # host copy of ``period``: the hot path never reads a device tensor

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._period = int(self.period)

    @property
    def enabled(self) -> bool:
        return self.num_dropped > 0

    def sample(self, period: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.layer_id) * 1_000_003 + period)
        survivors = torch.ones(self.num_clusters, self.cluster_size, dtype=torch.bool)
        for c in range(self.num_clusters):
            survivors[c, torch.randperm(self.cluster_size, generator=g)[: self.num_dropped]] = False
        return survivors.view(-1)

    def set_num_updates(self, num_updates: int) -> None:
        period = num_updates // self.interval
        if self.enabled and period != self._period:
            self.survivors.copy_(self.sample(period))
            self.period.fill_(period)
            self._period = period

    def mask(self) -> "torch.Tensor | None":
        """Survivor mask to route with, or None (all experts) in eval mode or when dropout is off."""
        if not (self.training and self.enabled):
            return None
        if self._period < 0:  # used before any update number was given
            self.set_num_updates(0)
        return self.survivors
