"""Label-smoothed cross-entropy plus the weighted MoE losses, with per-layer routing metrics in the logs."""

import math
from dataclasses import dataclass, field

from fairseq import metrics
from fairseq.criterions import register_criterion
from fairseq.criterions.label_smoothed_cross_entropy import (
    LabelSmoothedCrossEntropyCriterion,
    LabelSmoothedCrossEntropyCriterionConfig,
)

from ..modules.config import ConfigError

# Per-layer statistics logged as moe_<layer>_<stat>: token-weighted averages, so that they aggregate
# correctly across processes and gradient-accumulation steps (fairseq sums logging outputs).
LOSS_TERMS = ("balance", "cluster", "z")
ROUTING_STATS = (
    "load_cv",
    "load_entropy",
    "dropped_frac",
    "rerouted_frac",
    "intra_var",
    "inter_var",
    "co_routing",
    "co_routing_chance",
    "mate_concentration",
    "cluster_impurity",
    "cluster_imbalance",
)


@dataclass
class MoECCriterionConfig(LabelSmoothedCrossEntropyCriterionConfig):
    moe_balance_weight: float = field(default=0.01, metadata={"help": "weight of the Switch load-balance loss"})
    moe_cluster_weight: float = field(
        default=0.01,
        metadata={
            "help": (
                "weight of the cluster variance loss (only layers with --moe-clusters > 1). With the default "
                "--moe-cluster-loss-norm relative it means the same at every --moe-expert-count and batch size; "
                "0.01 = the MoEC paper's gate-loss weight 0.01 x variance coefficient 1.0"
            )
        },
    )
    moe_z_weight: float = field(default=0.0, metadata={"help": "weight of the router z-loss (ST-MoE); 0 = off"})


@register_criterion("moec_label_smoothed_cross_entropy", dataclass=MoECCriterionConfig)
class MoECLabelSmoothedCrossEntropy(LabelSmoothedCrossEntropyCriterion):
    """loss = label-smoothed CE (summed over target tokens) + sample_size * sum over MoE layers of
    (w_balance * L_balance + w_cluster * L_cluster + w_z * L_z). The logged ``loss`` is the CE alone, so
    that it compares with dense models; ``moe_loss`` is the weighted auxiliary part."""

    def __init__(
        self,
        task,
        sentence_avg,
        label_smoothing,
        ignore_prefix_size=0,
        report_accuracy=False,
        moe_balance_weight=0.01,
        moe_cluster_weight=0.01,
        moe_z_weight=0.0,
    ):
        super().__init__(task, sentence_avg, label_smoothing, ignore_prefix_size, report_accuracy)
        self.weights = {"balance": moe_balance_weight, "cluster": moe_cluster_weight, "z": moe_z_weight}
        for term, w in self.weights.items():  # a negative weight rewards imbalance: routing collapses
            if not (isinstance(w, (int, float)) and math.isfinite(w) and w >= 0):
                raise ConfigError(f"--moe-{term}-weight: must be a finite number >= 0, got {w!r}")
        if not (math.isfinite(label_smoothing) and 0 <= label_smoothing < 1):
            raise ConfigError(f"--label-smoothing: must be in [0, 1), got {label_smoothing!r}")

    def forward(self, model, sample, reduce=True):
        loss, sample_size, logging_output = super().forward(model, sample, reduce=reduce)
        moe_loss = loss.new_zeros(())
        layers = model.moe_layers() if hasattr(model, "moe_layers") else []
        for name, layer in layers:
            for term in LOSS_TERMS:
                w = self.weights[term]
                value = layer.last_losses[term]
                if w:
                    moe_loss = moe_loss + w * value
                logging_output[f"moe_{name}_{term}"] = value.detach() * sample_size
            for stat in ROUTING_STATS:
                if stat in layer.last_stats:
                    logging_output[f"moe_{name}_{stat}"] = layer.last_stats[stat] * sample_size
        logging_output["moe_loss"] = moe_loss.detach() * sample_size
        return loss + moe_loss * sample_size, sample_size, logging_output

    @classmethod
    def reduce_metrics(cls, logging_outputs) -> None:
        super().reduce_metrics(logging_outputs)
        sample_size = sum(log.get("sample_size", 0) for log in logging_outputs)
        if not sample_size:
            return
        keys = sorted({k for log in logging_outputs for k in log if k.startswith("moe_")})
        for key in keys:
            total = sum(log.get(key, 0) for log in logging_outputs)
            metrics.log_scalar(key, float(total) / sample_size, sample_size, round=4)
