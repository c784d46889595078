"""Teach fairseq's Trainer expert parallelism: gradients, gradient norm and per-process checkpoints.

Upstream behaviour (fairseq-fixed 0.12.3.1): ``fairseq.trainer.Trainer`` knows only data parallelism, in which
every process holds the same parameters. With W > 1 processes and ``--moe-expert-parallel auto`` each process
holds E/W experts of every MoE layer (the model side is set up by fairseq_moec/expert_parallel.py; the tokens move
in modules/expert_parallel.py). What the Trainer has to do differently:

* Refusals (``__init__``). The fairseq options that cannot work with split experts (expert_parallel.
  refuse_unsupported) are checked here, before anything is trained: the Trainer is the first place that has the
  full config under both entry points (fairseq-hydra-train gives build_model the model's options only).
* Gradients. An expert's gradient already holds the contributions of every process's tokens (they came back
  through the all_to_all), and DDP leaves expert parameters alone (expert_parallel.prepare_for_expert_parallel).
* Gradient norm (``Trainer.clip_grad_norm``). fairseq's clip_grad_norm_ leaves parameters with ``expert`` out of
  the norm (which is then the same on every process) and clips them with the same factor; we add the experts of
  all processes to the norm, so --clip-norm and the logged gnorm mean what they mean on one process.
* Checkpoints (``should_save_checkpoint_on_current_rank``, ``checkpoint_suffix``, ``save_checkpoint``,
  ``load_checkpoint``). fairseq saves on process 0 only, which holds only its own experts. Every process saves
  (sharded_checkpoint.py says what goes where); resume loads the main file on process 0 and broadcasts it as
  fairseq does (shared parameters, cluster-dropout state, optimizer and training state), then each process
  r > 0 puts back its own experts and their optimizer state. A checkpoint of a different process count (e.g. a
  consolidated one) is sliced to this process's experts.

Everything here is a no-op for single-process runs and for ``--moe-expert-parallel off``.
"""

import logging
import os
import uuid
from itertools import chain
from typing import List, Optional

import torch
import torch.distributed as dist
from fairseq.optim import FairseqOptimizer
from fairseq.trainer import Trainer

from .. import sharded_checkpoint as sc
from ..expert_parallel import expert_parameters, refuse_unsupported
from ..modules import ExpertParallel
from .target import Patch

logger = logging.getLogger(__name__)

PATCH = Patch(
    "expert_parallel_trainer",
    "expert-parallel runs save only process 0's experts, misreport the gradient norm and start with fairseq options "
    "that break them",
)

fairseq_trainer = {}  # the Trainer's own properties and methods, kept by apply()


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
    return [
        names[id(p)]
        for p in chain(trainer.get_model().parameters(), trainer.get_criterion().parameters())
        if p.requires_grad
    ]


def _init(self, cfg, task, model, criterion, quantizer=None):
    ep = getattr(model, "expert_parallel", None)  # set by build_model (expert_parallel.prepare_for_expert_parallel)
    if ep is not None:
        refuse_unsupported(cfg, ep.world_size)
    fairseq_trainer["__init__"](self, cfg, task, model, criterion, quantizer)


def _should_save_checkpoint_on_current_rank(self) -> bool:
    return True if _ep(self) else fairseq_trainer["should_save_checkpoint_on_current_rank"].fget(self)


def _checkpoint_suffix(self) -> str:
    suffix, ep = fairseq_trainer["checkpoint_suffix"].fget(self), _ep(self)
    return suffix + sc.shard_suffix(ep.rank) if ep and ep.rank > 0 else suffix


def _save_checkpoint(self, filename, extra_state):
    ep = _ep(self)
    if ep is None:
        return fairseq_trainer["save_checkpoint"](self, filename, extra_state)
    if os.path.basename(filename) == "crash.pt":  # written by one failing process: no collectives here
        return fairseq_trainer["save_checkpoint"](self, filename, extra_state) if ep.rank == 0 else None
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
    return fairseq_trainer["save_checkpoint"](self, filename, dict(extra_state, **{sc.META: meta}))


def _load_checkpoint(self, filename, reset_optimizer=False, *args, **kwargs):
    ep = _ep(self)
    if ep is None:
        return fairseq_trainer["load_checkpoint"](self, filename, reset_optimizer, *args, **kwargs)
    # every process opens the main file's name (fairseq gave process r its own suffix): they must all agree
    # on whether it exists, since process 0 then broadcasts it to the others
    main = sc.main_path_of(filename, ep.rank)
    extra_state = fairseq_trainer["load_checkpoint"](self, main, reset_optimizer, *args, **kwargs)
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
            return {f: v[local.start : local.stop] if sc._per_expert(v, E) else v for f, v in st.items()}

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
        return fairseq_trainer["clip_grad_norm"](self, clip_norm)
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


def installed() -> bool:
    return PATCH.installed(Trainer, "save_checkpoint")


def check() -> None:
    PATCH.expect_fairseq()
    where = "fairseq.trainer.Trainer"
    for name in ("should_save_checkpoint_on_current_rank", "checkpoint_suffix"):
        if not isinstance(Trainer.__dict__.get(name), property):
            raise PATCH.refuse(f"{where}.{name} as a property", repr(Trainer.__dict__.get(name)))
        PATCH.expect_parameters(Trainer, name, where, ["self"])
    PATCH.expect_parameters(Trainer, "__init__", where, ["self", "cfg", "task", "model", "criterion", "quantizer"])
    PATCH.expect_parameters(Trainer, "save_checkpoint", where, ["self", "filename", "extra_state"])
    PATCH.expect_parameters(
        Trainer,
        "load_checkpoint",
        where,
        ["self", "filename", "reset_optimizer", "reset_lr_scheduler", "optimizer_overrides", "reset_meters"],
    )
    PATCH.expect_parameters(Trainer, "clip_grad_norm", where, ["self", "clip_norm"])
    PATCH.expect_parameters(
        FairseqOptimizer, "clip_grad_norm", "fairseq.optim.FairseqOptimizer", ["self", "max_norm", "aggregate_norm_fn"]
    )


def apply() -> None:
    fairseq_trainer.update(
        {
            name: getattr(Trainer, name)
            for name in (
                "__init__",
                "should_save_checkpoint_on_current_rank",
                "checkpoint_suffix",
                "save_checkpoint",
                "load_checkpoint",
                "clip_grad_norm",
            )
        }
    )
    PATCH.replace(Trainer, "__init__", _init)
    PATCH.replace(Trainer, "should_save_checkpoint_on_current_rank", property(_should_save_checkpoint_on_current_rank))
    PATCH.replace(Trainer, "checkpoint_suffix", property(_checkpoint_suffix))
    PATCH.replace(Trainer, "load_checkpoint", _load_checkpoint)
    PATCH.replace(Trainer, "clip_grad_norm", _clip_grad_norm)
    PATCH.replace(Trainer, "save_checkpoint", _save_checkpoint)  # last: installed() looks at it
    PATCH.log(
        "replaced fairseq.trainer.Trainer.__init__ (refusals), should_save_checkpoint_on_current_rank, "
        "checkpoint_suffix, save_checkpoint, load_checkpoint and clip_grad_norm (expert parallelism)"
    )
