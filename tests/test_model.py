"""The fairseq glue: dense equivalence at E=1, layer placement, flag validation through the real CLI."""

from types import SimpleNamespace

import pytest
import torch
from conftest import PLUGIN, cli, run
from fairseq import options
from fairseq.data import Dictionary
from fairseq.models.transformer import TransformerModel

from fairseq_moec.models.moec_transformer import MoECTransformerModel

SIZES = [
    "--encoder-embed-dim",
    "32",
    "--encoder-ffn-embed-dim",
    "48",
    "--encoder-layers",
    "2",
    "--decoder-layers",
    "2",
    "--encoder-attention-heads",
    "2",
    "--decoder-attention-heads",
    "2",
    "--dropout",
    "0",
    "--attention-dropout",
    "0",
    "--activation-dropout",
    "0",
]


def dictionary(n=40):
    d = Dictionary()
    for i in range(n):
        d.add_symbol(f"w{i}")
    return d


def build(arch, extra, task="translation_moec"):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(
        parser, ["unused", "--user-dir", PLUGIN, "--task", task, "--arch", arch, "--cpu", *SIZES, *extra]
    )
    d = dictionary()
    cls = MoECTransformerModel if arch.startswith("moec") else TransformerModel
    return cls.build_model(args, SimpleNamespace(source_dictionary=d, target_dictionary=d)), d


def batch(d):
    torch.manual_seed(0)
    src = torch.randint(4, len(d), (3, 7))
    src[0, :2] = d.pad()  # left-padded source
    prev = torch.randint(4, len(d), (3, 6))
    prev[2, 4:] = d.pad()  # right-padded target
    return src, torch.tensor([5, 7, 7]), prev


def moe_name(dense_name):
    """(name in the E=1 model, whether it holds a stacked [1, ...] expert tensor) of a dense parameter."""
    for fc in ("fc1", "fc2"):
        if f".{fc}." in dense_name:  # dense fcN.weight [out, in] -> expert 0 of experts.fcN.0
            kind = dense_name.rsplit(".", 1)[1]
            return dense_name.replace(f".{fc}.{kind}", f".fc1.moe.experts.{fc}.0.{kind}"), True
    return dense_name, False


def test_single_expert_reproduces_dense_transformer():
    dense, d = build("transformer", [])
    moe, _ = build("moec_transformer", ["--moe-every", "1", "--moe-expert-count", "1"])
    state = {}
    for key, value in dense.state_dict().items():
        key, stacked = moe_name(key)
        state[key] = value.unsqueeze(0) if stacked else value
    missing, unexpected = moe.load_state_dict(state, strict=False)
    assert not unexpected
    assert all(".router." in k or "cluster_dropout" in k for k in missing)
    assert len(moe.moe_layers()) == 4

    src, lengths, prev = batch(d)
    for mode in ("eval", "train"):  # all dropouts are 0: train mode must agree as well
        getattr(dense, mode)(), getattr(moe, mode)()
        out_dense, _ = dense(src, lengths, prev)
        out_moe, _ = moe(src, lengths, prev)
        real = prev.ne(d.pad())
        torch.testing.assert_close(out_moe[real], out_dense[real], atol=1e-6, rtol=0)
        # a loss that weights every output differently, so that no gradient is a symmetric special case
        weights = torch.randn(out_dense.shape, generator=torch.Generator().manual_seed(1))
        (out_dense[real] * weights[real]).sum().backward()
        (out_moe[real] * weights[real]).sum().backward()
        moe_params = dict(moe.named_parameters())
        for name, p in dense.named_parameters():  # every parameter's gradient, not one
            key, stacked = moe_name(name)
            g_moe = moe_params.pop(key).grad
            torch.testing.assert_close(
                g_moe[0] if stacked else g_moe, p.grad, atol=1e-5, rtol=1e-5, msg=lambda m: f"{mode} {name}: {m}"
            )
        # left: the routers; softmax over one expert is constantly 1, so they get exactly zero gradient
        assert moe_params and all(".router." in n for n in moe_params)
        assert all(p.grad is None or not p.grad.any() for p in moe_params.values())
        dense.zero_grad(set_to_none=True), moe.zero_grad(set_to_none=True)


def test_layer_placement():
    model, _ = build(
        "moec_transformer",
        ["--encoder-layers", "4", "--decoder-layers", "4", "--moe-encoder-layers", "1,3", "--moe-decoder-layers", "0"],
    )
    assert [name for name, _ in model.moe_layers()] == ["enc1", "enc3", "dec0"]
    model, _ = build("moec_transformer", ["--encoder-layers", "4", "--decoder-layers", "4", "--moe-every", "2"])
    assert [name for name, _ in model.moe_layers()] == ["enc1", "enc3", "dec1", "dec3"]
    model, _ = build(
        "moec_transformer_tiny", ["--moe-expert-count", "4", "--moe-clusters", "2", "--moe-expert-sublayers", "3"]
    )
    ((name, layer),) = [m for m in model.moe_layers() if m[0] == "enc1"]
    assert (layer.cfg.moe_expert_count, layer.cfg.moe_clusters, len(layer.experts.fc1)) == (4, 2, 3)


@pytest.mark.parametrize(
    "extra,flag",
    [
        (["--moe-encoder-layers", "5"], "--moe-encoder-layers: layer 5 out of range"),
        (["--moe-every", "2", "--moe-decoder-layers", "1"], "--moe-every"),
        (["--moe-encoder-layers", "", "--moe-decoder-layers", ""], "no layer is a MoE layer"),
        (["--moe-every", "1", "--moe-expert-count", "6", "--moe-clusters", "4"], "--moe-clusters"),
        (["--moe-every", "1", "--moe-loss-temperature", "0.07"], "--moe-loss-temperature: needs --moe-router cosine"),
    ],
)
def test_invalid_placement_and_options_fail_at_build(extra, flag):
    with pytest.raises(ValueError, match=flag):
        build("moec_transformer", extra)


def test_official_recipe_and_token_loss_flags_reach_the_layers():
    official = ["--moe-router", "cosine", "--moe-gate", "sigmoid", "--moe-loss-temperature", "0.07"]
    model, _ = build("moec_transformer_tiny", [*official, "--moe-clusters", "2", "--moe-cluster-loss-norm", "official"])
    cfgs = [layer.cfg for _, layer in model.moe_layers()]
    assert cfgs and all(
        (c.gate, c.moe_loss_temperature, c.moe_cluster_loss_norm) == ("sigmoid", 0.07, "official") for c in cfgs
    )
    model, _ = build("moec_transformer_tiny", ["--moe-clusters", "2", "--moe-cluster-loss", "token"])
    assert all(layer.cfg.gate == "cluster" for _, layer in model.moe_layers())
    model, _ = build("moec_transformer_tiny", ["--moe-clusters", "2"])  # the defaults: today's gate
    assert all((layer.cfg.moe_gate, layer.cfg.gate) == ("auto", "expert") for _, layer in model.moe_layers())


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--moe-expert-count", "8", "--moe-clusters", "3"], "--moe-clusters: must be >= 1 and divide"),
        (["--cluster-dropout", "1.2"], "--cluster-dropout: must be in [0, 1)"),
        (["--moe-router", "hash"], "invalid choice: 'hash'"),
        (["--moe-gate", "sigmoid"], "--moe-gate: sigmoid (the official code's gate) needs --moe-router cosine"),
    ],
)
def test_cli_refuses_bad_flags_before_training(tiny_corpus, tmp_path, extra, message):
    _, _, data_bin = tiny_corpus
    proc = run(
        [
            cli("fairseq-train"),
            data_bin,
            "--user-dir",
            PLUGIN,
            "--task",
            "translation_moec",
            "--arch",
            "moec_transformer_tiny",
            "--criterion",
            "moec_label_smoothed_cross_entropy",
            "--optimizer",
            "adam",
            "--lr",
            "1e-3",
            "--max-tokens",
            "1000",
            "--max-update",
            "2",
            "--cpu",
            "--save-dir",
            tmp_path / "ck",
            *extra,
        ],
        check=False,
    )
    assert proc.returncode != 0
    assert message in proc.stderr
    assert "num_updates" not in proc.stderr  # nothing was trained
    assert not (tmp_path / "ck" / "checkpoint_last.pt").exists()
