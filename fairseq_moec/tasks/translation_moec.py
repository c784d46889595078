"""translation_moec: fairseq's translation task, driving the cluster-dropout schedule of MoE layers."""
from dataclasses import dataclass, field

from fairseq.dataclass import ChoiceEnum
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from ..modules import MoELayer


@dataclass
class TranslationMoECConfig(TranslationConfig):
    inference_experts: ChoiceEnum(["all", "training-mask"]) = field(default="all", metadata={
        "help": "experts that validation, generation and interactive translation route to: 'all', or "
                "'training-mask': only the survivors of the cluster-dropout mask saved with the model (the mask of "
                "its last training update), as the official MoEC code does; for comparison"})


def keep_training_mask(model, keep: bool) -> None:
    for m in model.modules():
        if isinstance(m, MoELayer):
            m.cluster_dropout.keep_at_inference = keep


def set_moe_updates(model, num_updates: int) -> None:
    for m in model.modules():
        if isinstance(m, MoELayer):
            m.set_num_updates(num_updates)


@register_task("translation_moec", dataclass=TranslationMoECConfig)
class TranslationMoECTask(TranslationTask):
    """Same data and options as ``translation``. Training tells every MoE layer the optimizer update number
    (cluster-dropout masks are resampled on update boundaries, not forward calls); validation, generation and
    interactive translation run the model in eval mode, where every expert is used."""

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        set_moe_updates(model, update_num)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)

    def valid_step(self, sample, model, criterion):
        model.eval()  # all experts, unless --inference-experts training-mask
        keep_training_mask(model, self.cfg.inference_experts == "training-mask")
        return super().valid_step(sample, model, criterion)

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        for m in models:
            m.eval()  # all experts, unless --inference-experts training-mask
            keep_training_mask(m, self.cfg.inference_experts == "training-mask")
        return super().inference_step(generator, models, sample, prefix_tokens, constraints)
