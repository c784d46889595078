"""Let ``fairseq-train --bf16`` train in bf16 on GPUs (and CPUs) instead of asking for a TPU.

Upstream behaviour (fairseq-fixed 0.12.3.1): fairseq's command line turns ``--bf16`` and
``--memory-efficient-bf16`` into ``--tpu`` as well (it dates from before GPUs had bf16), and fairseq-train then
stops at ``torch_xla``'s first use ('NoneType' object has no attribute 'xla_device'). ``fairseq-hydra-train``
(``common.bf16: true``) has no such rule. Where torch_xla is not installed no TPU can be meant, so before training
starts (``fairseq.distributed.utils.call_main``) we drop the implied ``tpu`` and keep ``bf16``: the Trainer then
casts the model to bf16 on the GPU or CPU, with fairseq's (memory-efficient) FP16Optimizer, which for bf16 runs
without loss scaling. Where torch_xla is installed nothing changes.
"""

import importlib.util
import logging

from fairseq.distributed import utils as distributed_utils

from .target import Patch

logger = logging.getLogger(__name__)

PATCH = Patch("bf16_without_tpu", "fairseq-train --bf16 stops at torch_xla (it implies --tpu)")

fairseq_call_main = None  # fairseq's function, kept by apply()


def drop_implied_tpu(cfg) -> None:
    common = cfg.common
    if not (common.bf16 and common.tpu) or importlib.util.find_spec("torch_xla") is not None:
        return
    logger.info(
        "--bf16: torch_xla is not installed, so no TPU: training in bf16 on %s", "the CPU" if common.cpu else "the GPU"
    )
    for name in ("common", "distributed_training", "optimizer", "model"):  # every copy of the 'tpu' field
        sub = getattr(cfg, name, None)
        if sub is not None and getattr(sub, "tpu", None) is not None:
            sub.tpu = False


def call_main_without_implied_tpu(cfg, main, **kwargs):
    drop_implied_tpu(cfg)
    return fairseq_call_main(cfg, main, **kwargs)


def installed() -> bool:
    return PATCH.installed(distributed_utils, "call_main")


def check() -> None:
    PATCH.expect_fairseq()
    PATCH.expect_parameters(distributed_utils, "call_main", "fairseq.distributed.utils", ["cfg", "main", "kwargs"])


def apply() -> None:
    global fairseq_call_main
    fairseq_call_main = distributed_utils.call_main
    PATCH.replace(distributed_utils, "call_main", call_main_without_implied_tpu)
    PATCH.log("replaced fairseq.distributed.utils.call_main (--bf16 without torch_xla drops the implied --tpu)")
