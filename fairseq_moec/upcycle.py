"""Upcycle a dense fairseq translation Transformer into a MoEC model (sparse upcycling, Komatsuzaki et al. 2023).

    python -m fairseq_moec.upcycle DENSE.pt OUT.pt --moe-expert-count 32 --moe-clusters 4 \\
        --moe-encoder-layers 1 --moe-decoder-layers 1 [any other MoE model option] \\
        [--router-init random|zeros] [--expert-noise STD] [--seed S]

DENSE.pt: a checkpoint of fairseq's ``transformer*`` architectures (task ``translation`` or ``translation_moec``).
OUT.pt, a new file (an existing one is refused): a ``moec_transformer`` checkpoint whose chosen encoder and
decoder FFN blocks are MoE layers of E experts in G clusters, each expert a copy of that layer's dense FFN
(fairseq_moec/modules/upcycling.py); every other weight is copied unchanged. The MoE options are the model's own
(fairseq_moec/modules/config.py, models/options.py: same flags, defaults and refusals). The checkpoint holds no
optimizer or training state (update 0), and its task is ``translation_moec``. The command prints the model flags
that ``fairseq-train --restore-file OUT.pt --reset-optimizer --reset-lr-scheduler --reset-meters
--reset-dataloader`` needs to rebuild this model; fairseq-generate and the hub interface read them from OUT.pt.

fairseq builds the MoEC model here exactly as it will when loading OUT.pt (placeholder dictionaries of the
checkpoint's vocabulary sizes), and every weight of DENSE.pt must find its place in it. Bad input ends the command
with one line naming the problem (exit status 2).
"""

import argparse
import copy
import dataclasses
import errno
import os
import pickle
import re
import shlex
import sys
import tempfile
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence

import torch
from fairseq import checkpoint_utils, models
from fairseq.data import Dictionary
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_NAME_REGISTRY
from omegaconf import OmegaConf

from .input_checks import unreadable_checkpoint
from .models.moec_transformer import MoECTransformerModel, MoEFFNSlot
from .models.options import MoEPlacement, add_dataclass_args, fill_defaults, moe_layer_indices, validate
from .modules.config import ACTIVATIONS, ConfigError, MoEConfig
from .modules.upcycling import ROUTER_INITS, upcycle_moe_layer

MOEC_ARCH = "moec_transformer"  # every shape option is copied from the dense model, so one arch fits all
DENSE_MODEL = "transformer"  # fairseq's model name of the transformer* architectures
TASKS = {"translation": "translation_moec", "translation_moec": "translation_moec"}
CRITERIA = {"label_smoothed_cross_entropy": "moec_label_smoothed_cross_entropy"}  # same options plus the MoE ones
RESETS = ["--reset-optimizer", "--reset-lr-scheduler", "--reset-meters", "--reset-dataloader"]


# ------------------------------------------------------------------------------------------------ the dense input
def read_dense_checkpoint(path: str) -> dict:
    """fairseq's loading of ``path`` (torch's weights_only unpickler, the plugin's allowlist), or ConfigError."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(2)
    if head and head != b"PK" and head[:1] != b"\x80":  # torch.save writes a zip archive or (legacy) a pickle
        raise ConfigError(f"{path}: not a checkpoint: neither of the file formats torch.save writes")
    try:
        state = checkpoint_utils.load_checkpoint_to_cpu(path)  # empty or truncated: the plugin's one-line error
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if "Weights only" not in str(e) or not found:
            raise ConfigError(f"{path}: not a readable checkpoint (torch.load: {str(e).splitlines()[0]})") from None
        raise ConfigError(
            f"{path}: refused, not loaded: it pickles {found.group(1)}, which no fairseq checkpoint holds "
            f"(torch's weights_only unpickler stopped before running anything)"
        ) from None
    except ConfigError:
        raise
    except OSError as e:  # torch's zip reader on some truncations, where the plugin's patch expects a RuntimeError
        raise unreadable_checkpoint(path, f"truncated or corrupt (torch.load: {type(e).__name__}: {e})") from None
    except Exception as e:  # noqa: BLE001  (a torch file that fairseq cannot read as a checkpoint)
        raise ConfigError(f"{path}: not a fairseq checkpoint (fairseq's loader: {type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or state.get("cfg") is None:
        raise ConfigError(f"{path}: not a fairseq checkpoint (no model weights and config)")
    return state


def dense_model_args(path: str, state: dict) -> argparse.Namespace:
    """The dense model's options, as the Namespace the moec_transformer model is built from; ConfigError for a
    checkpoint that is not a dense translation transformer."""
    cfg = state["cfg"]
    model = cfg.get("model")
    if OmegaConf.is_config(model):  # fairseq-hydra-train: the same options as a DictConfig
        model = argparse.Namespace(**OmegaConf.to_container(model, resolve=True))
    arch = getattr(model, "arch", None) or getattr(model, "_name", None)
    task = (cfg.get("task") or {}).get("_name")
    name = ARCH_MODEL_NAME_REGISTRY.get(arch, arch)
    if name == MOEC_ARCH:
        raise ConfigError(f"{path}: already a MoE model (--arch {arch}): upcycle takes a dense transformer")
    if name != DENSE_MODEL:
        raise ConfigError(
            f"{path}: a {name} model (--arch {arch}), not a dense translation transformer: upcycle takes "
            f"checkpoints of fairseq's transformer* architectures"
        )
    if task not in TASKS:
        raise ConfigError(
            f"{path}: trained for the task {task}, not a translation model: upcycle takes the tasks {', '.join(TASKS)}"
        )
    model = copy.deepcopy(model)
    model.arch = arch  # a hydra config names it in _name only
    return model


# ------------------------------------------------------------------------------------------------ the MoEC model
def moec_model_args(dense_args: argparse.Namespace, moe_options: Dict, router_init: str) -> argparse.Namespace:
    """The dense options (the dense architecture's preset filling any the checkpoint lacks) plus the MoE options,
    validated as fairseq-train validates them; ConfigError naming the flag."""
    args = copy.deepcopy(dense_args)
    ARCH_CONFIG_REGISTRY[args.arch](args)
    args.arch = args._name = MOEC_ARCH
    for name, value in moe_options.items():
        if value is not None:
            setattr(args, name, value)
    fill_defaults(args, MoEPlacement, MoEConfig)
    moe = validate(args)
    if args.activation_fn not in ACTIVATIONS:
        raise ConfigError(
            f"--activation-fn: the dense model's {args.activation_fn} has no MoE counterpart (experts: "
            f"{', '.join(ACTIVATIONS)})"
        )
    if moe.moe_expert_sublayers != 1:
        raise ConfigError(
            f"--moe-expert-sublayers: must be 1 to upcycle (each expert is a copy of one dense FFN), "
            f"got {moe.moe_expert_sublayers}"
        )
    ffn = {getattr(args, f"{side}_ffn_embed_dim") for side in ("encoder", "decoder") if moe_layer_indices(args, side)}
    if moe.moe_expert_ffn_dim and {moe.moe_expert_ffn_dim} != ffn:
        raise ConfigError(
            f"--moe-expert-ffn-dim: experts are copies of the dense FFN, of size {' and '.join(map(str, sorted(ffn)))}"
            f": leave it at 0 or give that size, got {moe.moe_expert_ffn_dim}"
        )
    if router_init == "zeros" and moe.moe_router != "linear":
        raise ConfigError(f"--router-init zeros: needs --moe-router linear, got {moe.moe_router}")
    return args


def _placeholder_dictionary(size: int):
    """A fairseq Dictionary of ``size`` symbols (the standard specials, pad = 1): the model's shapes need no
    vocabulary, and OUT.pt is used with the dense model's real dictionaries."""
    d = Dictionary()
    while len(d) < size:
        d.add_symbol(f"<upcycle-placeholder-{len(d)}>")
    return d


def build_moec_model(args: argparse.Namespace, dense: Dict[str, torch.Tensor], path: str, seed: int):
    """fairseq's build of the moec_transformer model (as when OUT.pt is loaded), its random initialisation seeded."""
    sizes = {}
    for side in ("encoder", "decoder"):
        embedding = dense.get(f"{side}.embed_tokens.weight")
        if embedding is None:
            raise ConfigError(f"{path}: has no {side}.embed_tokens.weight: not a translation transformer's weights")
        sizes[side] = embedding.shape[0]
    src = _placeholder_dictionary(sizes["encoder"])
    tgt = src if args.share_all_embeddings else _placeholder_dictionary(sizes["decoder"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return models.build_model(args, SimpleNamespace(source_dictionary=src, target_dictionary=tgt))


def upcycled_state_dict(model, dense: Dict[str, torch.Tensor], path: str, router_init, noise, seed) -> Dict:
    """The model's weights: the dense checkpoint's, and MoE layers whose experts are copies of its FFNs."""
    dense = dict(dense)
    model.upgrade_state_dict(dense)  # fairseq's renames of old checkpoints' keys, as its loading does
    generator = torch.Generator().manual_seed(seed)
    moe_prefixes, used = [], set()
    for side, layers in (("encoder", model.encoder.layers), ("decoder", model.decoder.layers)):
        for i, layer in enumerate(layers):
            if not isinstance(layer.fc1, MoEFFNSlot):
                continue
            keys = [f"{side}.layers.{i}.{fc}.{p}" for fc in ("fc1", "fc2") for p in ("weight", "bias")]
            missing = [k for k in keys if k not in dense]
            if missing:
                raise ConfigError(f"{path}: has no {missing[0]}: layer {i} of the {side} has no dense FFN to copy")
            upcycle_moe_layer(layer.fc1.moe, *(dense[k] for k in keys), router_init, noise, generator)
            moe_prefixes.append(f"{side}.layers.{i}.fc1.moe.")
            used.update(keys)
    dtype = dense["encoder.embed_tokens.weight"].dtype  # e.g. fp16 weights of --fp16 training stay fp16
    out = {}
    for key, value in model.state_dict().items():
        if key.startswith(tuple(moe_prefixes)):
            out[key] = value.to(dtype) if value.is_floating_point() else value
            continue
        if key not in dense:
            raise ConfigError(f"{path}: has no {key}, which its architecture's MoEC model has")
        if dense[key].shape != value.shape:
            raise ConfigError(f"{path}: {key} has shape {tuple(dense[key].shape)}, its MoEC model {tuple(value.shape)}")
        out[key] = dense[key]
        used.add(key)
    unused = sorted(set(dense) - used)
    if unused:
        raise ConfigError(f"{path}: {len(unused)} weights have no place in the MoEC model, e.g. {unused[0]}")
    model.load_state_dict(out, strict=True)  # what fairseq will do with OUT.pt
    return out


# ------------------------------------------------------------------------------------------------ the output
def upcycled_checkpoint(state: dict, args, weights: Dict, provenance: Dict) -> dict:
    """A fairseq checkpoint at update 0 without optimizer state: the dense config with the MoEC model, task
    translation_moec (and its criterion where the dense one has a MoEC counterpart)."""
    cfg = OmegaConf.to_container(state["cfg"], resolve=True, enum_to_str=True)  # as fairseq's Trainer saves it
    cfg["model"] = args
    cfg["task"]["_name"] = TASKS[cfg["task"]["_name"]]
    criterion = cfg.get("criterion") or {}
    criterion["_name"] = CRITERIA.get(criterion.get("_name"), criterion.get("_name"))
    last = state["optimizer_history"][-1]
    return {
        "args": None,
        "cfg": cfg,
        "model": weights,
        "criterion": {},
        "optimizer_history": [
            {
                "criterion_name": last["criterion_name"],
                "optimizer_name": last["optimizer_name"],
                "lr_scheduler_state": {"best": None},
                "num_updates": 0,
            }
        ],
        "task_state": state.get("task_state", {}),
        "extra_state": {
            "train_iterator": {"version": 2, "epoch": 1, "iterations_in_epoch": 0, "shuffle": True},
            "upcycled_from": provenance,
        },
        "last_optimizer_state": None,
    }


def save_new(obj, path: str) -> None:
    """torch.save to a temporary file beside ``path``, then link it into place: never over an existing file, and
    never a partial file at ``path``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if path exists, unlike a rename
        except FileExistsError:
            raise ConfigError(exists_message(path)) from None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP) or os.path.exists(path):
                raise
            os.replace(tmp, path)  # a file system without hard links
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def exists_message(path: str) -> str:
    return f"{path}: exists; upcycle writes a new file, never over one (remove it or choose another name)"


def training_flags(args: argparse.Namespace) -> List[str]:
    """The model flags that make fairseq-train build this model: --arch and every model option whose value is not
    that architecture's default."""
    parser = argparse.ArgumentParser()
    MoECTransformerModel.add_args(parser)
    preset = argparse.Namespace()
    ARCH_CONFIG_REGISTRY[MOEC_ARCH](preset)
    flags = ["--arch", MOEC_ARCH]
    for action in parser._actions:
        if not action.option_strings or not hasattr(args, action.dest):
            continue
        value, default = getattr(args, action.dest), getattr(preset, action.dest, action.default)
        if value is None or value == default:
            continue
        flag = max(action.option_strings, key=len)
        if action.nargs == 0:  # a switch (store_true)
            if value:
                flags.append(flag)
        else:
            flags += [flag, str(value)]
    return flags


# ------------------------------------------------------------------------------------------------ the command
def upcycle(
    dense_path: str,
    output: str,
    moe_options: Optional[Dict] = None,
    router_init: str = "random",
    expert_noise: float = 0.0,
    seed: int = 1,
) -> argparse.Namespace:
    """Write the upcycled checkpoint of ``dense_path`` to ``output``; return its model options. ``moe_options``:
    MoE model options by field name (MoEPlacement, MoEConfig); None or absent = the option's default."""
    known = {f.name for dc in (MoEPlacement, MoEConfig) for f in dataclasses.fields(dc)}
    unknown = sorted(set(moe_options or {}) - known)
    if unknown:
        raise ValueError(f"not MoE model options: {', '.join(unknown)}")
    if os.path.lexists(output):
        raise ConfigError(exists_message(output))
    if router_init not in ROUTER_INITS:
        raise ConfigError(f"--router-init: must be one of {', '.join(ROUTER_INITS)}, got {router_init!r}")
    if not (isinstance(expert_noise, (int, float)) and 0 <= expert_noise < float("inf")):
        raise ConfigError(f"--expert-noise: must be a finite number >= 0, got {expert_noise!r}")
    state = read_dense_checkpoint(dense_path)
    dense_args = dense_model_args(dense_path, state)
    args = moec_model_args(dense_args, moe_options or {}, router_init)
    model = build_moec_model(args, state["model"], dense_path, seed)
    weights = upcycled_state_dict(model, state["model"], dense_path, router_init, expert_noise, seed)
    provenance = {
        "checkpoint": os.path.abspath(dense_path),
        "arch": dense_args.arch,
        "num_updates": int(state["optimizer_history"][-1].get("num_updates", 0)),
        "router_init": router_init,
        "expert_noise": float(expert_noise),
        "seed": seed,
    }
    save_new(upcycled_checkpoint(state, args, weights, provenance), output)
    return args


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fairseq_moec.upcycle",
        description="Turn a dense fairseq translation Transformer checkpoint into a MoEC one whose experts are "
        "copies of the dense FFNs (sparse upcycling).",
    )
    p.add_argument("dense", help="checkpoint of a fairseq transformer* translation model")
    p.add_argument("output", help="the MoEC checkpoint to write (a new file)")
    p.add_argument(
        "--router-init",
        choices=ROUTER_INITS,
        default="random",
        help="'random' (default): the router a new moec_transformer model gets (linear: normal, std 1/sqrt(d)), "
        "whose token-dependent routing separates the copies as soon as training starts; 'zeros': every expert "
        "gets probability 1/E for every token (a linear router only): a uniform start, but the experts tie, so all "
        "tokens first go to one expert (docs/method.md)",
    )
    p.add_argument(
        "--expert-noise",
        type=float,
        default=0.0,
        metavar="STD",
        help="Gaussian noise on each expert's copied weight matrices, std = STD x the dense matrix's std "
        "(biases stay exact); default 0: exact copies",
    )
    p.add_argument("--seed", type=int, default=1, help="seed of the router's initialisation and of the noise")
    add_dataclass_args(p.add_argument_group("MoE layers (the moec_transformer options)"), MoEPlacement, MoEConfig)
    return p


def summary(dense: str, output: str, args: argparse.Namespace) -> str:
    moe = MoEConfig.from_namespace(args)
    enc, dec = (", ".join(map(str, moe_layer_indices(args, side))) or "none" for side in ("encoder", "decoder"))
    train = ["fairseq-train", "DATA", "--user-dir", os.path.dirname(os.path.abspath(__file__))]
    train += ["--task", "translation_moec", "--criterion", "moec_label_smoothed_cross_entropy"]
    train += training_flags(args) + ["--restore-file", output] + RESETS
    clusters = f"{moe.moe_clusters} cluster{'s' * (moe.moe_clusters != 1)}"
    return (
        f"wrote {output}: {dense} upcycled to {MOEC_ARCH} with {moe.moe_expert_count} experts in {clusters} "
        f"(top-{moe.moe_top_k}) at encoder layers {enc} and decoder layers {dec}\n"
        f"fine-tune it with (add your data, criterion, optimizer and schedule options):\n{shlex.join(train)}\n"
        f"(run again after an interruption, this restarts from {output}: to resume instead, give "
        f"--finetune-from-model {shlex.quote(output)} in place of --restore-file and the resets)"
    )


def cli_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = get_parser()
    opts = parser.parse_args(argv)
    names = [f.name for dc in (MoEPlacement, MoEConfig) for f in dataclasses.fields(dc)]
    try:
        args = upcycle(
            opts.dense,
            opts.output,
            {name: getattr(opts, name) for name in names},
            opts.router_init,
            opts.expert_noise,
            opts.seed,
        )
    except ConfigError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(summary(opts.dense, opts.output, args))
    return 0


if __name__ == "__main__":
    sys.exit(cli_main())
