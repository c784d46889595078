"""translation_moec: fairseq's translation task, driving the cluster-dropout schedule of MoE layers."""

import logging
import math
from dataclasses import dataclass, field

import torch
from fairseq.dataclass import ChoiceEnum
from fairseq.sequence_generator import SequenceGenerator
from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from ..modules import MoELayer

logger = logging.getLogger(__name__)


@dataclass
class TranslationMoECConfig(TranslationConfig):
    inference_experts: ChoiceEnum(["all", "training-mask"]) = field(
        default="all",
        metadata={
            "help": "experts that validation, generation and interactive translation route to: 'all', or "
            "'training-mask': only the survivors of the cluster-dropout mask saved with the model (the mask of "
            "its last training update), as the official MoEC code does; for comparison"
        },
    )


def keep_training_mask(model, keep: bool) -> None:
    for m in model.modules():
        if isinstance(m, MoELayer):
            m.cluster_dropout.keep_at_inference = keep


@register_task("translation_moec", dataclass=TranslationMoECConfig)
class TranslationMoECTask(TranslationTask):
    """Same data and options as ``translation``. In training, fairseq's own train_step hands the optimizer update
    number to every module with ``set_num_updates``, MoE layers included: cluster-dropout masks are resampled on
    update boundaries, not forward calls (tests/test_schedule_e2e.py). Validation, generation and interactive
    translation run the model in eval mode, where every expert is used (unless --inference-experts says
    otherwise).

    Raw-text translation (fairseq-interactive, the hub's ``translate``) gives every input line a result: a line
    longer than the model's source positions is cut to fit, with a warning (fairseq would end the session), and
    an empty line translates to an empty line (the model, never trained on empty pairs, would invent one)."""

    model_max_source_positions = math.inf  # the least of the models built for this task

    def build_model(self, cfg, from_checkpoint=False):
        model = super().build_model(cfg, from_checkpoint)
        self.model_max_source_positions = min(self.model_max_source_positions, model.max_positions()[0])
        return model

    def build_dataset_for_inference(self, src_tokens, src_lengths, constraints=None):
        limit = min(self.cfg.max_source_positions, self.model_max_source_positions)
        tokens = [self._fit_source(t, limit) for t in src_tokens]
        return super().build_dataset_for_inference(tokens, [t.numel() for t in tokens], constraints)

    def _fit_source(self, tokens: torch.Tensor, limit: int) -> torch.Tensor:
        if tokens.numel() <= limit:
            return tokens
        logger.warning(
            f"an input of {tokens.numel()} tokens ({self.src_dict.string(tokens[:8])} ...) is longer than "
            f"the {limit} source positions allowed (the model's, or --max-source-positions if fewer): "
            f"translating its first {limit - 1} tokens only. "
            f"Split longer lines to translate all of their text"
        )
        eos = tokens[-1:] if tokens[-1] == self.src_dict.eos() else tokens[:0]
        return torch.cat([tokens[: limit - len(eos)], eos])

    def valid_step(self, sample, model, criterion):
        model.eval()  # all experts, unless --inference-experts training-mask
        keep_training_mask(model, self.cfg.inference_experts == "training-mask")
        return super().valid_step(sample, model, criterion)

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        for m in models:
            m.eval()  # all experts, unless --inference-experts training-mask
            keep_training_mask(m, self.cfg.inference_experts == "training-mask")
        hypos = super().inference_step(generator, models, sample, prefix_tokens, constraints)
        if isinstance(generator, SequenceGenerator) and prefix_tokens is None:
            # the source of an empty line is the end-of-sentence token alone
            for i in (sample["net_input"]["src_lengths"] <= 1).nonzero().flatten().tolist():
                hypos[i] = [empty_hypothesis(self.tgt_dict.eos())]
        return hypos


def empty_hypothesis(eos: int) -> dict:
    """An empty translation as fairseq's SequenceGenerator returns hypotheses (score 0: it is not the model's)."""
    return {
        "tokens": torch.tensor([eos]),
        "score": torch.tensor(0.0),
        "attention": torch.empty(0),
        "alignment": torch.empty(0),
        "positional_scores": torch.zeros(1),
    }
