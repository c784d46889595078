"""Inputs that fairseq would silently misuse or fail on without naming the file: the checks, as plain functions.

* Starting from scratch next to checkpoints. fairseq resumes from SAVE_DIR/checkpoint_last.pt; when that file is
  missing (deleted, lost), it trains from scratch in the same directory and its first validation overwrites
  checkpoint_best.pt with a worse model. We refuse to start when the save dir holds checkpoint*.pt files but
  no checkpoint_last.pt, and when --restore-file names a file that does not exist (fairseq starts from scratch
  then too), and say how to resume. Fresh runs in an empty save dir, --no-save, --finetune-from-model and
  --continue-once are left alone.
* Unreadable checkpoints. A zero-byte, truncated or corrupt file makes torch.load fail with a bare EOFError, a
  zip reader error or a weights_only error that names no file (fairseq-train, -generate, -interactive, the hub
  interface, the scripts): we name the file and the newest intact checkpoint next to it, and a pickled global that
  no fairseq checkpoint holds.
* Model options that do not fit the checkpoint. Resuming (or --restore-file, --finetune-from-model) with other
  options that shape the model, or fairseq-generate's --model-overrides (the hub's keyword arguments) that change
  them, fails deep in load_state_dict: we compare the checkpoint's saved options with the given ones first and
  name every option that differs.
* A checkpoint write that fails (a full disk): named, with the last good checkpoint, which is intact.
* Empty data. An empty split binarizes to a zero-byte .bin file, which fairseq fails to load with "cannot mmap
  an empty file": we name the file.

fairseq calls them through patches (patches/fresh_start.py, unreadable_checkpoint.py, failed_checkpoint_save.py,
atomic_checkpoint_copy.py, empty_data.py). Errors are ConfigError: the commands print them as one line
(patches/one_line_errors.py).
"""

import argparse
import contextlib
import dataclasses
import glob
import os
import pickle
import re
import shutil
from contextvars import ContextVar
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .modules.config import ConfigError
from .sharded_checkpoint import is_shard_path

DEFAULT_RESTORE_FILE = "checkpoint_last.pt"  # fairseq's default: "resume from SAVE_DIR/checkpoint_last.pt"


# ------------------------------------------------------------------------------------------------ checkpoints
def checkpoint_files(save_dir: str) -> List[str]:
    """The checkpoint*.pt files of a directory (expert-parallel shards included), newest first."""
    files = [p for p in glob.glob(os.path.join(glob.escape(save_dir), "checkpoint*.pt")) if os.path.isfile(p)]
    return sorted(files, key=os.path.getmtime, reverse=True)


def newest_intact_checkpoint(directory: str, besides: str = "") -> Optional[str]:
    """The newest non-empty main checkpoint file of ``directory`` other than ``besides``, or None."""
    for path in checkpoint_files(directory):
        if not is_shard_path(path) and os.path.getsize(path) > 0 and not _same_file(path, besides):
            return path
    return None


def _same_file(a: str, b: str) -> bool:
    return bool(b) and os.path.abspath(a) == os.path.abspath(b)


def refuse_start_from_scratch(cfg, suffix: str = "") -> None:
    """Raise ConfigError when fairseq-train, given its checkpoint config ``cfg``, would start from scratch
    although there are checkpoints it should resume from. ``suffix``: fairseq's checkpoint suffix."""
    if cfg.finetune_from_model or getattr(cfg, "continue_once", None):
        return
    if cfg.restore_file != DEFAULT_RESTORE_FILE:
        path = cfg.restore_file.replace(".pt", suffix + ".pt")
        if not os.path.isfile(path):
            raise ConfigError(
                f"--restore-file {cfg.restore_file}: no such file ({os.path.abspath(path)}); "
                f"fairseq would start from scratch"
            )
        return
    if cfg.no_save:  # nothing will be overwritten
        return
    last = os.path.join(cfg.save_dir, f"checkpoint_last{suffix}.pt")
    found = checkpoint_files(cfg.save_dir)
    if os.path.exists(last) or not found:
        return
    names = ", ".join(os.path.basename(p) for p in found[:3]) + (", ..." if len(found) > 3 else "")
    newest = newest_intact_checkpoint(cfg.save_dir)
    resume = (
        f"To continue from the newest, add --restore-file {newest} to this run only (later runs resume "
        f"from the checkpoint_last.pt it writes), or copy it to {last}."
        if newest
        else "None of them is an intact checkpoint (all are empty or expert shards)."
    )
    raise ConfigError(
        f"--save-dir {cfg.save_dir}: holds {len(found)} checkpoint file(s) ({names}) but no "
        f"{os.path.basename(last)}, so fairseq would start from scratch and overwrite them "
        f"(checkpoint_best.pt at the first validation). {resume} To start a new run, use "
        f"another --save-dir."
    )


def unreadable_checkpoint(path: str, why: str) -> ConfigError:
    """The error for a checkpoint ``path`` that torch.load cannot read (``why``)."""
    newest = newest_intact_checkpoint(os.path.dirname(path) or ".", besides=path)
    other = (
        f"the newest intact checkpoint next to it is {newest} (fairseq-train: --restore-file {newest}; "
        f"fairseq-generate/-interactive: --path {newest})"
        if newest
        else "there is no intact checkpoint next to it"
    )
    return ConfigError(
        f"{path}: {why}, not a readable checkpoint (a save cut short, e.g. by a full disk, or a damaged copy). "
        f"Delete it; {other}"
    )


# the files of torch.load's frames: an exception raised in them is about the file (see torch_load_error)
_TORCH_LOAD_FILES = {os.path.abspath(m.__file__) for m in (torch.serialization, torch._weights_only_unpickler)}


def _raised_in_torch_load(error: BaseException) -> bool:
    tb = error.__traceback__
    while tb is not None:
        if os.path.abspath(tb.tb_frame.f_code.co_filename) in _TORCH_LOAD_FILES:
            return True
        tb = tb.tb_next
    return False


def refuse_unreadable_file(path: str) -> None:
    """Before torch.load reads ``path``: a directory, an empty file, a file that torch.save did not write."""
    if os.path.isdir(path):
        inside = newest_intact_checkpoint(path)
        raise ConfigError(
            f"{path}: a directory, not a checkpoint file"
            + (f" (its newest checkpoint is {inside})" if inside else " (it holds no checkpoint*.pt file)")
        )
    if not os.path.isfile(path):
        return  # missing, or remote: the caller's own error
    if os.path.getsize(path) == 0:
        raise unreadable_checkpoint(path, "empty file (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(2)
    if head != b"PK" and head[:1] != b"\x80":  # torch.save writes a zip archive or (legacy) a pickle
        raise ConfigError(f"{path}: not a checkpoint (neither of the file formats torch.save writes)")


def torch_load_error(path: str, error: BaseException) -> Optional[ConfigError]:
    """The one-line error for an exception that torch.load raised reading ``path`` (a truncated or corrupt file:
    EOFError, the zip reader's RuntimeError, the weights_only unpickler's UnpicklingError, or whatever a flipped
    byte makes the unpickler raise), or None for one raised elsewhere (a bug keeps its traceback)."""
    if isinstance(error, MemoryError) or not _raised_in_torch_load(error):
        return None
    text = str(error)
    found = re.search(r"GLOBAL (\S+)", text) if isinstance(error, pickle.UnpicklingError) else None
    if found:  # torch refused a global before running it: name it (a file of another program, or a malicious one)
        return ConfigError(
            f"{path}: refused, not loaded: it pickles {found.group(1)}, which no fairseq checkpoint holds "
            f"(torch's weights_only unpickler stopped before running anything)"
        )
    if isinstance(error, EOFError):
        return unreadable_checkpoint(path, "truncated (torch.load: EOFError)")
    detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\s*\n|$)", text, re.S)  # below torch's advice
    detail = " ".join((detail.group(1) if detail else text.strip().split("\n")[0]).split())[:200]
    kind = "" if type(error) is RuntimeError else f"{type(error).__name__}: "  # the zip reader names itself
    return unreadable_checkpoint(path, f"truncated or corrupt (torch.load: {kind}{detail})")


def load_checkpoint_file(path: str, load: Callable[[str], dict]) -> dict:
    """``load(path)`` (torch.load, or fairseq's loader around it), with every unreadable file named in one line."""
    refuse_unreadable_file(path)
    try:
        return load(path)
    except ConfigError:
        raise
    except Exception as e:
        error = torch_load_error(path, e)
        if error is None:
            raise
        raise error from e


def refuse_missing_checkpoint(path: str) -> None:
    """fairseq-generate, -interactive and the hub interface: a --path (checkpoint file) that does not exist."""
    if os.path.exists(path):
        return
    directory = os.path.dirname(path) or "."
    newest = newest_intact_checkpoint(directory) if os.path.isdir(directory) else None
    raise ConfigError(
        f"{path}: no such checkpoint file"
        + (f" (the newest checkpoint in {directory} is {newest})" if newest else f" (no checkpoint*.pt in {directory})")
    )


# ----------------------------------------------------------------------------------- model options of a checkpoint
# Every option of MoEConfig and MoEPlacement is compared between a checkpoint and the run that loads it (so that
# options added later are too), except these, which may change on resume: none of them makes or shapes a parameter.
MAY_CHANGE_ON_RESUME: Dict[str, str] = {
    "moe_top_k": "how many of the same experts a token goes to",
    "moe_clusters": "which experts form a cluster (blocks of the same experts); the cluster-dropout mask is redrawn",
    "moe_gate": "how the chosen experts' outputs are weighted",
    "moe_router_temperature": "only the start of the cosine router's learned temperature, which the checkpoint holds",
    "moe_loss_temperature": "the temperature of the probabilities that the losses see",
    "moe_capacity_factor": "how many tokens an expert takes in training",
    "moe_eval_capacity_factor": "how many tokens an expert takes in validation and generation",
    "moe_jitter_eps": "noise on the router input in training",
    "cluster_dropout": "the cluster-dropout mask, redrawn on resume for the current settings",
    "cluster_dropout_interval": "the cluster-dropout mask, redrawn on resume for the current settings",
    "moe_seed": "the cluster-dropout mask, redrawn on resume for the current settings",
    "cluster_dropout_reroute": "where the tokens of a dropped expert go",
    "moe_cluster_loss": "a training loss",
    "moe_cluster_loss_norm": "the scale of the cluster loss",
    "moe_expert_parallel": "how the same experts are split over processes (checkpoints are resliced on load)",
    "moe_expert_placement": "how the same experts are split over processes (checkpoints are resliced on load)",
}
# fairseq's options that decide which parameters a transformer has and their shapes (or, for the heads, how the
# attention weights are read)
FAIRSEQ_SHAPE_OPTIONS = (
    "encoder_embed_dim",
    "encoder_ffn_embed_dim",
    "encoder_layers",
    "encoder_attention_heads",
    "encoder_normalize_before",
    "encoder_learned_pos",
    "decoder_embed_dim",
    "decoder_ffn_embed_dim",
    "decoder_layers",
    "decoder_attention_heads",
    "decoder_normalize_before",
    "decoder_learned_pos",
    "decoder_input_dim",
    "decoder_output_dim",
    "share_all_embeddings",
    "share_decoder_input_output_embed",
    "no_token_positional_embeddings",
    "layernorm_embedding",
    "no_decoder_final_norm",
    "no_cross_attention",
    "cross_self_attention",
    "adaptive_input",
    "adaptive_softmax_cutoff",
)
_PLACEMENT = ("moe_encoder_layers", "moe_decoder_layers", "moe_every")  # compared as the layers they choose
_MISSING = object()
_MOEC_MODEL = "moec_transformer"


def _moe_fields() -> List[dataclasses.Field]:
    from .models.options import MoEPlacement  # the model glue imports fairseq: late
    from .modules.config import MoEConfig

    return [*dataclasses.fields(MoEPlacement), *dataclasses.fields(MoEConfig)]


def compared_options() -> List[str]:
    """The model options that a checkpoint and the run that loads it must agree on."""
    moe = [f.name for f in _moe_fields() if f.name not in MAY_CHANGE_ON_RESUME]
    return [*moe, *FAIRSEQ_SHAPE_OPTIONS]


def _get(cfg, name: str, default=_MISSING):
    """``cfg.name`` of an argparse Namespace or an omegaconf DictConfig (fairseq-hydra-train), as plain values."""
    try:
        value = getattr(cfg, name)
    except Exception:  # noqa: BLE001  (omegaconf: a missing key, or a missing value '???')
        return default
    if hasattr(value, "_is_missing"):  # an omegaconf ListConfig or DictConfig
        from omegaconf import OmegaConf

        value = OmegaConf.to_container(value, resolve=True)
    return value


def _arch(cfg) -> Optional[str]:
    return _get(cfg, "arch", None) or _get(cfg, "_name", None)


def _model_name(arch: Optional[str]) -> Optional[str]:
    from fairseq.models import ARCH_MODEL_NAME_REGISTRY

    return ARCH_MODEL_NAME_REGISTRY.get(arch, arch)


def _moe_layers(cfg, side: str):
    """The MoE layers of one side as the flag spells them ('1,3'; '' for none), from the lists or --moe-every."""
    from .models.options import moe_layer_indices

    args = SimpleNamespace(
        moe_every=_get(cfg, "moe_every", 0),
        moe_encoder_layers=_get(cfg, "moe_encoder_layers", ""),
        moe_decoder_layers=_get(cfg, "moe_decoder_layers", ""),
        **{f"{side}_layers": _get(cfg, f"{side}_layers", None)},
    )
    try:
        return ",".join(str(i) for i in moe_layer_indices(args, side))
    except (ConfigError, TypeError):  # not a valid placement (nor comparable as one): as written
        return getattr(args, f"moe_{side}_layers")


def _shown(value) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    return "''" if value == "" else str(value)


def _same(a, b) -> bool:
    """Equal, also where one side is the string a parser left (fairseq parses some sizes as str: '64' and 64)."""
    if a == b:
        return True
    if isinstance(a, str) == isinstance(b, str) or isinstance(a, bool) or isinstance(b, bool):
        return False
    text, other = (a, b) if isinstance(a, str) else (b, a)
    try:
        return other is not None and type(other)(text) == other
    except (TypeError, ValueError):
        return False


def model_option_differences(saved, given) -> List[Tuple[str, str, str]]:
    """(--flag, the checkpoint's value, the given value) for every option that shapes the model and differs
    between ``saved`` (a checkpoint's cfg.model) and ``given``. A MoE option missing from a checkpoint of an older
    version of the plugin has its default there (what that version computed); a fairseq option missing on either
    side is not compared."""
    out = []
    saved_arch, given_arch = _arch(saved), _arch(given)
    saved_model, given_model = _model_name(saved_arch), _model_name(given_arch)
    moe = _MOEC_MODEL in (saved_model, given_model)
    if saved_model and given_model and saved_model != given_model:
        upcycle = "; python -m fairseq_moec.upcycle makes a MoEC model of it" if saved_model == "transformer" else ""
        out.append(
            ("--arch", f"{saved_arch} (a {saved_model} model{upcycle})", f"{given_arch} (a {given_model} model)")
        )
        moe = False
    pairs = []
    if moe:
        pairs += [
            (f"moe_{side}_layers", _moe_layers(saved, side), _moe_layers(given, side))
            for side in ("encoder", "decoder")
        ]
        for f in _moe_fields():
            if f.name not in MAY_CHANGE_ON_RESUME and f.name not in _PLACEMENT:
                pairs.append((f.name, _get(saved, f.name, f.default), _get(given, f.name, f.default)))
    pairs += [(name, _get(saved, name), _get(given, name)) for name in FAIRSEQ_SHAPE_OPTIONS]
    for name, a, b in pairs:
        if a is not _MISSING and b is not _MISSING and not _same(a, b):
            out.append(("--" + name.replace("_", "-"), _shown(a), _shown(b)))
    return out


def _listed(differences) -> str:
    return "; ".join(f"{flag}: checkpoint {a}, given {b}" for flag, a, b in differences)


_TRAINING_MODEL: ContextVar = ContextVar("training_model_options", default=None)


@contextlib.contextmanager
def loading_to_train(model_cfg):
    """While fairseq-train loads the checkpoint it resumes or starts from, the run's model options (``cfg.model``),
    which refuse_other_model_options compares with the checkpoint's."""
    token = _TRAINING_MODEL.set(model_cfg)
    try:
        yield
    finally:
        _TRAINING_MODEL.reset(token)


def split_model_overrides(overrides: Optional[dict]) -> Tuple[dict, Optional[dict]]:
    """fairseq-generate's --model-overrides (the hub's keyword arguments): (those that set a compared model option,
    the others, which fairseq applies as before)."""
    if not overrides:
        return {}, overrides
    compared = set(compared_options())
    return {k: v for k, v in overrides.items() if k in compared}, {
        k: v for k, v in overrides.items() if k not in compared
    }


def _namespace(cfg) -> argparse.Namespace:
    if isinstance(cfg, argparse.Namespace):
        return argparse.Namespace(**vars(cfg))
    from omegaconf import OmegaConf

    return argparse.Namespace(**OmegaConf.to_container(cfg, resolve=False))


def refuse_other_model_options(path: str, state: dict, overrides: Optional[dict] = None) -> None:
    """Raise ConfigError naming every option that shapes the model and differs between the checkpoint ``state``
    read from ``path`` and the options given: the training run's (inside ``loading_to_train``), and ``overrides``
    (from split_model_overrides: model options set by --model-overrides or the hub's keyword arguments, which
    fairseq would apply to the checkpoint's options and then fail to load the weights into)."""
    saved = (state.get("cfg") or {}).get("model") if isinstance(state, dict) else None
    if saved is None:
        return
    if overrides:
        given = _namespace(saved)
        for k, v in overrides.items():
            setattr(given, k, v)
        differences = model_option_differences(saved, given)
        if differences:
            raise ConfigError(
                f"{path}: the model options given for it (--model-overrides, or from_pretrained's keyword "
                f"arguments) do not fit the checkpoint: {_listed(differences)}. The model is built from the "
                f"checkpoint's own options; only those that shape no parameter may be overridden (docs/method.md)"
            )
    training = _TRAINING_MODEL.get()
    if training is not None:
        differences = model_option_differences(saved, training)
        if differences:
            raise ConfigError(
                f"{path}: the checkpoint was trained with other model options than this run's: "
                f"{_listed(differences)}. Continue it with the checkpoint's values, or train the new model in "
                f"another --save-dir (the options that may change on resume: docs/method.md)"
            )


def parameters_do_not_fit(model_state: dict, checkpoint_state: dict) -> ConfigError:
    """The error for a checkpoint whose weights do not load into a model built with the same model options: most
    often the dictionaries (another data directory)."""
    sizes = [
        (k, tuple(v.shape), tuple(model_state[k].shape))
        for k, v in checkpoint_state.items()
        if k in model_state and hasattr(v, "shape") and tuple(v.shape) != tuple(model_state[k].shape)
    ]
    embeddings = [s for s in sizes if s[0].endswith(("embed_tokens.weight", "output_projection.weight"))]
    if embeddings:
        k, a, b = embeddings[0]
        return ConfigError(
            f"the dictionaries differ: the checkpoint's {k} has {a[0]} entries, this model's {b[0]} (from the "
            f"data directory's dict.*.txt). Use the data directory (its dict.*.txt) that the checkpoint was "
            f"trained with"
        )
    missing = [k for k in model_state if k not in checkpoint_state]
    unexpected = [k for k in checkpoint_state if k not in model_state]
    found = [f"{k}: checkpoint {list(a)}, model {list(b)}" for k, a, b in sizes]
    found += [f"{k} missing from the checkpoint" for k in missing] + [f"{k} not in the model" for k in unexpected]
    more = f" and {len(found) - 3} more" if len(found) > 3 else ""
    return ConfigError(
        f"the checkpoint's parameters do not fit this model ({'; '.join(found[:3])}{more}): it was trained with "
        f"other model options"
    )


# ------------------------------------------------------------------------------------------- checkpoint writes
def error_in_chain(error: Optional[BaseException], kind: type) -> Optional[BaseException]:
    """The first exception of type KIND that ERROR is or was raised from (``__cause__``/``__context__``), if any."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, kind):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def checkpoint_not_written(path: str, error: BaseException) -> Optional[ConfigError]:
    """The error for a checkpoint write of ``path`` that failed with ``error`` for want of space (or another I/O
    error: torch's zip writer reports them as a RuntimeError), or None for an error of another kind. The caller
    has removed the partial file; the file being replaced, and every other, is as before the save."""
    os_error = error_in_chain(error, OSError)
    writer = isinstance(error, RuntimeError) and re.search(r"PytorchStreamWriter|inline_container|iostream", str(error))
    if os_error is None and not writer:
        return None
    if os_error is not None:
        reason = f"[Errno {os_error.errno}] {os_error.strerror}" if os_error.errno else str(os_error)
    else:
        reason = str(error).strip().split("\n")[0]
    directory = os.path.dirname(os.path.abspath(path))
    try:
        free = f"{shutil.disk_usage(directory).free / 2**20:.1f} MiB free in {directory}"
    except OSError:
        free = f"{directory}: free space unknown"
    suffix = re.match(r"checkpoint(?:_last|_best|\d+|_\d+_\d+)(.*)\.pt$", os.path.basename(path))
    last = os.path.join(directory, f"checkpoint_last{suffix.group(1) if suffix else ''}.pt")
    if os.path.isfile(last) and os.path.getsize(last) > 0:
        intact = f"The last good checkpoint, {last}, is intact: free some space and run the same command to resume"
    else:
        newest = newest_intact_checkpoint(directory, besides=path)
        intact = (
            f"The last good checkpoint, {newest}, is intact: free some space and resume with --restore-file {newest}"
            if newest
            else "No checkpoint had been saved there before: free some space and start again"
        )
    return ConfigError(f"{path}: could not be written ({reason}; {free}); the partial file was removed. {intact}")


# ------------------------------------------------------------------------------------------------------ data
def refuse_empty_data(path: str, combine: bool = False) -> None:
    """Raise ConfigError if a binarized dataset ``path`` (e.g. data-bin/train.es-en.es; with ``combine`` also
    its shards path1, path2, ...) has a zero-byte .bin file."""
    k = 0
    while True:
        path_k = path + (str(k) if k > 0 else "")
        bin_file = path_k + ".bin"
        if not os.path.isfile(bin_file):
            return
        if os.path.getsize(bin_file) == 0:
            split = os.path.basename(path).split(".")[0]
            raise ConfigError(
                f"{bin_file}: empty data file (no sentences): the '{split}' split was binarized "
                f"from an empty text file. Re-run fairseq-preprocess with its data "
                f"(--trainpref/--validpref/--testpref), or use another data directory"
            )
        if not combine:
            return
        k += 1
