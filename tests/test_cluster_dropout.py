"""Cluster-level expert dropout invariants."""

import torch

from fairseq_moec.modules import ClusterDropout, MoEConfig, MoELayer


def make(rate=0.5, E=16, G=4, interval=5, seed=7, layer_id=3):
    return ClusterDropout(E, G, rate, interval, seed, layer_id)


def test_survivors_per_cluster():
    for rate, expected in ((0.5, 2), (0.25, 3), (0.7, 1)):  # round(rate * 4) dropped of 4
        d = make(rate)
        for update in range(0, 100, 5):
            d.set_num_updates(update)
            assert d.survivors.view(4, 4).sum(1).tolist() == [expected] * 4


def test_no_dropout_in_eval_or_when_off():
    d = make().train()
    assert d.mask() is not None
    assert d.eval().mask() is None
    assert make(rate=0.0).train().mask() is None


def test_resampled_on_update_boundaries_only():
    d = make(interval=5)
    masks = []
    for update in range(20):
        d.set_num_updates(update)
        masks.append(d.survivors.clone())
    for period in range(4):
        block = masks[5 * period : 5 * period + 5]
        assert all(torch.equal(m, block[0]) for m in block)
    assert len({tuple(m.tolist()) for m in masks[::5]}) > 1
    # the schedule counts updates, not forward calls
    d.set_num_updates(7)
    before = d.survivors.clone()
    for _ in range(10):
        d.train().mask()
    assert torch.equal(d.survivors, before)


def test_same_mask_after_save_and_restore():
    d = make()
    d.set_num_updates(12)
    restored = make()
    restored.load_state_dict(d.state_dict())
    assert torch.equal(restored.survivors, d.survivors)
    restored.set_num_updates(13)  # same period: the restored mask stays
    assert torch.equal(restored.survivors, d.survivors)
    fresh = make()  # a new process draws the same mask for the same period (seeded by seed, layer, period)
    fresh.set_num_updates(14)
    assert torch.equal(fresh.survivors, d.survivors)
    other_layer = make(layer_id=4)
    other_layer.set_num_updates(14)
    assert not torch.equal(other_layer.survivors, d.survivors)


def test_layer_uses_all_experts_in_eval_and_survivors_in_training():
    torch.manual_seed(0)
    cfg = MoEConfig(moe_expert_count=8, moe_clusters=2, cluster_dropout=0.5, cluster_dropout_interval=10)
    layer = MoELayer(cfg, 8, 16)
    layer.set_num_updates(0)
    layer.keep_routing = True
    x = torch.randn(400, 8)
    layer.train()(x)
    used = layer.last_routing[1].unique()
    assert set(used.tolist()) <= set(layer.cluster_dropout.survivors.nonzero().view(-1).tolist())
    layer.eval()(x)
    assert len(layer.last_routing[1].unique()) > len(used)
    assert float(layer.last_stats["rerouted_frac"]) == 0.0
