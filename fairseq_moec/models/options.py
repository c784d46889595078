"""Command-line options of the moec_transformer model, generated from the dataclasses that define them."""

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import List

from ..modules.config import ConfigError, MoEConfig


@dataclass
class MoEPlacement:
    moe_encoder_layers: str = field(
        default="", metadata={"help": "comma-separated 0-based encoder layers that get a MoE FFN, e.g. '3' or '1,3,5'"}
    )
    moe_decoder_layers: str = field(
        default="", metadata={"help": "comma-separated 0-based decoder layers that get a MoE FFN"}
    )
    moe_every: int = field(
        default=0,
        metadata={
            "help": (
                "instead of explicit lists: every k-th layer of encoder and decoder is MoE (layers k-1, 2k-1, "
                "...); 0 = off"
            )
        },
    )


def add_dataclass_args(parser: argparse.ArgumentParser, *dataclass_types) -> None:
    """One flag per field, with no default: fairseq adds model flags with argument_default=SUPPRESS and lets
    the architecture functions fill in defaults (see ``fill_defaults``)."""
    for dc in dataclass_types:
        hints = typing.get_type_hints(dc)
        for f in dataclasses.fields(dc):
            tp = hints[f.name]
            if typing.get_origin(tp) is typing.Union:  # Optional[X]
                tp = next(a for a in typing.get_args(tp) if a is not type(None))
            help_ = f"{f.metadata['help']} (default: {f.default})".replace("%", "%%")  # argparse %-formats help
            parser.add_argument(
                "--" + f.name.replace("_", "-"),
                type=tp,
                choices=f.metadata.get("choices"),
                metavar=tp.__name__.upper(),
                help=help_,
            )


def fill_defaults(args, *dataclass_types, **overrides) -> None:
    """Architecture function body: keep what the user set, else the preset's override, else the field default."""
    for dc in dataclass_types:
        for f in dataclasses.fields(dc):
            if getattr(args, f.name, None) is None:
                setattr(args, f.name, overrides.get(f.name, f.default))


def moe_layer_indices(args, side: str) -> List[int]:
    """The validated 0-based indices of the MoE layers of one side ('encoder' or 'decoder')."""
    num_layers = getattr(args, f"{side}_layers")
    flag = f"--moe-{side}-layers"
    explicit = getattr(args, f"moe_{side}_layers")
    if explicit is None or isinstance(explicit, int):  # fairseq-hydra-train: model.moe_encoder_layers=3
        explicit = "" if explicit is None else str(explicit)
    elif not isinstance(explicit, str):  # fairseq-hydra-train: model.moe_encoder_layers=[1,3]
        explicit = ",".join(str(i) for i in explicit)
    if args.moe_every < 0:
        raise ConfigError(f"--moe-every: must be >= 0, got {args.moe_every}")
    if args.moe_every and (args.moe_encoder_layers or args.moe_decoder_layers):
        raise ConfigError("--moe-every: cannot be combined with --moe-encoder-layers/--moe-decoder-layers")
    if args.moe_every:
        return list(range(args.moe_every - 1, num_layers, args.moe_every))
    try:
        indices = sorted({int(i) for i in explicit.split(",") if i.strip()})
    except ValueError:
        raise ConfigError(f"{flag}: expected comma-separated integers, got {explicit!r}") from None
    for i in indices:
        if not 0 <= i < num_layers:
            raise ConfigError(
                f"{flag}: layer {i} out of range for --{side}-layers={num_layers} (allowed 0..{num_layers - 1})"
            )
    return indices


def validate(args) -> MoEConfig:
    """Check every MoE option before anything is built; errors name the offending flag."""
    enc, dec = moe_layer_indices(args, "encoder"), moe_layer_indices(args, "decoder")
    if not enc and not dec:
        raise ConfigError("--moe-encoder-layers/--moe-decoder-layers/--moe-every: no layer is a MoE layer")
    return MoEConfig.from_namespace(args).validate()


def options_markdown() -> str:
    """The README's option table, generated from the dataclasses that define the options."""
    from ..criterions.moec_label_smoothed_cross_entropy import MoECCriterionConfig  # glue-level, import late

    rows = ["| flag | default | meaning |", "|---|---|---|"]
    groups = [
        ("model (`--arch moec_transformer*`)", (MoEPlacement, MoEConfig)),
        ("criterion (`--criterion moec_label_smoothed_cross_entropy`)", (MoECCriterionConfig,)),
    ]
    for title, dcs in groups:
        rows.append(f"| **{title}** | | |")
        for dc in dcs:
            names = {f.name for f in dataclasses.fields(dc)}
            if dc is MoECCriterionConfig:  # only what this plugin adds to fairseq's label-smoothed CE
                names = {n for n in names if n.startswith("moe_")}
            for f in dataclasses.fields(dc):
                if f.name not in names:
                    continue
                choices = f.metadata.get("choices")
                meaning = f.metadata["help"] + (f" (one of: {', '.join(choices)})" if choices else "")
                default = "unset" if f.default is None else f"`{f.default}`" if f.default != "" else "`''`"
                rows.append(f"| `--{f.name.replace('_', '-')}` | {default} | {meaning.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(options_markdown(), end="")
