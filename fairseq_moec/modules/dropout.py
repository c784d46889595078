"""Cluster-level expert dropout: in every cluster, drop floor(p * m + 1/2) of its m experts during training."""

import logging

import torch
import torch.nn as nn

from .config import experts_dropped_per_cluster

logger = logging.getLogger(__name__)

SEED_MULTIPLIER = 1_000_003


def generator_seed(seed: int, layer_id: int, period: int) -> int:
    """The seed of the mask of one resample period. Modulo 2**64, the range of torch's generator seeds; for
    every (seed, layer, period) that torch accepted before the modulo this is the same generator."""
    return ((seed * SEED_MULTIPLIER + layer_id) * SEED_MULTIPLIER + period) % 2**64


class ClusterDropout(nn.Module):
    """Holds the current survivor mask and resamples it every ``interval`` optimizer updates.

    The mask of resample period k is drawn from a generator seeded by (seed, layer_id, k), so every process
    and every resumed run draws the same masks. The mask and its period are buffers, saved in checkpoints; on
    loading, the mask of the saved period is drawn again for the current settings (E, G, rate, seed): the
    saved one when they are unchanged, and a valid one when a resumed run changed --moe-clusters,
    --cluster-dropout or --moe-seed (a saved mask could leave a new cluster without experts).
    """

    def __init__(self, num_experts: int, num_clusters: int, rate: float, interval: int, seed: int, layer_id: int):
        super().__init__()
        self.num_clusters, self.cluster_size = num_clusters, num_experts // num_clusters
        self.num_dropped = experts_dropped_per_cluster(rate, self.cluster_size)
        self.interval, self.seed, self.layer_id = interval, seed, layer_id
        self.register_buffer("survivors", torch.ones(num_experts, dtype=torch.bool))
        self.register_buffer("period", torch.tensor(-1, dtype=torch.long))
        self._period = -1  # host copy of ``period``: the hot path never reads a device tensor

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        key = prefix + "survivors"
        saved = state_dict.get(key)
        if saved is not None and saved.shape != self.survivors.shape:
            # another --moe-expert-count: the expert weights report the mismatch; the mask is redrawn below
            state_dict[key] = self.survivors.clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._period = int(self.period)
        if not self.enabled:  # --cluster-dropout 0 now: no mask (mask() returns None), a clean state to save
            self.survivors.fill_(True)
            self.period.fill_(-1)
            self._period = -1
        elif self._period >= 0:
            drawn = self.sample(self._period).to(self.survivors.device)
            if saved is not None and not torch.equal(drawn.cpu(), saved.cpu()):
                logger.warning(
                    f"cluster dropout (layer {self.layer_id}): --moe-clusters, --cluster-dropout or "
                    f"--moe-seed changed since the checkpoint was saved; using their mask for update "
                    f"period {self._period}, not the saved one"
                )
            self.survivors.copy_(drawn)

    @property
    def enabled(self) -> bool:
        return self.num_dropped > 0

    def sample(self, period: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(generator_seed(self.seed, self.layer_id, period))
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

    # True: eval mode routes with the training-time mask too, as the official MoEC code does (for comparison)
    keep_at_inference = False

    def mask(self) -> "torch.Tensor | None":
        """Survivor mask to route with, or None (all experts): when dropout is off, and in eval mode unless
        ``keep_at_inference``."""
        if not self.enabled or not (self.training or self.keep_at_inference):
            return None
        if self._period < 0:  # used before any update number was given
            self.set_num_updates(0)
        return self.survivors
