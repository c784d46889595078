"""--inference-experts: validation and generation use every expert by default, or (training-mask) only the
survivors of the cluster-dropout mask saved with the model, as the official MoEC code does."""

import pytest
import torch

from fairseq_moec.modules import MoEConfig, MoELayer


def biased_layer(keep: bool) -> MoELayer:
    """8 experts in 2 clusters, half of each dropped; the router prefers expert 0 for every input."""
    cfg = MoEConfig(moe_expert_count=8, moe_clusters=2, cluster_dropout=0.5, cluster_dropout_interval=1)
    layer = MoELayer(cfg, embed_dim=8, ffn_dim=16)
    layer.set_num_updates(5)
    while bool(layer.cluster_dropout.survivors[0]):  # make expert 0 (the favourite) a dropped one
        layer.set_num_updates(int(layer.cluster_dropout.period) + 1)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0].fill_(1.0)
    layer.eval()
    layer.cluster_dropout.keep_at_inference = keep
    layer.keep_routing = True
    return layer


@pytest.mark.parametrize("keep", [False, True])
def test_eval_routes_to_all_experts_or_to_the_training_survivors(keep):
    layer = biased_layer(keep)
    survivors = layer.cluster_dropout.survivors.clone()
    layer(torch.rand(50, 8) + 0.5)  # positive inputs: expert 0 has the top logit for every token
    used = set(layer.last_routing[1].view(-1).tolist())
    if keep:
        assert used and all(bool(survivors[e]) for e in used)
    else:
        assert used == {0}  # the dropped favourite is used: all experts in eval


def test_generate_path_keeps_the_mask_only_when_asked(tiny_moec_checkpoint):
    """The real task and checkpoint: translation_moec.inference_step with each setting; the MoE layers of the
    loaded model route to the saved survivors only under training-mask."""
    from fairseq import checkpoint_utils

    path, data_bin = tiny_moec_checkpoint
    for setting in ("all", "training-mask"):
        models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
            [str(path)], arg_overrides={"data": str(data_bin), "inference_experts": setting}
        )
        model = models[0]
        layers = [m for m in model.modules() if isinstance(m, MoELayer)]
        assert layers and all(bool((~m.cluster_dropout.survivors).any()) for m in layers)  # a mask was saved
        for m in layers:
            m.keep_routing = True
        task.load_dataset("test")
        sample = task.dataset("test").collater([task.dataset("test")[i] for i in range(8)])

        class ForwardOnly:  # stands in for the sequence generator: one forward of the model
            def generate(self, models, sample, **kw):
                ni = sample["net_input"]
                return models[0](ni["src_tokens"], ni["src_lengths"], ni["prev_output_tokens"])

        task.inference_step(ForwardOnly(), [model], sample)
        assert not model.training
        for m in layers:
            used = set(m.last_routing[1].view(-1).tolist())
            dropped_used = any(not bool(m.cluster_dropout.survivors[e]) for e in used)
            assert not dropped_used if setting == "training-mask" else True
            assert (m.cluster_dropout.mask() is not None) == (setting == "training-mask")
