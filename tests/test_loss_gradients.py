"""Gradients of the MoEC losses: fp64 gradchecks and hand-derived gradients with respect to the router
probabilities, and the cluster term alone training the router (a stray .detach() fails here, not elsewhere)."""

import pytest
import torch

from fairseq_moec.modules import MoEConfig, MoELayer, losses

T, E, G = 5, 6, 2  # tokens, experts, clusters of m = 3


def router_probs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, E, generator=g, dtype=torch.float64).softmax(-1).requires_grad_()


# expert 1 of cluster 0 and expert 5 of cluster 1 dropped; a dropped expert has probability 0
SURVIVORS = torch.tensor([True, False, True, True, True, False])


def dropped_probs(seed=0):
    p = router_probs(seed).detach().masked_fill(~SURVIVORS, 0.0)
    return (p / p.sum(1, keepdim=True)).requires_grad_()


@pytest.mark.parametrize("norm", ["relative", "official"])
@pytest.mark.parametrize("kind", ["intra", "ratio"])
@pytest.mark.parametrize("dropout", [False, True])
def test_cluster_loss_gradcheck(kind, norm, dropout):
    probs, survivors = (dropped_probs(), SURVIVORS) if dropout else (router_probs(), None)
    assert torch.autograd.gradcheck(lambda p: losses.cluster_terms(p, G, kind, norm, survivors)[0], (probs,))
    # the logged intra and inter variances are differentiable the same way
    assert torch.autograd.gradcheck(lambda p: losses.cluster_terms(p, G, kind, norm, survivors)[1:], (probs,))


@pytest.mark.parametrize("dropout", [False, True])
def test_balance_loss_gradcheck(dropout):
    probs, survivors = (dropped_probs(), SURVIVORS) if dropout else (router_probs(), None)
    counts = torch.tensor([2, 0, 1, 1, 1, 0])  # routing choices per expert: constants, not differentiated
    assert torch.autograd.gradcheck(lambda p: losses.load_balance_loss(p, counts, survivors), (probs,))


def test_cluster_loss_gradient_by_hand():
    """intra = 1/G sum_c 1/m sum_(e in c) (M_e - mu_c)^2 with M_e = E/T sum_t p_te, so
    d intra / d p_te = 2 E / (G m T) (M_e - mu_c(e)): the same for every token, zero for an expert at its
    cluster's mean (the terms through mu_c cancel, deviations sum to 0)."""
    probs = router_probs()
    losses.cluster_terms(probs, G, "intra", "relative")[0].backward()
    mass = (E / T) * probs.detach().sum(0)  # computed here, not by the module
    m = E // G
    mu = mass.view(G, m).mean(1).repeat_interleave(m)
    expected = (2 * E / (G * m * T) * (mass - mu)).expand(T, E)
    torch.testing.assert_close(probs.grad, expected, rtol=1e-12, atol=1e-15)

    # with dropout: survivors only, E' = 4, m' = 2 per cluster; dropped experts get no gradient
    probs = dropped_probs()
    losses.cluster_terms(probs, G, "intra", "relative", SURVIVORS)[0].backward()
    mass = (4 / T) * probs.detach().sum(0)
    mu = torch.tensor([(mass[0] + mass[2]) / 2] * 3 + [(mass[3] + mass[4]) / 2] * 3, dtype=torch.float64)
    expected = (2 * 4 / (G * 2 * T) * (mass - mu) * SURVIVORS).expand(T, E)
    torch.testing.assert_close(probs.grad, expected, rtol=1e-12, atol=1e-15)


def test_balance_loss_gradient_by_hand():
    # L = E' sum_e f_e P_e, P_e = 1/T sum_t p_te, f constant -> dL/dp_te = E' f_e / T
    probs = router_probs()
    counts = torch.tensor([2, 0, 1, 1, 1, 0])
    losses.load_balance_loss(probs, counts).backward()
    f = counts.double() / 5
    torch.testing.assert_close(probs.grad, (E * f / T).expand(T, E), rtol=1e-12, atol=1e-15)
    probs = dropped_probs()
    losses.load_balance_loss(probs, counts, SURVIVORS).backward()
    torch.testing.assert_close(probs.grad, (4 * f / T).expand(T, E), rtol=1e-12, atol=1e-15)


def moe_layer(**kw):
    torch.manual_seed(0)
    cfg = MoEConfig(moe_expert_count=8, moe_clusters=2, **kw)
    layer = MoELayer(cfg, 16, 32).double().train()
    layer.set_num_updates(0)
    return layer


TOKENS = torch.randn(64, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"cluster_dropout": 0.5},
        {"moe_cluster_loss": "ratio"},
        {"moe_cluster_loss_norm": "official"},
        {"moe_router": "cosine"},
        {"moe_cluster_loss": "token"},
        {"moe_cluster_loss": "token", "cluster_dropout": 0.5},
        {"moe_router": "cosine", "moe_gate": "sigmoid", "moe_loss_temperature": 0.07},
    ],
)
def test_cluster_term_alone_gives_the_router_a_gradient(kw):
    layer = moe_layer(**kw)
    layer(TOKENS)
    layer.last_losses["cluster"].backward()
    router = dict(layer.router.named_parameters())
    if "moe_loss_temperature" in kw:  # the losses see cosine / a fixed temperature: the learned one is not in them
        assert router.pop("log_temperature").grad is None
    assert router and all(p.grad is not None and p.grad.abs().max() > 1e-8 for p in router.values()), {
        n: None if p.grad is None else float(p.grad.abs().max()) for n, p in router.items()
    }
    # the experts do not take part in the cluster term
    assert all(p.grad is None for p in layer.experts.parameters())


def test_optimizer_steps_on_the_cluster_term_reduce_within_cluster_variance():
    layer = moe_layer()
    opt = torch.optim.SGD(layer.router.parameters(), lr=1.0)
    history = []
    for _ in range(20):
        opt.zero_grad()
        layer(TOKENS)
        history.append(float(layer.last_stats["intra_var"]))
        layer.last_losses["cluster"].backward()
        opt.step()
    assert history[0] > 1e-3  # something to reduce
    assert history[-1] < 0.25 * history[0], history
    assert all(b <= a * (1 + 1e-9) for a, b in zip(history, history[1:])), history  # a descent, step by step
