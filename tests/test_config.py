"""Invalid option values and combinations fail with a message naming the flag."""

import math
from fractions import Fraction

import pytest

from fairseq_moec.modules import ClusterDropout, MoEConfig
from fairseq_moec.modules.config import ConfigError, experts_dropped_per_cluster

BAD = [
    (dict(moe_expert_count=0), "--moe-expert-count"),
    (dict(moe_expert_count=8, moe_clusters=3), "--moe-clusters"),
    (dict(moe_top_k=3), "--moe-top-k"),
    (dict(moe_expert_count=1, moe_top_k=2), "--moe-top-k"),
    (dict(cluster_dropout=1.0), "--cluster-dropout"),
    (dict(cluster_dropout=-0.1), "--cluster-dropout"),
    (dict(moe_expert_count=8, moe_clusters=4, cluster_dropout=0.75), "--cluster-dropout"),  # empties clusters of 2
    (dict(moe_capacity_factor=0.0), "--moe-capacity-factor"),
    (dict(moe_eval_capacity_factor=-1.0), "--moe-eval-capacity-factor"),
    (dict(moe_router="hash"), "--moe-router"),
    (dict(cluster_dropout_reroute="nearest"), "--cluster-dropout-reroute"),
    (dict(moe_cluster_loss="inter"), "--moe-cluster-loss"),
    (dict(moe_cluster_loss_norm="max"), "--moe-cluster-loss-norm"),
    (dict(cluster_dropout_interval=0), "--cluster-dropout-interval"),
    (dict(moe_jitter_eps=1.5), "--moe-jitter-eps"),
    (dict(moe_expert_sublayers=0), "--moe-expert-sublayers"),
    # numbers that pass "> 0" or "< 1" comparisons but fail once training runs
    (dict(moe_capacity_factor=math.inf), "--moe-capacity-factor"),
    (dict(moe_eval_capacity_factor=math.inf), "--moe-eval-capacity-factor"),
    (dict(moe_eval_capacity_factor=math.nan), "--moe-eval-capacity-factor"),
    (dict(moe_router="cosine", moe_router_temperature=math.inf), "--moe-router-temperature"),
    (dict(moe_router="cosine", moe_router_temperature=math.nan), "--moe-router-temperature"),
    (dict(moe_jitter_eps=math.nan), "--moe-jitter-eps"),
    (dict(cluster_dropout=math.nan), "--cluster-dropout"),
    (dict(moe_seed=-1), "--moe-seed"),
    (dict(moe_seed=2**64), "--moe-seed"),
    (dict(moe_expert_count=8.0), "--moe-expert-count"),  # e.g. from a YAML config: an int option
    (dict(moe_capacity_factor="1.25"), "--moe-capacity-factor"),
    # cluster dropout that would drop no expert: training would silently be plain MoE
    (dict(moe_expert_count=8, moe_clusters=1, cluster_dropout=0.05), "--cluster-dropout"),  # 0.4 -> 0
    (dict(moe_expert_count=4, moe_clusters=2, cluster_dropout=0.2), "--cluster-dropout"),  # 0.4 -> 0
    (dict(moe_expert_count=4, moe_clusters=4, cluster_dropout=0.5), "--cluster-dropout"),  # clusters of 1
    # gates, the token cluster loss and the official routing
    (dict(moe_gate="softmax"), "--moe-gate: must be one of auto, expert, cluster, sigmoid"),
    (dict(moe_gate="sigmoid"), "--moe-gate: sigmoid .* needs --moe-router cosine and --moe-top-k 1"),
    (dict(moe_gate="sigmoid", moe_router="cosine", moe_top_k=2), "--moe-gate: sigmoid .*--moe-top-k 2"),
    (dict(moe_gate="cluster", moe_clusters=1), "--moe-gate: cluster needs --moe-clusters > 1"),
    (dict(moe_cluster_loss="token", moe_cluster_loss_norm="official"), "--moe-cluster-loss-norm: official is only"),
    (dict(moe_loss_temperature=0.07), "--moe-loss-temperature: needs --moe-router cosine"),
    (dict(moe_router="cosine", moe_loss_temperature=0.0), "--moe-loss-temperature: must be > 0"),
    (dict(moe_router="cosine", moe_loss_temperature=math.inf), "--moe-loss-temperature"),
    (dict(moe_cluster_loss="pairs"), "--moe-cluster-loss: must be one of intra, ratio, token"),
]


@pytest.mark.parametrize("kwargs,flag", BAD)
def test_invalid_options_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        MoEConfig(**kwargs).validate()


def test_clusters_error_lists_allowed_values():
    with pytest.raises(ValueError, match=r"allowed: 1, 2, 4, 8"):
        MoEConfig(moe_expert_count=8, moe_clusters=3).validate()


def test_the_official_recipe_and_the_token_loss_pass():
    official = MoEConfig(
        moe_expert_count=64,
        moe_clusters=8,
        moe_router="cosine",
        moe_gate="sigmoid",
        moe_loss_temperature=0.07,
        moe_cluster_loss_norm="official",
        cluster_dropout=0.5,
        cluster_dropout_reroute="global",
    ).validate()
    assert official.gate == "sigmoid"
    assert MoEConfig(moe_clusters=2, moe_cluster_loss="token", moe_top_k=2).validate().gate == "cluster"


def test_valid_config_passes():
    cfg = MoEConfig(
        moe_expert_count=64, moe_clusters=8, cluster_dropout=0.5, moe_top_k=2, moe_capacity_factor=1.25
    ).validate()
    assert (cfg.cluster_size, cfg.dropped_per_cluster) == (8, 4)


def test_every_error_is_a_config_error():
    """The fairseq commands print ConfigError as one line (one_line_errors patch); it stays a ValueError for callers."""
    for kwargs, _ in BAD:
        with pytest.raises(ConfigError):
            MoEConfig(**kwargs).validate()
    assert issubclass(ConfigError, ValueError)


def test_dropped_per_cluster_rounds_half_up():
    """floor(p m + 1/2) against exact rational arithmetic on the decimal rates a user types (Python's round would
    give 0 for 0.25 x 2 and 0.05 x 10, 2 for 0.5 x 5)."""
    for percent in range(1, 100):
        for m in range(1, 65):
            p = Fraction(percent, 100)
            expected = math.floor(p * m + Fraction(1, 2))
            assert experts_dropped_per_cluster(percent / 100, m) == expected, (percent, m)
            cfg = MoEConfig(moe_expert_count=m * 2, moe_clusters=2, cluster_dropout=percent / 100)
            # one rule for the config and the layer's dropout module
            assert cfg.dropped_per_cluster == ClusterDropout(m * 2, 2, percent / 100, 1, 1, 0).num_dropped == expected


def test_settings_in_use_keep_their_meaning():
    for rate, m, dropped in ((0.5, 2, 1), (0.5, 4, 2), (0.5, 8, 4), (0.25, 4, 1), (0.75, 8, 6), (0.5, 3, 2)):
        assert experts_dropped_per_cluster(rate, m) == dropped


@pytest.mark.parametrize("m", range(2, 65))
def test_silent_dropout_names_the_smallest_rate_that_drops_one(m):
    with pytest.raises(ConfigError, match=r"--cluster-dropout: 0.0001 drops no expert in clusters of") as e:
        MoEConfig(moe_expert_count=2 * m, moe_clusters=2, cluster_dropout=0.0001).validate()
    smallest = float(str(e.value).split("the smallest rate that drops one expert is ")[1].split(";")[0])
    cfg = MoEConfig(moe_expert_count=2 * m, moe_clusters=2, cluster_dropout=smallest).validate()
    assert cfg.dropped_per_cluster == 1
    assert experts_dropped_per_cluster(smallest - 0.0001, m) == 0  # the smallest at 4 decimals


def test_huge_numbers_that_are_valid_pass():
    MoEConfig(
        moe_seed=2**64 - 1, moe_capacity_factor=1e6, cluster_dropout=0.5, moe_expert_count=8, moe_clusters=2
    ).validate()


@pytest.mark.parametrize("rate", [0.3, 0.5, 0.9])
def test_clusters_of_one_expert_cannot_use_dropout(rate):
    """No rate works there (0.5 would empty the cluster): the message must not suggest one."""
    with pytest.raises(
        ConfigError,
        match=r"--cluster-dropout: clusters of 1 expert .* cannot drop an expert and "
        r"keep one: use --cluster-dropout 0, or fewer --moe-clusters",
    ):
        MoEConfig(moe_expert_count=4, moe_clusters=4, cluster_dropout=rate).validate()
