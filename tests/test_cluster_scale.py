"""The cluster loss's scale: under the default 'relative' norm one --moe-cluster-weight means the same at every
number of experts E and every batch size T; the 'official' norm grows with T^2, by the stated conversion."""

import pytest
import torch

from fairseq_moec.modules import losses
from fairseq_moec.modules.config import MoEConfig


def routing(tokens: int, experts: int = 8, seed: int = 0) -> torch.Tensor:
    """Router probabilities [T, E] with uneven experts (so that the cluster variance is not 0)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g, dtype=torch.float64) + torch.linspace(0, 2, experts)
    return logits.softmax(-1)


def relative_loss(probs, clusters, kind="intra", survivors=None):
    return float(losses.cluster_terms(probs, clusters, kind, "relative", survivors)[0])


@pytest.mark.parametrize("kind", ["intra", "ratio"])
def test_default_scale_is_unchanged_by_twice_the_batch(kind):
    probs = routing(50)
    doubled = torch.cat([probs, probs])  # the same routing, twice the tokens
    assert relative_loss(doubled, 2, kind) == pytest.approx(relative_loss(probs, 2, kind), rel=1e-12)
    # the official term sums over tokens: 2x the tokens, 4x the term
    official = [float(losses.cluster_terms(p, 2, "intra", "official")[0]) for p in (probs, doubled)]
    assert official[1] == pytest.approx(4 * official[0], rel=1e-12)


@pytest.mark.parametrize("kind", ["intra", "ratio"])
def test_default_scale_is_unchanged_by_twice_the_experts(kind):
    probs = routing(50, experts=8)
    split = (probs / 2).repeat_interleave(2, dim=1)  # every expert split in two that share its probability
    assert split.shape == (50, 16)
    # the same 2 clusters, each twice as large, holding the same routing structure
    assert relative_loss(split, 2, kind) == pytest.approx(relative_loss(probs, 2, kind), rel=1e-12)
    # by hand: every relative mass E' * mean(p) is the same number as before, only duplicated
    mass8 = losses.routing_mass(probs, "relative")
    mass16 = losses.routing_mass(split, "relative")
    assert mass16.tolist() == pytest.approx(mass8.repeat_interleave(2).tolist(), rel=1e-12)


def test_a_uniform_router_has_relative_mass_one_over_survivors():
    survivors = torch.tensor([True, False, True, True, False, True, True, True])
    probs = torch.where(survivors, 1.0 / 6, 0.0).expand(5, 8).double()
    mass = losses.routing_mass(probs, "relative", survivors)
    assert mass[survivors].tolist() == pytest.approx([1.0] * 6)
    assert relative_loss(probs, 2, survivors=survivors) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("experts,clusters,dropout", [(8, 2, 0.0), (8, 2, 0.5), (32, 4, 0.5), (6, 2, 0.0)])
def test_official_equivalent_weight_converts_exactly(experts, clusters, dropout):
    """relative loss x official_equivalent_weight == the official term, on random routing with the dropout mask
    a real layer would use (m surviving experts per cluster, E' = G m)."""
    cfg = MoEConfig(moe_expert_count=experts, moe_clusters=clusters, cluster_dropout=dropout).validate()
    T = 37
    probs = routing(T, experts, seed=3)
    survivors = torch.ones(experts, dtype=torch.bool)
    if dropout:
        survivors.view(clusters, -1)[:, : cfg.dropped_per_cluster] = False  # drop the first of every cluster
        probs = (probs * survivors).div((probs * survivors).sum(1, keepdim=True))
    weight = losses.official_equivalent_weight(0.01, T, clusters, cfg.cluster_size - cfg.dropped_per_cluster)
    official = float(losses.cluster_terms(probs, clusters, "intra", "official", survivors)[0])
    assert relative_loss(probs, clusters, survivors=survivors) * weight == pytest.approx(0.01 * official, rel=1e-10)
