"""Invalid option values and combinations fail with a message naming the flag."""
import pytest

from fairseq_moec.modules import MoEConfig

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
]


@pytest.mark.parametrize("kwargs,flag", BAD)
def test_invalid_options_name_the_flag(kwargs, flag):
    with pytest.raises(ValueError, match=flag):
        MoEConfig(**kwargs).validate()


def test_clusters_error_lists_allowed_values():
    with pytest.raises(ValueError, match=r"allowed: 1, 2, 4, 8"):
        MoEConfig(moe_expert_count=8, moe_clusters=3).validate()


def test_valid_config_passes():
    cfg = MoEConfig(moe_expert_count=64, moe_clusters=8, cluster_dropout=0.5, moe_top_k=2,
                    moe_capacity_factor=1.25).validate()
    assert (cfg.cluster_size, cfg.dropped_per_cluster) == (8, 4)
