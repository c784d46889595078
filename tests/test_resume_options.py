"""A checkpoint and the model options that load it. Every option that shapes the model is compared with the
checkpoint's saved options before the weights are loaded, and a difference is refused in one line that names
each option with both values: fairseq-train resuming (or --restore-file), fairseq-generate/-interactive's
--model-overrides, the hub's keyword arguments. The options that may change on resume are checked against built
models: none of them changes a parameter. Another dictionary is named too."""

import argparse
import dataclasses
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import PLUGIN, TINY_MOEC_ARGS, cli, run
from fairseq import checkpoint_utils, options
from omegaconf import OmegaConf
from test_model import SIZES, dictionary
from test_reliability import assert_one_line_error

import fairseq_moec  # noqa: F401  (installs the patches)
from fairseq_moec import input_checks
from fairseq_moec.models.moec_transformer import MoECTransformerModel
from fairseq_moec.models.options import MoEPlacement
from fairseq_moec.modules.config import ConfigError, MoEConfig
from fairseq_moec.patches import unreadable_checkpoint

# the cosine router, so that the loss temperature and the sigmoid gate are valid changes below
BASE = ["--moe-expert-count", "8", "--moe-clusters", "2", "--moe-router", "cosine"]


def model_args(extra, arch="moec_transformer_tiny"):
    """The model options fairseq-train builds from these flags (arch defaults filled in)."""
    parser = options.get_training_parser()
    argv = ["unused", "--user-dir", PLUGIN, "--task", "translation_moec", "--arch", arch, "--cpu", *SIZES, *extra]
    return options.parse_args_and_arch(parser, argv)


def build(args, words=40):
    d = dictionary(words)
    return MoECTransformerModel.build_model(args, SimpleNamespace(source_dictionary=d, target_dictionary=d))


def shapes(args):
    """The independent reference: the parameters and buffers a model built with ``args`` holds, and their shapes."""
    return {k: tuple(v.shape) for k, v in build(args).state_dict().items()}


def refused_on_resume(saved, given) -> str:
    with input_checks.loading_to_train(given), pytest.raises(ConfigError) as error:
        input_checks.refuse_other_model_options("ck/checkpoint_last.pt", {"cfg": {"model": saved}})
    return str(error.value)


# ----------------------------------------------------------------------------------- which options are compared
MAY_CHANGE = {  # every option that may change on resume, and a valid value other than BASE's
    "moe_top_k": "2",
    "moe_clusters": "4",
    "moe_gate": "sigmoid",
    "moe_router_temperature": "0.2",
    "moe_loss_temperature": "0.07",
    "moe_capacity_factor": "1.5",
    "moe_eval_capacity_factor": "2",
    "moe_jitter_eps": "0.1",
    "cluster_dropout": "0.5",
    "cluster_dropout_interval": "7",
    "moe_seed": "9",
    "cluster_dropout_reroute": "global",
    "moe_cluster_loss": "token",
    "moe_cluster_loss_norm": "official",
    "moe_expert_parallel": "off",
    "moe_expert_placement": "cluster",
}


def test_the_options_that_may_change_on_resume_change_no_parameter():
    assert set(MAY_CHANGE) == set(input_checks.MAY_CHANGE_ON_RESUME)  # a newly allowed option needs a case here
    base = model_args(BASE)
    reference = shapes(base)
    for name, value in MAY_CHANGE.items():
        given = model_args([*BASE, "--" + name.replace("_", "-"), value])
        assert getattr(given, name) != getattr(base, name), name
        assert shapes(given) == reference, name
        assert input_checks.model_option_differences(base, given) == [], name


def test_docs_list_the_options_that_may_change_on_resume():
    text = (Path(__file__).resolve().parents[1] / "docs" / "method.md").read_text()
    listed = text[text.index("**These may change on resume**") : text.index("input_checks.MAY_CHANGE_ON_RESUME")]
    documented = set(re.findall(r"`--([a-z-]+)`", listed))
    assert documented == {name.replace("_", "-") for name in input_checks.MAY_CHANGE_ON_RESUME}


SHAPING = {  # flags added to BASE: the differences named (the checkpoint has BASE's values)
    "sublayers": (["--moe-expert-sublayers", "2"], [("--moe-expert-sublayers", "1", "2")]),
    "router": (["--moe-router", "linear"], [("--moe-router", "cosine", "linear")]),
    "expert ffn": (["--moe-expert-ffn-dim", "64"], [("--moe-expert-ffn-dim", "0", "64")]),
    "router dim": (["--moe-router-dim", "16"], [("--moe-router-dim", "32", "16")]),
    "experts": (["--moe-expert-count", "4"], [("--moe-expert-count", "8", "4")]),
    "encoder layer": (["--moe-encoder-layers", "0"], [("--moe-encoder-layers", "1", "0")]),
    "no decoder layer": (["--moe-decoder-layers", ""], [("--moe-decoder-layers", "1", "''")]),
    "every": (["--moe-every", "1"], [("--moe-encoder-layers", "1", "0,1"), ("--moe-decoder-layers", "1", "0,1")]),
    "two at once": (
        ["--moe-router", "linear", "--moe-expert-sublayers", "3"],
        [("--moe-expert-sublayers", "1", "3"), ("--moe-router", "cosine", "linear")],
    ),
    "layers": (["--encoder-layers", "3"], [("--encoder-layers", "2", "3")]),
    "ffn": (["--decoder-ffn-embed-dim", "96"], [("--decoder-ffn-embed-dim", "48", "96")]),
    "pre-norm": (["--encoder-normalize-before"], [("--encoder-normalize-before", "off", "on")]),
}


@pytest.mark.parametrize("change", SHAPING)
def test_an_option_that_shapes_the_model_is_named_with_both_values(change):
    flags, expected = SHAPING[change]
    saved, given = model_args(BASE), model_args([*BASE, *flags])
    assert shapes(given) != shapes(saved)  # the premise: these weights do not load into that model
    assert input_checks.model_option_differences(saved, given) == expected
    listed = "; ".join(f"{flag}: checkpoint {a}, given {b}" for flag, a, b in expected)
    assert refused_on_resume(saved, given) == (
        f"ck/checkpoint_last.pt: the checkpoint was trained with other model options than this run's: {listed}. "
        f"Continue it with the checkpoint's values, or train the new model in another --save-dir (the options "
        f"that may change on resume: docs/method.md)"
    )


SAME_SHAPES = {  # flags added to BASE that keep every shape: the weights would load, and mean something else
    "heads": (["--encoder-attention-heads", "4"], [("--encoder-attention-heads", "2", "4")]),  # q/k/v read otherwise
    "shared embeddings": (  # the three embedding matrices become one
        ["--share-all-embeddings"],
        [("--share-all-embeddings", "off", "on"), ("--share-decoder-input-output-embed", "off", "on")],
    ),
}


@pytest.mark.parametrize("change", SAME_SHAPES)
def test_options_that_keep_the_shapes_but_not_the_meaning_are_compared(change):
    flags, expected = SAME_SHAPES[change]
    saved, given = model_args(BASE), model_args([*BASE, *flags])
    assert shapes(given) == shapes(saved)
    assert input_checks.model_option_differences(saved, given) == expected


def other_value(f: dataclasses.Field):
    value = f.default
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    return 1.0 if value is None else f"{value}x"


def test_every_other_option_of_the_dataclasses_is_compared():
    """Options added to MoEConfig or MoEPlacement later are compared too, unless listed as free to change."""
    saved = model_args(BASE)
    for f in [*dataclasses.fields(MoEConfig), *dataclasses.fields(MoEPlacement)]:
        if f.name in input_checks.MAY_CHANGE_ON_RESUME or f.name == "moe_every":  # moe_every: "every" above
            continue
        given = argparse.Namespace(**vars(saved))
        setattr(given, f.name, other_value(f) if getattr(saved, f.name) == f.default else f.default)
        flags = [flag for flag, _, _ in input_checks.model_option_differences(saved, given)]
        assert flags == ["--" + f.name.replace("_", "-")], f.name


def test_a_checkpoint_of_an_older_plugin_has_the_defaults_of_the_options_it_lacks():
    saved = model_args(BASE)
    for name in ("moe_expert_sublayers", "moe_gate", "moe_loss_temperature"):  # options it did not have yet
        delattr(saved, name)
    assert input_checks.model_option_differences(saved, model_args(BASE)) == []
    given = model_args([*BASE, "--moe-expert-sublayers", "2"])
    assert input_checks.model_option_differences(saved, given) == [("--moe-expert-sublayers", "1", "2")]


def test_a_hydra_config_compares_as_fairseq_trains_args():
    base = model_args(BASE)
    keys = [*input_checks.compared_options(), "moe_every"]
    saved = OmegaConf.create({k: getattr(base, k) for k in keys if hasattr(base, k)})
    saved._name, saved.moe_encoder_layers, saved.moe_decoder_layers = base.arch, [1], 1  # hydra's spellings
    assert input_checks.model_option_differences(saved, base) == []
    saved.moe_expert_sublayers = 2
    assert input_checks.model_option_differences(saved, base) == [("--moe-expert-sublayers", "2", "1")]


def test_a_dense_checkpoint_is_named_as_another_model():
    dense = model_args([], arch="transformer")
    differences = input_checks.model_option_differences(dense, model_args([]))
    assert differences == [
        (
            "--arch",
            "transformer (a transformer model; python -m fairseq_moec.upcycle makes a MoEC model of it)",
            "moec_transformer_tiny (a moec_transformer model)",
        )
    ]


def test_another_dictionary_is_named():
    args = model_args(BASE)
    state = build(args, words=44).state_dict()
    with pytest.raises(RuntimeError, match="size mismatch") as fairseq:  # fairseq's (torch's) own error
        super(MoECTransformerModel, build(args)).load_state_dict(state)
    assert not isinstance(fairseq.value, ConfigError)
    with pytest.raises(ConfigError) as error:
        build(args).load_state_dict(state)
    assert str(error.value) == (
        "the dictionaries differ: the checkpoint's encoder.embed_tokens.weight has 48 entries, this model's 44 "
        "(from the data directory's dict.*.txt). Use the data directory (its dict.*.txt) that the checkpoint was "
        "trained with"
    )


# ------------------------------------------------------------------------- generation: the model overrides
def test_model_overrides_that_do_not_fit_the_checkpoint_are_refused(tiny_moec_checkpoint):
    path = str(tiny_moec_checkpoint[0])
    overrides = {"moe_expert_sublayers": 2, "moe_top_k": 2, "data": "elsewhere"}
    state = unreadable_checkpoint.fairseq_load_checkpoint_to_cpu(path, dict(overrides))  # fairseq applies them all
    assert state["cfg"].model.moe_expert_sublayers == 2  # and would fail later, loading the weights
    message = (
        f"{path}: the model options given for it (--model-overrides, or from_pretrained's keyword arguments) do "
        f"not fit the checkpoint: --moe-expert-sublayers: checkpoint 1, given 2. The model is built from the "
        f"checkpoint's own options; only those that shape no parameter may be overridden (docs/method.md)"
    )
    with pytest.raises(ConfigError) as error:
        checkpoint_utils.load_checkpoint_to_cpu(path, dict(overrides))
    assert str(error.value) == message
    from fairseq.models.transformer import TransformerModel  # the hub interface: keyword arguments

    with pytest.raises(ConfigError) as error:
        TransformerModel.from_pretrained(
            str(tiny_moec_checkpoint[0].parent), checkpoint_file="checkpoint_last.pt", moe_expert_sublayers=2
        )
    assert str(error.value) == message
    state = checkpoint_utils.load_checkpoint_to_cpu(path, {"moe_top_k": 2, "moe_expert_count": 4, "data": "x"})
    assert (state["cfg"].model.moe_top_k, state["cfg"].model.moe_expert_count) == (2, 4)  # these are applied


# --------------------------------------------------------------------------------- through the real commands
def generate_command(command, data_bin, path, *extra):
    return [cli(command), data_bin, "--user-dir", PLUGIN, "--task", "translation_moec", "--path", path, "--cpu", *extra]


RESUMES = {  # the cases of the issue: flags changed on resume, and the line's list
    "sublayers": (["--moe-expert-sublayers", "2"], "--moe-expert-sublayers: checkpoint 1, given 2"),
    "router": (["--moe-router", "cosine"], "--moe-router: checkpoint linear, given cosine"),
    "expert ffn": (["--moe-expert-ffn-dim", "64"], "--moe-expert-ffn-dim: checkpoint 0, given 64"),
    "moe layers": (
        ["--moe-encoder-layers", "0", "--moe-decoder-layers", ""],
        "--moe-encoder-layers: checkpoint 1, given 0; --moe-decoder-layers: checkpoint 1, given ''",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("change", RESUMES)
def test_train_refuses_to_resume_with_other_model_options(tiny_moec_checkpoint, tmp_path, change):
    flags, listed = RESUMES[change]
    checkpoint, data_bin = tiny_moec_checkpoint
    last = tmp_path / "checkpoint_last.pt"
    shutil.copy(checkpoint, last)
    proc = run(
        [cli("fairseq-train"), data_bin, *TINY_MOEC_ARGS, "--max-update", "6", "--save-dir", tmp_path, *flags],
        check=False,
    )
    assert_one_line_error(
        proc, "fairseq-train", f"{last}: the checkpoint was trained with other model options than this run's: {listed}."
    )
    assert last.read_bytes() == checkpoint.read_bytes() and [p.name for p in tmp_path.iterdir()] == [last.name]


@pytest.mark.slow
def test_train_resumes_with_the_options_that_may_change(tiny_moec_checkpoint, tmp_path):
    checkpoint, data_bin = tiny_moec_checkpoint  # trained 4 updates with top-1 and the relative cluster loss
    shutil.copy(checkpoint, tmp_path / "checkpoint_last.pt")
    flags = ["--moe-top-k", "2", "--moe-cluster-loss-norm", "official", "--max-update", "5", "--save-dir", tmp_path]
    proc = run([cli("fairseq-train"), data_bin, *TINY_MOEC_ARGS, *flags])
    assert '"num_updates": "5"' in proc.stdout + proc.stderr
    saved = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)["cfg"]["model"]
    assert (saved.moe_top_k, saved.moe_cluster_loss_norm) == (2, "official")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["fairseq-generate", "fairseq-interactive"])
def test_generate_and_interactive_refuse_model_overrides_that_do_not_fit(tiny_moec_checkpoint, command):
    checkpoint, data_bin = tiny_moec_checkpoint
    overrides = "{'moe_expert_sublayers': 2, 'moe_router': 'cosine', 'moe_eval_capacity_factor': 2.0}"
    proc = run(generate_command(command, data_bin, checkpoint, "--model-overrides", overrides), check=False)
    assert_one_line_error(
        proc,
        command,
        f"{checkpoint}: the model options given for it (--model-overrides, or from_pretrained's keyword arguments) "
        f"do not fit the checkpoint: --moe-expert-sublayers: checkpoint 1, given 2; --moe-router: checkpoint "
        f"linear, given cosine.",
    )


@pytest.mark.slow
def test_generate_names_another_dictionary(tiny_moec_checkpoint, tmp_path):
    checkpoint, data_bin = tiny_moec_checkpoint
    other = tmp_path / "bin"
    shutil.copytree(data_bin, other)
    for lang in ("es", "en"):  # another data directory, whose dictionaries have 4 more entries
        with open(other / f"dict.{lang}.txt", "a") as f:
            f.write("".join(f"zzq{i} 1\n" for i in range(4)))
    proc = run(generate_command("fairseq-generate", other, checkpoint), check=False)
    assert_one_line_error(proc, "fairseq-generate", "the dictionaries differ: the checkpoint's encoder.embed_tokens")
