"""Expert parallelism on fairseq's distributed training (glue between modules/ and fairseq's Trainer).

With W > 1 processes (torchrun, SLURM) and ``--moe-expert-parallel auto`` each process holds E/W experts of
every MoE layer (modules/expert_parallel.py moves the tokens). What fairseq has to do differently:

* Gradients. fairseq wraps the model in DDP, which *averages* gradients over processes, then multiplies all
  gradients by W / sample_size. An expert's gradient already holds the contributions of every process's
  tokens (they came back through the all_to_all), and expert parameters differ between processes, so DDP
  must leave them alone (torch DDP: ``_set_params_and_buffers_to_ignore_for_model``; fairseq's legacy_ddp
  skips parameters with an ``expert`` attribute) and a hook divides their gradient by W, so that after
  fairseq's W / sample_size every gradient equals single-process training on the union of the batches.
* Gradient norm. fairseq's clip_grad_norm_ leaves parameters with ``expert`` out of the norm (which is then
  the same on every process) and clips them with the same factor; we add the experts of all processes to
  the norm, so --clip-norm and the logged gnorm mean what they mean on one process.
* Checkpoints. Every process saves (sharded_checkpoint.py says what goes where); resume loads the main file
  on process 0 and broadcasts it as fairseq does (shared parameters, cluster-dropout state, optimizer and
  training state), then each process r > 0 puts back its own experts and their optimizer state.
  A checkpoint of a different process count (e.g. a consolidated one) is sliced to this process's experts.

Everything here is a no-op for single-process runs and for ``--moe-expert-parallel off``.
"""
import logging
import os
import uuid
from itertools import chain
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
from fairseq import file_io
from fairseq.trainer import Trainer
from torch.nn.parallel import DistributedDataParallel

from . import sharded_checkpoint as sc
from .modules import ExpertParallel, MoEConfig, MoELayer
from .modules.config import ConfigError

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- model setup
def expert_parallel_for(args) -> Optional[ExpertParallel]:
    """The expert-parallel placement of this process, or None (one process, or --moe-expert-parallel off).
    fairseq builds the model after it has set up torch.distributed, so the world is known here."""
    if (getattr(args, "moe_expert_parallel", "auto") == "off" or not dist.is_available()
            or not dist.is_initialized() or dist.get_world_size() == 1):
        return None
    W = dist.get_world_size()
    MoEConfig.from_namespace(args).validate_expert_parallel(W)
    _refuse_unsupported(args, W)
    return ExpertParallel.from_default_group()


def _refuse_unsupported(args, W: int) -> None:
    g = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    problems = []
    if g("ddp_backend", "pytorch_ddp") not in ("pytorch_ddp", "c10d", "legacy_ddp", "no_c10d"):
        problems.append(f"--ddp-backend {g('ddp_backend')} (use pytorch_ddp or legacy_ddp)")
    if g("use_bmuf"):
        problems.append("--use-bmuf")
    if g("zero_sharding", "none") != "none":
        problems.append("--zero-sharding")
    if g("store_ema"):
        problems.append("--store-ema (the EMA copy would hold only this process's experts)")
    if g("eval_bleu"):
        problems.append("--eval-bleu (beam search runs a different number of steps on each process, and "
                        "every process must run every MoE layer equally often)")
    if (g("encoder_layerdrop", 0) or 0) > 0 or (g("decoder_layerdrop", 0) or 0) > 0:
        problems.append("--encoder-layerdrop/--decoder-layerdrop (processes would skip different MoE layers)")
    if (g("model_parallel_size", 1) or 1) > 1:
        problems.append("--model-parallel-size > 1")
    if ((g("fp16") and not g("memory_efficient_fp16")) or (g("bf16") and not g("memory_efficient_bf16"))) \
            and not g("fp16_no_flatten_grads"):
        problems.append("--fp16/--bf16 with flattened gradients (add --fp16-no-flatten-grads, or use "
                        "--memory-efficient-fp16/--memory-efficient-bf16)")
    if problems:
        raise ConfigError(f"--moe-expert-parallel auto (on {W} processes) does not work with: "
                         + "; ".join(problems) + ". Or use --moe-expert-parallel off (every expert on every process)")


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
            raise ConfigError(
                f"--moe-expert-count: the checkpoint has {saved.shape[0]} experts in each MoE layer, this run "
                f"{module.cfg.moe_expert_count}. Continue it with --moe-expert-count {saved.shape[0]}, or train the "
                f"new model in another --save-dir")
    out = None
    for key, (p, E, local) in expert_parameters(model).items():
        t = state_dict.get(key)
        if t is None or t.shape[0] == p.shape[0]:
            continue
        if t.shape[0] == E:
            out = dict(state_dict) if out is None else out
            out[key] = t[local.start:local.stop]
            continue
        raise ConfigError(
            f"{key} holds {t.shape[0]} experts, but this model has {E} experts ({p.shape[0]} on this process): "
            f"the checkpoint is the main file of an expert-parallel checkpoint written by "
            f"{E // t.shape[0]} processes. Merge it with scripts/consolidate_checkpoint.py (for fairseq-generate "
            f"or one process), or reshard it to this number of processes with --world-size")
    return state_dict if out is None else out


# ---------------------------------------------------------------------------------------- trainer hooks
def _ep(trainer) -> Optional[ExpertParallel]:
    return getattr(trainer.get_model(), "expert_parallel", None)


def _innermost(optimizer):
    """The FairseqOptimizer whose ``params`` clip_grad_norm_ sees (fp16/amp wrappers hold one inside)."""
    for attr in ("fp32_optimizer", "wrapped_optimizer"):
        if hasattr(optimizer, attr):
            return _innermost(getattr(optimizer, attr))
    return optimizer


def _optimizer_param_names(trainer) -> List[str]:
    """Names of the parameters in the optimizer's order (fairseq builds it from model then criterion)."""
    names = {id(p): n for n, p in trainer.get_model().named_parameters()}
    names.update({id(p): "criterion." + n for n, p in trainer.get_criterion().named_parameters()})
    return [names[id(p)] for p in chain(trainer.get_model().parameters(), trainer.get_criterion().parameters())
            if p.requires_grad]


_orig = {name: getattr(Trainer, name) for name in (
    "should_save_checkpoint_on_current_rank", "checkpoint_suffix", "save_checkpoint", "load_checkpoint",
    "clip_grad_norm")}


def main_checkpoint_suffix(trainer) -> str:
    """fairseq's checkpoint suffix of this process, without the expert-parallel shard suffix: the suffix of
    the main checkpoint file that every process loads."""
    return _orig["checkpoint_suffix"].fget(trainer)


def _should_save_checkpoint_on_current_rank(self) -> bool:
    return True if _ep(self) else _orig["should_save_checkpoint_on_current_rank"].fget(self)


def _checkpoint_suffix(self) -> str:
    suffix, ep = _orig["checkpoint_suffix"].fget(self), _ep(self)
    return suffix + sc.shard_suffix(ep.rank) if ep and ep.rank > 0 else suffix


def _save_checkpoint(self, filename, extra_state):
    ep = _ep(self)
    if ep is None:
        return _orig["save_checkpoint"](self, filename, extra_state)
    if os.path.basename(filename) == "crash.pt":  # written by one failing process: no collectives here
        return _orig["save_checkpoint"](self, filename, extra_state) if ep.rank == 0 else None
    token = [uuid.uuid4().hex if ep.rank == 0 else None]
    dist.broadcast_object_list(token, src=0, group=ep.group)
    experts = expert_parameters(self.get_model())
    names = _optimizer_param_names(self)
    meta = sc.expert_meta(list(experts), names, token[0], ep.world_size, ep.rank, self.get_num_updates())
    if ep.rank > 0:
        optimizer = None
        if not self.cfg.checkpoint.no_save_optimizer_state:
            state = self.optimizer.state_dict()["state"]
            optimizer = {n: state[i] for i, n in enumerate(names) if n in experts and i in state}
        shard = {sc.META: meta, "model": {k: p.detach() for k, (p, _, _) in experts.items()}, "optimizer": optimizer}
        logger.info(f"Saving the experts of process {ep.rank} to {os.path.abspath(filename)}")
        sc.atomic_save(_to_cpu(shard), filename)
        dist.barrier(group=ep.group)
        return os.path.abspath(filename)
    dist.barrier(group=ep.group)  # every shard is on disk before the main file, which commits the save
    return _orig["save_checkpoint"](self, filename, dict(extra_state, **{sc.META: meta}))


def _load_checkpoint(self, filename, reset_optimizer=False, *args, **kwargs):
    ep = _ep(self)
    if ep is None:
        return _orig["load_checkpoint"](self, filename, reset_optimizer, *args, **kwargs)
    # every process opens the main file's name (fairseq gave process r its own suffix): they must all agree
    # on whether it exists, since process 0 then broadcasts it to the others
    main = sc.main_path_of(filename, ep.rank)
    extra_state = _orig["load_checkpoint"](self, main, reset_optimizer, *args, **kwargs)
    if extra_state is None:
        return None
    meta = extra_state.get(sc.META)
    names = _optimizer_param_names(self)
    experts = expert_parameters(self.get_model())
    restore_optimizer = not reset_optimizer  # fairseq loaded process 0's optimizer state (if it was saved)
    if meta is not None and meta["world_size"] == ep.world_size:
        if ep.rank > 0:
            shard = sc.find_shard(main, ep.rank, meta["token"])
            with torch.no_grad():
                for key, (p, _, _) in experts.items():
                    p.copy_(shard["model"][key])
            if restore_optimizer and shard.get("optimizer") is not None:
                _update_optimizer_state(self, names, lambda name, st: shard["optimizer"].get(name, st))
    elif restore_optimizer:  # a checkpoint of all experts: the model was sliced on load, now the optimizer
        def sliced(name, st):
            _, E, local = experts[name]
            return {f: v[local.start:local.stop] if sc._per_expert(v, E) else v for f, v in st.items()}
        _update_optimizer_state(self, names, sliced)
    return extra_state


def _update_optimizer_state(trainer, names, new_state) -> None:
    experts = expert_parameters(trainer.get_model())
    sd = trainer.optimizer.state_dict()
    for i, name in enumerate(names):
        if name in experts and i in sd["state"]:
            sd["state"][i] = new_state(name, sd["state"][i])
    trainer.optimizer.load_state_dict(sd)


def _clip_grad_norm(self, clip_norm):
    ep = _ep(self)
    if ep is None:
        return _orig["clip_grad_norm"](self, clip_norm)
    inner = _innermost(self.optimizer)

    def with_all_experts(shared_norm: torch.Tensor) -> torch.Tensor:
        sq = shared_norm.new_zeros((), dtype=torch.float32)
        for p in inner.params:
            if hasattr(p, "expert") and p.grad is not None:
                sq = sq + p.grad.detach().float().pow(2).sum().to(sq.device)
        dist.all_reduce(sq, group=ep.group)
        return (shared_norm.float() ** 2 + sq) ** 0.5

    return self.optimizer.clip_grad_norm(clip_norm, aggregate_norm_fn=with_all_experts)


def _to_cpu(obj):
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _atomic_copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
    """fairseq writes checkpoint_N.pt atomically but then copies it over checkpoint_last.pt in place: a run
    killed during that copy would lose checkpoint_last.pt. Copy to a temporary file and rename instead."""
    if file_io.IOPathManager or not overwrite and os.path.exists(dst_path):
        return _orig_copy(src_path, dst_path, overwrite)
    sc.atomic_copy(src_path, dst_path)
    return True


_orig_copy = file_io.PathManager.copy


def install_trainer_hooks() -> None:
    if getattr(Trainer.save_checkpoint, "__name__", "") == _save_checkpoint.__name__:
        return
    Trainer.should_save_checkpoint_on_current_rank = property(_should_save_checkpoint_on_current_rank)
    Trainer.checkpoint_suffix = property(_checkpoint_suffix)
    Trainer.save_checkpoint = _save_checkpoint
    Trainer.load_checkpoint = _load_checkpoint
    Trainer.clip_grad_norm = _clip_grad_norm
    file_io.PathManager.copy = staticmethod(_atomic_copy)
