"""Let ``torchrun ... fairseq-train --cpu --distributed-backend gloo`` train with all its processes.

Upstream behaviour (fairseq-fixed 0.12.3.1): ``fairseq.distributed.utils.infer_init_method`` reads torchrun's
environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) only when --distributed-world-size is not 1, and that
flag defaults to the number of GPUs: on a machine without GPUs every torchrun worker silently trains alone, as its
own rank 0 (all writing the same checkpoints). Given --distributed-world-size, fairseq (in
``_infer_torch_distributed_launch_init``) computes the device id as ``rank % torch.cuda.device_count()`` and
divides by zero; and torch's DistributedDataParallel refuses the device id fairseq then passes for a CPU model.
We take the world size from torchrun when the flag was left at 1 and, without GPUs, use device 0 and fairseq's
own --ddp-backend legacy_ddp (same averaged gradients, all-reduced after the backward pass). With GPUs and an
explicit world size nothing changes.
"""

import logging
import os

import torch
from fairseq.distributed import utils as distributed_utils

from .target import Patch

logger = logging.getLogger(__name__)

PATCH = Patch("torchrun_cpu", "torchrun without GPUs starts processes that each train alone, or divide by zero")

TORCHRUN_ENV = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")

fairseq_infer_init_method = None  # fairseq's functions, kept by apply()
fairseq_torchrun_init = None


def infer_init_method_from_torchrun(cfg, force_distributed=False):
    if (
        cfg.distributed_init_method is None
        and all(k in os.environ for k in TORCHRUN_ENV)
        and int(os.environ["WORLD_SIZE"]) > 1
        and cfg.distributed_world_size == 1
    ):
        cfg.distributed_world_size = int(os.environ["WORLD_SIZE"])
    return fairseq_infer_init_method(cfg, force_distributed)


def torchrun_init_without_gpus(cfg):
    if torch.cuda.device_count() > 0:
        return fairseq_torchrun_init(cfg)
    cfg.distributed_init_method = "env://"
    cfg.distributed_world_size = int(os.environ["WORLD_SIZE"])
    cfg.distributed_rank = int(os.environ["RANK"])
    cfg.device_id = 0  # no GPU to pick: fairseq would call torch.cuda.set_device for any other id
    cfg.distributed_no_spawn = True
    if cfg.ddp_backend in ("pytorch_ddp", "c10d"):  # torch DDP raises on fairseq's device_ids=[0] for a CPU model
        logger.info("no GPU: using --ddp-backend legacy_ddp")
        cfg.ddp_backend = "legacy_ddp"


def installed() -> bool:
    return PATCH.installed(distributed_utils, "infer_init_method")


def check() -> None:
    PATCH.expect_fairseq()
    where = "fairseq.distributed.utils"
    PATCH.expect_parameters(distributed_utils, "infer_init_method", where, ["cfg", "force_distributed"])
    PATCH.expect_parameters(distributed_utils, "_infer_torch_distributed_launch_init", where, ["cfg"])


def apply() -> None:
    global fairseq_infer_init_method, fairseq_torchrun_init
    fairseq_infer_init_method = distributed_utils.infer_init_method
    fairseq_torchrun_init = distributed_utils._infer_torch_distributed_launch_init
    PATCH.replace(distributed_utils, "infer_init_method", infer_init_method_from_torchrun)
    PATCH.replace(distributed_utils, "_infer_torch_distributed_launch_init", torchrun_init_without_gpus)
    PATCH.log(
        "replaced fairseq.distributed.utils.infer_init_method and _infer_torch_distributed_launch_init "
        "(torchrun's world size; without GPUs device 0 and legacy_ddp)"
    )
