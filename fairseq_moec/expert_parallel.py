"""Expert parallelism on fairseq's distributed training: the model side (placement, DDP exclusion, loading).

With W > 1 processes (torchrun, SLURM) and ``--moe-expert-parallel auto`` each process holds E/W experts of
every MoE layer (modules/expert_parallel.py moves the tokens). What the model needs, set up when fairseq builds it:

* Placement. ``expert_parallel_for`` says which experts this process holds. ``refuse_unsupported`` refuses the
  fairseq options that cannot work with experts that differ between processes; the Trainer calls it, since only
  it sees the full config under both fairseq-train and fairseq-hydra-train.
* Gradients. fairseq wraps the model in DDP, which *averages* gradients over processes, then multiplies all
  gradients by W / sample_size. An expert's gradient already holds the contributions of every process's
  tokens (they came back through the all_to_all), and expert parameters differ between processes, so DDP
  must leave them alone (torch DDP: ``_set_params_and_buffers_to_ignore_for_model``; fairseq's legacy_ddp
  skips parameters with an ``expert`` attribute) and a hook divides their gradient by W, so that after
  fairseq's W / sample_size every gradient equals single-process training on the union of the batches.
* Loading. ``local_view`` slices a checkpoint of all experts to the experts held here.

What fairseq's Trainer does differently (gradient norm, per-process checkpoints) is the patch
patches/expert_parallel_trainer.py. Everything here is a no-op for single-process runs and for
``--moe-expert-parallel off``.
"""

from typing import Dict, Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .modules import ExpertParallel, MoEConfig, MoELayer
from .modules.config import ConfigError


def expert_parallel_for(args) -> Optional[ExpertParallel]:
    """The expert-parallel placement of this process, or None (one process, or --moe-expert-parallel off).
    fairseq builds the model after it has set up torch.distributed, so the world is known here. The options of
    the other groups are checked by ``refuse_unsupported``: fairseq-hydra-train gives build_model the model's
    options only."""
    if (
        getattr(args, "moe_expert_parallel", "auto") == "off"
        or not dist.is_available()
        or not dist.is_initialized()
        or dist.get_world_size() == 1
    ):
        return None
    MoEConfig.from_namespace(args).validate_expert_parallel(dist.get_world_size())
    return ExpertParallel.from_default_group()


def _option(cfg, path: str, default=None):
    """``cfg.<group>.<name>`` of fairseq's full config, or ``default`` where it is missing or None. fairseq-train
    and fairseq-hydra-train both give the Trainer the full config (fairseq-train's ``cfg.model`` is its whole
    argparse namespace), while build_model gets only the model group under fairseq-hydra-train."""
    group, name = path.split(".")
    value = getattr(getattr(cfg, group, None), name, None)
    return default if value is None else value


def _spelling(path: str, value=True) -> str:
    """An option as both entry points spell it: '--zero-sharding os (distributed_training.zero_sharding=os)'."""
    name = path.split(".")[1]
    flag = "--" + name.replace("_", "-") + ("" if value is True else f" {value}")
    return f"{flag} ({path}={str(value).lower() if isinstance(value, bool) else value})"


def flattens_gradients(cfg) -> bool:
    """Whether fairseq's Trainer keeps one flat fp32 copy of all parameters (FP16Optimizer, flatten=True): a
    single parameter without the ``expert`` attribute, so the gradient norm would mix this process's experts
    into the 'shared' norm. That is --fp16 alone: --memory-efficient-fp16/bf16 and --amp keep the parameters,
    --fp16-no-flatten-grads keeps one copy per parameter, and fairseq never flattens for --bf16."""
    o = lambda path: _option(cfg, path, False)  # noqa: E731
    other = ("bf16", "amp", "memory_efficient_fp16", "memory_efficient_bf16", "fp16_no_flatten_grads")
    return bool(o("common.fp16")) and not any(o(f"common.{name}") for name in other)


def refuse_unsupported(cfg, W: int) -> None:
    """Refuse the fairseq options that cannot work with experts that differ between the W processes. ``cfg`` is
    fairseq's full config, as the Trainer gets it (patches/expert_parallel_trainer.py calls this)."""
    o = lambda path, default=None: _option(cfg, path, default)  # noqa: E731
    problems = []
    backend = o("distributed_training.ddp_backend", "pytorch_ddp")
    if backend not in ("pytorch_ddp", "c10d", "legacy_ddp", "no_c10d"):
        problems.append(f"{_spelling('distributed_training.ddp_backend', backend)}: use pytorch_ddp or legacy_ddp")
    if o("optimization.use_bmuf"):
        problems.append(_spelling("optimization.use_bmuf"))
    if o("distributed_training.zero_sharding", "none") != "none":
        problems.append(_spelling("distributed_training.zero_sharding", o("distributed_training.zero_sharding")))
    if o("ema.store_ema"):
        problems.append(f"{_spelling('ema.store_ema')}: the EMA copy would hold only this process's experts")
    if o("task.eval_bleu"):
        problems.append(
            f"{_spelling('task.eval_bleu')}: beam search runs a different number of steps on each process, and "
            "every process must run every MoE layer equally often"
        )
    for side in ("encoder", "decoder"):
        if o(f"model.{side}_layerdrop", 0) > 0:
            path = f"model.{side}_layerdrop"
            problems.append(f"{_spelling(path, o(path))}: processes would skip different MoE layers")
    if o("common.model_parallel_size", 1) > 1:
        problems.append(_spelling("common.model_parallel_size", o("common.model_parallel_size")))
    if flattens_gradients(cfg):
        problems.append(
            f"{_spelling('common.fp16')} with flattened gradients: add "
            f"{_spelling('common.fp16_no_flatten_grads')}, or use {_spelling('common.memory_efficient_fp16')} "
            f"or {_spelling('common.bf16')}"
        )
    if problems:
        raise ConfigError(
            f"--moe-expert-parallel auto (on {W} processes) does not work with: "
            + "; ".join(problems)
            + ". Or use --moe-expert-parallel off (model.moe_expert_parallel=off): every expert on every process"
        )


def expert_parameters(model: torch.nn.Module) -> Dict[str, tuple]:
    """{parameter name: (parameter, E, local expert range)} for the expert weights of every MoE layer."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, MoELayer):
            for pname, p in module.experts.named_parameters():
                out[f"{name}.experts.{pname}"] = (p, module.cfg.moe_expert_count, module.experts.local_experts)
    return out


def prepare_for_expert_parallel(model: torch.nn.Module, ep: ExpertParallel) -> None:
    """Call before the model is wrapped in DDP (fairseq wraps it on first use, after build_model)."""
    names = list(expert_parameters(model))
    scale = 1.0 / ep.world_size
    for name in names:
        p = model.get_parameter(name)
        p.expert = True  # fairseq: legacy_ddp does not all-reduce it; clip_grad_norm_ keeps it out of the norm
        p.register_hook(lambda grad: grad * scale)  # DDP's 1/W, which these gradients never get (see above)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    model.expert_parallel = ep


def local_view(model: torch.nn.Module, state_dict: dict) -> dict:
    """A state dict whose expert tensors fit this model: a checkpoint of all experts (consolidated, or
    written by one process) is sliced to the experts held here; a checkpoint of another --moe-expert-count and
    a shard of another process count are refused with a message saying what to do."""
    for name, module in model.named_modules():
        # every MoE layer saves its cluster-dropout mask over all of its experts, however many processes wrote it
        saved = state_dict.get(f"{name}.cluster_dropout.survivors") if isinstance(module, MoELayer) else None
        if saved is not None and saved.shape[0] != module.cfg.moe_expert_count:
            # the form of input_checks.refuse_other_model_options, which compares the saved options when a file
            # is read: this is for a state dict without them
            raise ConfigError(
                f"--moe-expert-count: checkpoint {saved.shape[0]}, given {module.cfg.moe_expert_count} (experts in "
                f"each MoE layer). Continue it with --moe-expert-count {saved.shape[0]}, or train the new model in "
                f"another --save-dir"
            )
    out = None
    for key, (p, E, local) in expert_parameters(model).items():
        t = state_dict.get(key)
        if t is None or t.shape[0] == p.shape[0]:
            continue
        if t.shape[0] == E:
            out = dict(state_dict) if out is None else out
            out[key] = t[local.start : local.stop]
            continue
        raise ConfigError(
            f"{key} holds {t.shape[0]} experts, but this model has {E} experts ({p.shape[0]} on this process): "
            f"the checkpoint is the main file of an expert-parallel checkpoint written by "
            f"{E // t.shape[0]} processes. Merge it with scripts/consolidate_checkpoint.py (for fairseq-generate "
            f"or one process), or reshard it to this number of processes with --world-size"
        )
    return state_dict if out is None else out
