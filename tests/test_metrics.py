"""The routing metrics of the training logs: a fixed routing through the loss functions, the MoE layer, the
criterion's logging outputs and its reduce_metrics aggregation (against hand computations), and the moe_*
scalars in TensorBoard event files."""

import math
import struct
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from fairseq import metrics
from fairseq.data import Dictionary

from fairseq_moec.criterions.moec_label_smoothed_cross_entropy import (
    LOSS_TERMS,
    ROUTING_STATS,
    MoECLabelSmoothedCrossEntropy,
)
from fairseq_moec.modules import MoEConfig, MoELayer, losses

# Fixed routing: T = 6 tokens, E = 4 experts in G = 2 clusters (C0 = {0, 1}, C1 = {2, 3}).
PROBS = torch.tensor(
    [
        [0.50, 0.30, 0.10, 0.10],
        [0.10, 0.60, 0.20, 0.10],
        [0.10, 0.10, 0.20, 0.60],
        [0.20, 0.10, 0.40, 0.30],
        [0.45, 0.05, 0.10, 0.40],
        [0.70, 0.20, 0.05, 0.05],
    ]
)
EXPERTS = torch.tensor([[0], [1], [3], [2], [0], [0]])  # argmax of each row: load (3, 1, 1, 1)
# Column sums of PROBS: (2.05, 1.35, 1.05, 1.55); mean routing mass P = column sums / 6.
# f = (3, 1, 1, 1) / 6.
# balance = E * sum_e f_e P_e = 4 * (3 * 2.05 + 1.35 + 1.05 + 1.55) / 36 = 4 * 10.1 / 36 = 1.12222
BALANCE = 4 * 10.1 / 36
# relative masses E * mean p = (8.2, 5.4, 4.2, 6.2) / 6: C0 variance (1.4/6)^2, C1 variance (1/6)^2
# intra = (1.96 + 1) / 2 / 36 = 2.96 / 72; cluster means 13.6/12, 10.4/12 around 1 -> inter = (1.6/12)^2
INTRA, INTER = 2.96 / 72, (1.6 / 12) ** 2
# load (3, 1, 1, 1): cv = sqrt(0.75) / 1.5 = 1/sqrt(3); entropy = 0.5 ln 2 + 0.5 ln 6 nats
CV, ENTROPY = 1 / math.sqrt(3), 0.5 * math.log(2) + 0.5 * math.log(6)


# Token cluster loss terms: with m' = 2, q Var(2 r) / 1 = (p_a - p_b)^2 / q per cluster; impurity 2 (1 - q0^2 - q1^2).
# Per row, q0 = .8 .7 .2 .3 .5 .9 and the terms of C0 and C1:
CONCENTRATION_C0 = [0.04 / 0.8, 0.25 / 0.7, 0.0, 0.01 / 0.3, 0.16 / 0.5, 0.25 / 0.9]
CONCENTRATION_C1 = [0.0, 0.01 / 0.3, 0.16 / 0.8, 0.01 / 0.7, 0.09 / 0.5, 0.0]
CONCENTRATION = (sum(CONCENTRATION_C0) + sum(CONCENTRATION_C1)) / 6
IMPURITY = sum(2 * (1 - q * q - (1 - q) ** 2) for q in (0.8, 0.7, 0.2, 0.3, 0.5, 0.9)) / 6
# the clusters' shares: Q0 = 3.4 / 6, Q1 = 2.6 / 6; imbalance (Q0^2 + Q1^2 - 1/2) / (1/2)
IMBALANCE = 2 * ((3.4 / 6) ** 2 + (2.6 / 6) ** 2 - 0.5)


def test_loss_functions_on_the_fixed_routing():
    assert float(losses.load_balance_loss(PROBS, losses.expert_counts(EXPERTS, 4))) == pytest.approx(BALANCE)
    intra, inter = losses.cluster_variances(losses.routing_mass(PROBS, "relative"), 2)
    assert (float(intra), float(inter)) == pytest.approx((INTRA, INTER))
    # summed masses (official code): (2.05, 1.35, 1.05, 1.55), population variances 0.1225 and 0.0625
    intra_s, inter_s = losses.cluster_variances(losses.routing_mass(PROBS, "official"), 2)
    assert (float(intra_s), float(inter_s)) == pytest.approx((0.0925, 0.04))
    assert float(losses.cluster_loss(intra, inter, "ratio")) == pytest.approx(INTRA / INTER)  # = 2.3125
    assert INTRA / INTER == pytest.approx(2.3125)
    cv, entropy = losses.load_statistics(losses.expert_counts(EXPERTS, 4))
    assert (float(cv), float(entropy)) == pytest.approx((CV, ENTROPY))


def fixed_layer(**cfg) -> MoELayer:
    """A MoE layer (d = E = 4) whose router is the identity: feeding x = log(probs) makes softmax(x) = probs."""
    layer = MoELayer(MoEConfig(moe_expert_count=4, moe_clusters=2, **cfg), embed_dim=4, ffn_dim=8)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4))
    return layer.eval()


def test_moe_layer_reports_the_hand_computed_losses_and_stats():
    layer = fixed_layer()
    # one padding row in between: it must be excluded from routing, losses and statistics
    x = torch.cat([PROBS[:3].log(), torch.full((1, 4), 9.0), PROBS[3:].log()])
    pad = torch.tensor([False, False, False, True, False, False, False])
    layer(x, pad)
    L = {k: v.detach() for k, v in layer.last_losses.items()}
    S = layer.last_stats
    assert float(L["balance"]) == pytest.approx(BALANCE, rel=1e-5)
    assert float(L["cluster"]) == pytest.approx(INTRA, rel=1e-5)
    assert float(L["z"]) == pytest.approx(0.0, abs=1e-6)  # logsumexp(log p) = log 1 = 0
    assert float(S["load_cv"]) == pytest.approx(CV, rel=1e-5)
    assert float(S["load_entropy"]) == pytest.approx(ENTROPY, rel=1e-5)
    assert float(S["intra_var"]) == pytest.approx(INTRA, rel=1e-5)
    assert float(S["inter_var"]) == pytest.approx(INTER, rel=1e-5)
    assert float(S["tokens"]) == 6 and S["expert_load"].tolist() == [3, 1, 1, 1]
    assert float(S["dropped_frac"]) == 0 and float(S["rerouted_frac"]) == 0
    # top-2 per row: (0, 1) (1, 2) (3, 2) (2, 3) (0, 3) (0, 1): 4 of 6 in one cluster; chance (2 - 1) / (4 - 1)
    assert float(S["co_routing"]) == pytest.approx(4 / 6) and float(S["co_routing_chance"]) == pytest.approx(1 / 3)
    assert float(S["mate_concentration"]) == pytest.approx(CONCENTRATION, rel=1e-5)
    assert float(S["cluster_impurity"]) == pytest.approx(IMPURITY, rel=1e-5)
    assert float(S["cluster_imbalance"]) == pytest.approx(IMBALANCE, rel=1e-4)
    # the 'ratio' cluster loss of the same routing
    layer = fixed_layer(moe_cluster_loss="ratio")
    layer(PROBS.log())
    assert float(layer.last_losses["cluster"].detach()) == pytest.approx(2.3125, rel=1e-4)


class FixedRoutingModel(nn.Module):
    """Enough of a fairseq model for the criterion: one MoE layer fed a fixed routing, uniform predictions."""

    def __init__(self, vocab=8):
        super().__init__()
        self.layer, self.vocab = fixed_layer(), vocab

    def moe_layers(self):
        return [("enc1", self.layer)]

    def forward(self, router_input, target_shape):
        self.layer(router_input)
        return (torch.zeros(*target_shape, self.vocab),)

    def get_normalized_probs(self, net_output, log_probs):
        return net_output[0].log_softmax(-1)

    def get_targets(self, sample, net_output):
        return sample["target"]


def sample_of(probs: torch.Tensor, ntokens: int):
    target = torch.full((1, ntokens), 3, dtype=torch.long)
    return {
        "net_input": {"router_input": probs.log(), "target_shape": tuple(target.shape)},
        "target": target,
        "ntokens": ntokens,
        "nsentences": 1,
    }


# A second routing: 4 tokens, all to expert 2 -> load (0, 0, 4, 0): cv = sqrt(3), entropy 0.
PROBS2 = torch.tensor([[0.1, 0.1, 0.7, 0.1]] * 4)


def test_criterion_logs_sample_size_weighted_means():
    task = SimpleNamespace(target_dictionary=Dictionary())  # the criterion only asks for the padding index
    crit = MoECLabelSmoothedCrossEntropy(
        task, sentence_avg=False, label_smoothing=0.0, moe_balance_weight=0.01, moe_cluster_weight=0.1, moe_z_weight=0.0
    )
    model = FixedRoutingModel(vocab=8)
    loss1, size1, log1 = crit(model, sample_of(PROBS, 10))
    loss2, size2, log2 = crit(model, sample_of(PROBS2, 30))
    assert (size1, size2) == (10, 30)
    # per batch the criterion logs statistic * sample_size
    assert float(log1["moe_enc1_load_cv"]) == pytest.approx(CV * 10, rel=1e-5)
    assert float(log1["moe_enc1_balance"]) == pytest.approx(BALANCE * 10, rel=1e-5)
    assert float(log2["moe_enc1_load_cv"]) == pytest.approx(math.sqrt(3) * 30, rel=1e-5)
    # co-routing and its chance (eval: all 4 experts), the token loss's terms: logged for every cluster loss
    assert float(log1["moe_enc1_co_routing"]) == pytest.approx(4 / 6 * 10, rel=1e-5)
    assert float(log1["moe_enc1_co_routing_chance"]) == pytest.approx(1 / 3 * 10, rel=1e-5)
    assert float(log1["moe_enc1_mate_concentration"]) == pytest.approx(CONCENTRATION * 10, rel=1e-5)
    assert float(log1["moe_enc1_cluster_impurity"]) == pytest.approx(IMPURITY * 10, rel=1e-5)
    assert float(log1["moe_enc1_cluster_imbalance"]) == pytest.approx(IMBALANCE * 10, rel=1e-4)
    # CE of a uniform prediction over 8 classes: ln 8 per token; the MoE part is sample_size * weighted losses
    moe1 = 0.01 * BALANCE + 0.1 * INTRA
    assert float(log1["loss"]) == pytest.approx(10 * math.log(8), rel=1e-5)
    assert float(log1["moe_loss"]) == pytest.approx(10 * moe1, rel=1e-5)
    assert float(loss1.detach()) == pytest.approx(10 * math.log(8) + 10 * moe1, rel=1e-5)
    # PROBS2: P = (0.1, 0.1, 0.7, 0.1), f = (0, 0, 1, 0): balance = 4 * 0.7 = 2.8; relative masses equal within C0
    # (0.4, 0.4: variance 0) and C1 = (2.8, 0.4) -> variance 1.44: intra = 0.72; cluster means 0.4, 1.6 -> inter 0.36
    assert float(log2["moe_enc1_balance"]) == pytest.approx(2.8 * 30, rel=1e-5)
    assert float(log2["moe_enc1_intra_var"]) == pytest.approx(0.72 * 30, rel=1e-5)
    assert float(log2["moe_enc1_inter_var"]) == pytest.approx(0.36 * 30, rel=1e-5)
    assert float(log2["moe_enc1_load_entropy"]) == pytest.approx(0.0, abs=1e-6)

    with metrics.aggregate(new_root=True) as agg:
        MoECLabelSmoothedCrossEntropy.reduce_metrics([log1, log2])
        logged = agg.get_smoothed_values()
    expected = {  # sample_size-weighted means over the two batches (10 and 30 target tokens)
        "moe_enc1_load_cv": (CV * 10 + math.sqrt(3) * 30) / 40,  # 1.443376
        "moe_enc1_load_entropy": (ENTROPY * 10 + 0.0 * 30) / 40,  # 0.310613
        "moe_enc1_balance": (BALANCE * 10 + 2.8 * 30) / 40,  # 2.380556
        "moe_enc1_intra_var": (INTRA * 10 + 0.72 * 30) / 40,  # 0.550278
        "moe_enc1_inter_var": (INTER * 10 + 0.36 * 30) / 40,  # 0.274444
        "moe_enc1_cluster": (INTRA * 10 + 0.72 * 30) / 40,
        "moe_enc1_z": 0.0,
        "moe_enc1_dropped_frac": 0.0,
        "moe_enc1_rerouted_frac": 0.0,
        "moe_loss": (10 * moe1 + 30 * (0.01 * 2.8 + 0.1 * 0.72)) / 40,
    }
    assert expected["moe_enc1_load_cv"] == pytest.approx(1.443376, abs=1e-6)
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, abs=1e-4), key  # logged with round=4
    # the unweighted mean would differ: the weighting is what is being tested
    assert abs(logged["moe_enc1_load_cv"] - (CV + math.sqrt(3)) / 2) > 0.2
    # the plain label-smoothed CE is still logged the fairseq way (base 2, per target token)
    assert logged["loss"] == pytest.approx(math.log(8) / math.log(2), abs=1e-3)


def test_reduce_metrics_with_two_fake_logging_outputs():
    """Exactly the shape fairseq hands reduce_metrics: summed values and sample sizes of several batches."""
    logs = [
        {
            "loss": 20.0,
            "nll_loss": 18.0,
            "ntokens": 10,
            "nsentences": 2,
            "sample_size": 10,
            "moe_dec1_load_cv": 0.2 * 10,
            "moe_dec1_balance": 1.0 * 10,
        },
        {
            "loss": 90.0,
            "nll_loss": 80.0,
            "ntokens": 30,
            "nsentences": 5,
            "sample_size": 30,
            "moe_dec1_load_cv": 0.6 * 30,
            "moe_dec1_balance": 1.4 * 30,
        },
    ]
    with metrics.aggregate(new_root=True) as agg:
        MoECLabelSmoothedCrossEntropy.reduce_metrics(logs)
        logged = agg.get_smoothed_values()
    assert logged["moe_dec1_load_cv"] == pytest.approx((2 + 18) / 40)  # 0.5, not the plain mean 0.4
    assert logged["moe_dec1_balance"] == pytest.approx((10 + 42) / 40)  # 1.3
    assert logged["loss"] == pytest.approx(110 / 40 / math.log(2), abs=1e-3)


def read_tensorboard_scalars(path):
    """{tag: [(step, value)]} of one TensorBoard event file (TFRecord framing: u64 length, u32 crc, payload,
    u32 crc; payload = an Event protobuf)."""
    from tensorboardX.proto.event_pb2 import Event

    data, i, out = path.read_bytes(), 0, {}
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i : i + 8])
        event = Event.FromString(data[i + 12 : i + 12 + n])
        i += 12 + n + 4
        for v in event.summary.value:
            out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


@pytest.mark.slow  # fairseq-train and the analysis command
def test_moe_scalars_reach_tensorboard(tiny_moec_tensorboard):
    expected = {f"moe_{layer}_{stat}" for layer in ("enc1", "dec1") for stat in LOSS_TERMS + ROUTING_STATS}
    expected.add("moe_loss")
    for run_name, updates in (("train_inner", {1, 2, 3, 4}), ("valid", {4})):
        files = sorted((tiny_moec_tensorboard / run_name).glob("events.out.tfevents.*"))
        assert files, f"no event file under {tiny_moec_tensorboard / run_name}"
        scalars = {}
        for f in files:
            for tag, points in read_tensorboard_scalars(f).items():
                scalars.setdefault(tag, []).extend(points)
        missing = expected - set(scalars)
        assert not missing, f"{run_name}: {sorted(missing)}"
        for tag in expected:
            assert {step for step, _ in scalars[tag]} == updates, tag
            assert all(math.isfinite(v) for _, v in scalars[tag]), tag
        # an even-load entropy bound: 0 <= entropy <= ln 4 in every logged point
        assert all(-1e-4 <= v <= math.log(4) + 1e-4 for _, v in scalars["moe_enc1_load_entropy"])
