"""``--optimizer torch_adam``: fairseq's Adam options (``--adam-betas``, ``--adam-eps``, ``--weight-decay``,
``--lr``) run by ``torch.optim.AdamW(fused=True)``, one kernel over all parameters on CPU or CUDA.

Why: without apex, fairseq's ``adam`` is a Python loop of several ops per parameter. An MoE model has E times
the FFN parameters, and on the 2-core CPU the step took 4.75x as long as fused (benchmarks/bench_optim.py).
Same algorithm as fairseq's ``adam`` (AdamW-style decoupled weight decay, bias correction). One difference:
torch adds eps to sqrt(v / (1 - beta2^t)), fairseq to sqrt(v); they differ while t is small and v is below
eps^2, i.e. for parameters with almost no gradient.
"""

import torch
from fairseq.optim import FairseqOptimizer, register_optimizer
from fairseq.optim.adam import FairseqAdam, FairseqAdamConfig


@register_optimizer("torch_adam", dataclass=FairseqAdamConfig)
class TorchAdam(FairseqAdam):
    def __init__(self, cfg: FairseqAdamConfig, params):
        FairseqOptimizer.__init__(self, cfg)  # FairseqAdam.__init__ would build fairseq's own Adam
        for flag, value in (
            ("--use-old-adam", cfg.use_old_adam),
            ("--fp16-adam-stats", cfg.fp16_adam_stats),
            ("--tpu", getattr(cfg, "tpu", False)),
        ):
            if value:
                raise ValueError(f"{flag} is not supported by --optimizer torch_adam; use --optimizer adam")
        self._optimizer = torch.optim.AdamW(params, fused=True, **self.optimizer_config)

    @property
    def supports_flat_params(self):
        return True
