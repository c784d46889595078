"""Loss and statistic values against hand computations on small tensors."""

import math

import pytest
import torch

from fairseq_moec.modules import losses

# Two tokens, four experts in two clusters {0,1} {2,3}.
PROBS = torch.tensor([[0.7, 0.2, 0.05, 0.05], [0.1, 0.1, 0.6, 0.2]])
TOP1 = torch.tensor([[0], [2]])
TOP1_COUNTS = losses.expert_counts(TOP1, 4)


def test_expert_counts_by_hand():
    assert TOP1_COUNTS.tolist() == [1, 0, 1, 0]
    top2 = torch.tensor([[0, 3], [3, 1], [3, 0]])  # every choice counts, first and second
    assert losses.expert_counts(top2, 5).tolist() == [2, 1, 0, 3, 0]
    assert losses.expert_counts(torch.zeros(0, 2, dtype=torch.long), 3).tolist() == [0, 0, 0]


def test_load_balance_by_hand():
    # f = [1/2, 0, 1/2, 0]; P = mean probs = [0.4, 0.15, 0.325, 0.125]
    # E * sum f*P = 4 * (0.5*0.4 + 0.5*0.325) = 4 * 0.3625 = 1.45
    assert float(losses.load_balance_loss(PROBS, TOP1_COUNTS)) == pytest.approx(1.45)
    uniform = torch.full((4, 4), 0.25)
    assert float(losses.load_balance_loss(uniform, torch.ones(4, dtype=torch.long))) == pytest.approx(1.0)


def test_load_balance_over_survivors_by_hand():
    # expert 1 dropped: probabilities renormalised over survivors, E' = 3
    probs = torch.tensor([[0.8, 0.0, 0.1, 0.1], [0.2, 0.0, 0.6, 0.2]])
    survivors = torch.tensor([True, False, True, True])
    # P = [0.5, 0, 0.35, 0.15]; f = [0.5, 0, 0.5, 0] -> 3 * (0.25 + 0.175) = 1.275
    assert float(losses.load_balance_loss(probs, TOP1_COUNTS, survivors)) == pytest.approx(1.275)


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(2.0), 0.0, 0.0, 0.0]])
    # logsumexp: log 4 and log(2 + 3) = log 5
    expected = (math.log(4) ** 2 + math.log(5) ** 2) / 2
    assert float(losses.router_z_loss(logits)) == pytest.approx(expected)
    dropped = torch.tensor([[0.0, -math.inf, 0.0, 0.0]])  # a dropped expert adds nothing: log 3
    assert float(losses.router_z_loss(dropped)) == pytest.approx(math.log(3) ** 2)


def test_cluster_variances_by_hand():
    mass = losses.routing_mass(PROBS, "relative")  # E * mean p = 4 * [0.4, 0.15, 0.325, 0.125]
    assert mass.tolist() == pytest.approx([1.6, 0.6, 1.3, 0.5])
    intra, inter = losses.cluster_variances(mass, 2)
    # cluster 0: mean 1.1, var (0.5^2 + 0.5^2)/2 = 0.25
    # cluster 1: mean 0.9, var (0.4^2 + 0.4^2)/2 = 0.16       -> intra = 0.205
    # cluster means 1.1, 0.9 around 1 -> inter = 0.1^2 = 0.01
    assert float(intra) == pytest.approx(0.205)
    assert float(inter) == pytest.approx(0.01)
    assert float(losses.cluster_loss(intra, inter, "intra")) == pytest.approx(0.205)
    assert float(losses.cluster_loss(intra, inter, "ratio")) == pytest.approx(20.5, rel=1e-5)


def test_official_cluster_term_by_hand():
    # summed masses [0.8, 0.3, 0.65, 0.25]; unbiased variances: cluster 0 (0.25^2 * 2) / 1 = 0.125,
    # cluster 1 (0.2^2 * 2) / 1 = 0.08 -> mean 0.1025; times E' = 4 (the factor inside l_aux) -> 0.41
    loss, intra, inter = losses.cluster_terms(PROBS, 2, "intra", "official")
    assert float(loss) == pytest.approx(0.41)
    assert (float(intra), float(inter)) == pytest.approx((0.205, 0.01))  # logged on the relative scale
    # the stated conversion: official = relative * T^2 / E' * m / (m - 1) = 0.205 * 4 / 4 * 2
    assert losses.official_equivalent_weight(1.0, tokens=2, num_clusters=2, surviving_per_cluster=2) == 2.0
    assert float(losses.cluster_terms(PROBS, 2, "intra", "relative")[0]) * 2.0 == pytest.approx(0.41)


def test_cluster_variances_over_survivors_by_hand():
    mass = torch.tensor([0.5, 0.0, 0.35, 0.15])
    survivors = torch.tensor([True, False, True, True])
    intra, inter = losses.cluster_variances(mass, 2, survivors)
    # cluster 0 has one survivor: variance 0, mean 0.5; cluster 1: mean 0.25, variance 0.01 -> intra 0.005
    # cluster means 0.5 and 0.25 around 0.375 -> inter 0.125^2 = 0.015625
    assert float(intra) == pytest.approx(0.005)
    assert float(inter) == pytest.approx(0.015625)


def test_load_statistics_by_hand():
    cv, entropy = losses.load_statistics(TOP1_COUNTS)
    # load [1, 0, 1, 0]: mean 0.5, std 0.5 -> cv 1; distribution [.5, 0, .5, 0] -> entropy ln 2
    assert float(cv) == pytest.approx(1.0)
    assert float(entropy) == pytest.approx(math.log(2))
    cv, entropy = losses.load_statistics(torch.tensor([1, 5, 1, 1]), torch.tensor([True, False, True, True]))
    assert float(cv) == pytest.approx(0.0)  # one token on each of the 3 survivors (the dropped expert's 5 ignored)
    assert float(entropy) == pytest.approx(math.log(3))
