"""Top-k selection with cluster dropout against a per-token loop of the documented rules."""

import math

import pytest
import torch

from fairseq_moec.modules import CosineRouter, LinearRouter, route


def naive_route(logits, k, m, survivors, reroute):
    """Per token: walk the preferred experts (unmasked ranking); a dropped one is replaced by the best
    unchosen survivor of its cluster ('cluster') or anywhere ('global'); no such survivor -> anywhere."""
    picks = []
    for row in logits:
        order = sorted(range(len(row)), key=lambda e: -float(row[e]))
        chosen = []
        if reroute == "global":
            chosen = [e for e in order if survivors[e]][:k]
        else:
            for pref in order[:k]:
                free = [e for e in order if survivors[e] and e not in chosen]
                same = [e for e in free if e // m == pref // m]
                chosen.append((same or free)[0])
        picks.append(chosen)
    return torch.tensor(picks)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("reroute", ["cluster", "global"])
def test_route_with_dropout_matches_rules(k, reroute):
    torch.manual_seed(0)
    E, m = 8, 4
    logits = torch.randn(50, E)
    survivors = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0], dtype=torch.bool)
    r = route(logits, k, m, survivors, reroute)
    assert torch.equal(r.experts, naive_route(logits, k, m, survivors, reroute))
    assert survivors[r.experts].all()
    # probabilities over survivors only; gates taken from them (renormalised for top-2)
    torch.testing.assert_close(r.probs, torch.softmax(logits.masked_fill(~survivors, -math.inf), -1))
    g = r.probs.gather(1, r.experts)
    torch.testing.assert_close(r.gates, g / g.sum(-1, keepdim=True) if k == 2 else g)
    preferred = logits.topk(k, dim=-1).indices
    assert torch.equal(r.rerouted, (~survivors[preferred]).any(-1))


def test_top1_reroute_stays_in_cluster():
    torch.manual_seed(1)
    E, m = 16, 4
    logits = torch.randn(200, E)
    survivors = torch.ones(E, dtype=torch.bool)
    survivors[[0, 1, 5, 10, 11, 12]] = False  # every cluster keeps >= 1 survivor
    r = route(logits, 1, m, survivors, "cluster")
    preferred = logits.argmax(-1)
    assert r.rerouted.any()
    assert torch.equal(r.experts[:, 0] // m, preferred // m)


def test_no_dropout_is_plain_topk():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    r = route(logits, 1, 1)
    assert r.experts[:, 0].tolist() == [1, 0]
    torch.testing.assert_close(r.gates[:, 0], torch.softmax(logits, -1).max(-1).values)
    assert not r.rerouted.any()


def test_routers_compute_in_fp32():
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    assert LinearRouter(16, 4).to(torch.bfloat16)(x).dtype == torch.float32
    cos = CosineRouter(16, 4, router_dim=8, temperature=0.5)
    logits = cos(x)
    assert logits.dtype == torch.float32
    assert logits.abs().max() <= 1 / 0.5 + 1e-4  # |cosine| <= 1, divided by the temperature
