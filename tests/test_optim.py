"""--optimizer torch_adam against fairseq's own Adam (the reference implementation of the same update)."""

import pytest
import torch
from fairseq.optim.adam import Adam as FairseqAdamReference
from fairseq.optim.adam import FairseqAdamConfig
from omegaconf import OmegaConf

from fairseq_moec.optim import TorchAdam


def config(**overrides):
    cfg = OmegaConf.structured(
        FairseqAdamConfig(adam_betas="(0.9, 0.98)", adam_eps=1e-8, weight_decay=0.01, tpu=False, lr=[2e-3])
    )
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def test_steps_match_fairseq_adam():
    torch.manual_seed(0)
    start = [torch.randn(4, 3), torch.randn(5)]
    ours = [p.clone().requires_grad_() for p in start]
    ref = [p.clone().requires_grad_() for p in start]
    opt = TorchAdam(config(), ours)
    ref_opt = FairseqAdamReference(ref, lr=2e-3, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01)
    for step in range(5):
        grads = [torch.randn_like(p) for p in start]
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
        opt.set_lr(opt.get_lr() * 0.9)  # the scheduler's path: fairseq writes param_group["lr"]
        for group in ref_opt.param_groups:
            group["lr"] *= 0.9
    for p, q, s in zip(ours, ref, start):
        assert not torch.equal(p, s)  # it moved
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    state = opt.state_dict()  # what fairseq checkpoints
    again = TorchAdam(config(), [p.detach().clone().requires_grad_() for p in ours])
    again.load_state_dict(state)
    assert torch.equal(again.optimizer.state_dict()["state"][0]["exp_avg"], state["state"][0]["exp_avg"])


@pytest.mark.parametrize("flag,field", [("--use-old-adam", "use_old_adam"), ("--fp16-adam-stats", "fp16_adam_stats")])
def test_unsupported_flags_are_named(flag, field):
    with pytest.raises(ValueError, match=flag):
        TorchAdam(config(**{field: True}), [torch.zeros(2, requires_grad=True)])
