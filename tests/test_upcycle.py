"""python -m fairseq_moec.upcycle: a dense fairseq transformer (the study's `--arch transformer` with shape flags, at
a tiny size) trained for 3 updates, upcycled, checked against the dense model itself: log-probabilities, test-set
translations and the FFN output by hand; then fine-tuned with fairseq-train, translated with fairseq-generate and
the hub interface; and every bad input refused with one line."""

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch
from conftest import PLUGIN, cli, run
from fairseq import checkpoint_utils

from fairseq_moec import upcycle
from fairseq_moec.models.moec_transformer import MoECTransformerModel
from fairseq_moec.modules.config import MoEConfig
from fairseq_moec.pipeline import small_model

pytestmark = pytest.mark.slow

E, G = 4, 2
SHAPE = small_model.size_args(layers=2, dim=64, ffn=128, heads=2)  # the study's flags, FFN != embedding size
GENERATION = ["--beam", "2", "--max-len-b", "20", "--batch-size", "8", "--cpu", "--gen-subset", "test"]
PROG = "python -m fairseq_moec.upcycle: error: "


@pytest.fixture(scope="module")
def dense(tiny_corpus, tmp_path_factory):
    """(checkpoint, data_bin): a dense fairseq transformer trained for 3 updates on the tiny corpus."""
    _, _, data_bin = tiny_corpus
    save_dir = tmp_path_factory.mktemp("dense")
    run(
        [cli("fairseq-train"), data_bin, "--user-dir", PLUGIN, "--task", "translation", "--arch", "transformer"]
        + SHAPE
        + ["--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1", "--optimizer", "adam"]
        + ["--lr", "2e-3", "--max-tokens", "1500", "--max-update", "3", "--seed", "3", "--cpu", "--num-workers", "0"]
        + ["--save-dir", save_dir, "--no-epoch-checkpoints", "--no-progress-bar", "--log-format", "json"]
    )
    return save_dir / "checkpoint_last.pt", data_bin


def moe_options(**given):
    return dict(
        {"moe_expert_count": E, "moe_clusters": G, "moe_encoder_layers": "1", "moe_decoder_layers": "1"}, **given
    )


@pytest.fixture(scope="module")
def upcycled(dense, tmp_path_factory):
    """name -> upcycled checkpoint: top-2 and top-1, with the default (random) router."""
    out = tmp_path_factory.mktemp("upcycled")
    for name, top_k in (("top2", 2), ("top1", 1)):
        upcycle.upcycle(str(dense[0]), str(out / f"{name}.pt"), moe_options(moe_top_k=top_k))
    return {name: out / f"{name}.pt" for name in ("top2", "top1")}


def load(checkpoint, data_bin):
    (model,), _, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)], {"data": str(data_bin)})
    return model.eval(), task


def generate(checkpoint, data_bin, task):
    """{sentence id: (hypothesis tokens, score)} of fairseq-generate on the test set."""
    proc = run(
        [cli("fairseq-generate"), data_bin, "--user-dir", PLUGIN, "--task", task, "--path", checkpoint] + GENERATION
    )
    found = re.findall(r"^H-(\d+)\t(\S+)\t(.*)$", proc.stdout, flags=re.M)
    return {int(i): (tokens, float(score)) for i, score, tokens in found}


def model_options(args):
    """The moec_transformer options of a saved config, as strings (argparse gives '64' where a build wrote 64)."""
    parser = argparse.ArgumentParser()
    MoECTransformerModel.add_args(parser)
    return {a.dest: str(getattr(args, a.dest, None)) for a in parser._actions if a.dest != "help"}


def moe_layers(model):
    return [model.encoder.layers[1].fc1.moe, model.decoder.layers[1].fc1.moe]


# ------------------------------------------------------------------------------------------ equivalence
def test_weights_are_the_dense_ones_and_every_expert_a_copy_of_the_dense_ffn(dense, upcycled):
    dense_sd = torch.load(dense[0], weights_only=True)["model"]
    up = torch.load(upcycled["top1"], weights_only=True)
    sd = up["model"]
    assert up["cfg"]["model"].arch == "moec_transformer" and up["cfg"]["task"]["_name"] == "translation_moec"
    assert up["last_optimizer_state"] is None and up["optimizer_history"][-1]["num_updates"] == 0
    copied = {k for k in dense_sd if not re.match(r"(encoder|decoder)\.layers\.1\.fc[12]\.", k)}
    assert copied == {k for k in sd if ".moe." not in k}  # no other weight dropped, none added
    for k in copied:
        assert torch.equal(sd[k], dense_sd[k]), k
    for side in ("encoder", "decoder"):
        for fc in ("fc1", "fc2"):
            for p in ("weight", "bias"):
                stacked, one = sd[f"{side}.layers.1.fc1.moe.experts.{fc}.0.{p}"], dense_sd[f"{side}.layers.1.{fc}.{p}"]
                assert stacked.shape == (E, *one.shape)
                assert all(torch.equal(stacked[e], one) for e in range(E)), (side, fc, p)


def test_top2_gives_the_dense_log_probabilities(dense, upcycled):
    """Identical experts and gates renormalised over the pair: the dense model's output, whatever the router."""
    dense_model, task = load(*dense)
    moe_model, _ = load(upcycled["top2"], dense[1])
    task.load_dataset("valid")
    batch = task.dataset("valid").collater([task.dataset("valid")[i] for i in range(16)])
    with torch.no_grad():
        want = dense_model.get_normalized_probs(dense_model(**batch["net_input"]), log_probs=True)
        got = moe_model.get_normalized_probs(moe_model(**batch["net_input"]), log_probs=True)
    real = batch["target"].ne(task.target_dictionary.pad())  # the MoE layers zero padding, dense FFNs do not
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)
    for moe in moe_layers(moe_model):  # the router did spread the tokens: the equality is not one expert's
        assert (moe.last_stats["expert_load"] > 0).sum() >= 2


def test_top2_translates_the_test_set_as_the_dense_model(dense, upcycled):
    want = generate(dense[0], dense[1], "translation")
    got = generate(upcycled["top2"], dense[1], "translation_moec")
    assert len(want) == 37 and sorted(got) == sorted(want)
    for i, (tokens, score) in want.items():
        assert got[i][0] == tokens, i
        assert got[i][1] == pytest.approx(score, abs=1e-4), i


def dense_ffn(layer, x):
    return layer.fc2(torch.relu(layer.fc1(x)))


def router_logits(router, x):
    """The logits of a router, from its saved parameters: W_r x (linear), cosine / temperature (cosine)."""
    if hasattr(router, "proj"):
        h = torch.nn.functional.normalize(x @ router.proj.weight.t(), dim=-1)
        e = torch.nn.functional.normalize(router.expert_embed, dim=-1)
        return h @ e.t() / router.log_temperature.exp().clamp(min=0.01)
    return x @ router.weight.t()


def by_hand(gate, top_k, x, ffn, logits):
    """What a MoE layer of identical copies of the dense FFN computes (eval mode): gate(x) * FFN(x)."""
    if top_k == 2:  # two identical experts, gates renormalised over the pair
        return ffn
    p = logits.softmax(-1)
    top = p.argmax(-1, keepdim=True)  # with ties any expert: they are all the same
    if gate == "expert":  # the top expert's probability
        return p.gather(1, top) * ffn
    if gate == "cluster":  # the probability of its cluster
        return p.view(len(p), G, E // G).sum(-1).gather(1, top // (E // G)) * ffn
    a = torch.sigmoid(logits.gather(1, top))  # the official code's gate, and its layer adds (1 - a) x
    return a * ffn + (1 - a) * x


GATE_SETTINGS = [  # (--moe-gate, --moe-top-k, --moe-router, --router-init)
    ("expert", 1, "linear", "zeros"),
    ("expert", 1, "linear", "random"),
    ("expert", 2, "linear", "random"),
    ("cluster", 1, "linear", "zeros"),
    ("cluster", 1, "linear", "random"),
    ("cluster", 2, "linear", "random"),
    ("sigmoid", 1, "cosine", "random"),
]


@pytest.mark.parametrize("gate, top_k, router, router_init", GATE_SETTINGS)
def test_the_moe_ffn_is_the_gate_times_the_dense_ffn(dense, tmp_path, gate, top_k, router, router_init):
    """Where fine-tuning starts, per gate, against the dense model's own FFN and the saved router by hand; with a
    zero router the top-1 gates are 1/E (expert) and 1/G (cluster) for every token."""
    has_gate_option = "moe_gate" in {f.name for f in dataclasses.fields(MoEConfig)}
    if gate != "expert" and not has_gate_option:
        pytest.skip("no --moe-gate option in this version")
    options = moe_options(moe_top_k=top_k, moe_router=router, **({"moe_gate": gate} if has_gate_option else {}))
    upcycle.upcycle(str(dense[0]), str(tmp_path / "up.pt"), options, router_init)
    dense_model, _ = load(*dense)
    moe_model, _ = load(tmp_path / "up.pt", dense[1])
    x = torch.randn(50, 64, generator=torch.Generator().manual_seed(0))
    for dense_layer, moe in zip((dense_model.encoder.layers[1], dense_model.decoder.layers[1]), moe_layers(moe_model)):
        with torch.no_grad():
            ffn, logits, got = dense_ffn(dense_layer, x), router_logits(moe.router, x), moe(x)
        torch.testing.assert_close(got, by_hand(gate, top_k, x, ffn, logits), atol=1e-6, rtol=1e-5)
        if router_init == "zeros":
            torch.testing.assert_close(got, ffn / (E if gate == "expert" else G), atol=1e-6, rtol=1e-5)
        elif top_k == 1 and gate != "sigmoid":  # a token-dependent gate: not one scale for all tokens
            assert (got.norm(dim=-1) / ffn.norm(dim=-1)).std() > 0.01


def test_expert_noise_is_relative_seeded_and_on_the_weights_only(dense, tmp_path):
    paths = {s: tmp_path / f"noise-{s}.pt" for s in ("a", "b", "other")}
    for s, seed in (("a", 5), ("b", 5), ("other", 6)):
        upcycle.upcycle(str(dense[0]), str(paths[s]), moe_options(), expert_noise=0.01, seed=seed)
    sd = {s: torch.load(p, weights_only=True)["model"] for s, p in paths.items()}
    dense_sd = torch.load(dense[0], weights_only=True)["model"]
    for key in sd["a"]:
        assert torch.equal(sd["a"][key], sd["b"][key]), key  # the seed decides everything
    for side in ("encoder", "decoder"):
        for fc in ("fc1", "fc2"):
            one = dense_sd[f"{side}.layers.1.{fc}.weight"]
            stacked = sd["a"][f"{side}.layers.1.fc1.moe.experts.{fc}.0.weight"]
            relative = (stacked - one) / one.std()
            assert all(0.009 < relative[e].std() < 0.011 for e in range(E))
            assert not torch.equal(stacked[0], stacked[1])
            assert not torch.equal(stacked, sd["other"][f"{side}.layers.1.fc1.moe.experts.{fc}.0.weight"])
            bias = sd["a"][f"{side}.layers.1.fc1.moe.experts.{fc}.0.bias"]
            assert all(torch.equal(bias[e], dense_sd[f"{side}.layers.1.{fc}.bias"]) for e in range(E))


@pytest.mark.parametrize("variant", ["hydra config", "fp16 weights"])
def test_other_dense_checkpoints_upcycle_to_the_same_model(variant, dense, upcycled, tmp_path):
    """A dense config saved as fairseq-hydra-train saves it (a dict naming the arch in _name only), and fp16
    weights (--fp16 training): the same upcycled model, its weights in the dense checkpoint's dtype."""
    state = torch.load(dense[0], weights_only=True)
    if variant == "hydra config":
        state["cfg"]["model"] = {k: v for k, v in vars(state["cfg"]["model"]).items() if k != "arch"}
    else:
        state["model"] = {k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, tmp_path / "dense.pt")
    upcycle.upcycle(str(tmp_path / "dense.pt"), str(tmp_path / "up.pt"), moe_options())
    got = torch.load(tmp_path / "up.pt", weights_only=True)
    want = torch.load(upcycled["top1"], weights_only=True)
    assert got["cfg"]["model"].arch == "moec_transformer"
    assert model_options(got["cfg"]["model"]) == model_options(want["cfg"]["model"])
    assert got["model"].keys() == want["model"].keys()
    for key, value in want["model"].items():
        if variant == "fp16 weights" and value.is_floating_point():
            value = value.half()
        assert torch.equal(got["model"][key], value), key


# ------------------------------------------------------------------------------------------ through fairseq
def test_round_trip_through_fairseq_train_and_generate(dense, capsys, tmp_path):
    """The command's printed fairseq-train flags rebuild the model: 2 updates from the upcycled checkpoint, which
    separate the exact copies (no noise: the router's routing gives each expert other tokens); then
    fairseq-generate translates every test line with the result."""
    checkpoint, data_bin = dense
    out = tmp_path / "upcycled.pt"
    argv = [str(checkpoint), str(out), "--moe-expert-count", str(E), "--moe-clusters", str(G)]
    assert upcycle.cli_main(argv + ["--moe-encoder-layers", "1", "--moe-decoder-layers", "1"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    command = shlex.split(printed[-2])
    assert command[:2] == ["fairseq-train", "DATA"] and command[-6:] == ["--restore-file", str(out), *upcycle.RESETS]
    save_dir = tmp_path / "finetuned"
    proc = run(
        [cli("fairseq-train"), data_bin]
        + command[2:]
        + ["--label-smoothing", "0.1", "--optimizer", "torch_adam", "--lr", "1e-3", "--max-tokens", "1500"]
        + ["--max-update", "2", "--cpu", "--num-workers", "0", "--save-dir", save_dir, "--no-epoch-checkpoints"]
        + ["--no-progress-bar", "--log-format", "json"]
    )
    assert f"Loaded checkpoint {out} (epoch 1 @ 0 updates)" in proc.stderr + proc.stdout
    state = torch.load(save_dir / "checkpoint_last.pt", weights_only=True)
    assert state["optimizer_history"][-1]["num_updates"] == 2
    assert model_options(state["cfg"]["model"]) == model_options(torch.load(out, weights_only=True)["cfg"]["model"])
    for side in ("encoder", "decoder"):
        w = state["model"][f"{side}.layers.1.fc1.moe.experts.fc1.0.weight"]
        assert any(not torch.equal(w[0], w[e]) for e in range(1, E)), side
    hypotheses = generate(save_dir / "checkpoint_last.pt", data_bin, "translation_moec")
    assert sorted(hypotheses) == list(range(37))


def test_hub_interface_translates_as_the_dense_model(dense, upcycled, tiny_corpus):
    from fairseq.models.transformer import TransformerModel

    raw, spm_model, data_bin = tiny_corpus
    lines = (raw / "test.es").read_text(encoding="utf-8").splitlines()[:4]

    def hub(path):
        return TransformerModel.from_pretrained(
            str(path.parent),
            checkpoint_file=path.name,
            data_name_or_path=str(data_bin),
            bpe="sentencepiece",
            sentencepiece_model=str(spm_model),
            max_len_b=20,
        )

    moe = hub(upcycled["top2"])
    assert type(moe.models[0]).__name__ == "MoECTransformerModel"
    assert moe.translate(lines, beam=2) == hub(dense[0]).translate(lines, beam=2)


# ------------------------------------------------------------------------------------------ bad input
class RunsACommand:
    """What a malicious checkpoint carries: unpickling it would call os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def bad_file(kind, dense, upcycled, tmp_path):
    path = tmp_path / f"{kind}.pt"
    if kind == "moe":
        return upcycled["top1"]
    if kind == "language-model":
        state = torch.load(dense[0], weights_only=True)
        state["cfg"]["model"] = argparse.Namespace(**dict(vars(state["cfg"]["model"]), arch="transformer_lm"))
        state["cfg"]["model"]._name = "transformer_lm"
        state["cfg"]["task"]["_name"] = "language_modeling"
        torch.save(state, path)
    elif kind == "text":
        path.write_text("hello\n")
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "truncated":
        data = dense[0].read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "pickle":
        torch.save({"model": {}, "payload": RunsACommand(tmp_path / "executed")}, path)
    return path


BAD_FILES = {
    "moe": "already a MoE model (--arch moec_transformer): upcycle takes a dense transformer",
    "language-model": "a transformer_lm model (--arch transformer_lm), not a dense translation transformer",
    "text": "not a checkpoint: neither of the file formats torch.save writes",
    "tensor": "not a fairseq checkpoint (fairseq's loader: RuntimeError",
    "truncated": "truncated or corrupt (torch.load: PytorchStreamReader",
    "pickle": "refused, not loaded: it pickles posix.system, which no fairseq checkpoint holds",
}

BAD_OPTIONS = {
    "layer out of range": (
        ["--moe-encoder-layers", "2"],
        "--moe-encoder-layers: layer 2 out of range for --encoder-layers=2 (allowed 0..1)",
    ),
    "clusters": (["--moe-clusters", "3"], "--moe-clusters: must be >= 1 and divide --moe-expert-count=4, got 3"),
    "experts": (["--moe-expert-count", "0"], "--moe-expert-count: must be >= 1, got 0"),
    "no MoE layer": (["--moe-decoder-layers", "", "--moe-encoder-layers", ""], "no layer is a MoE layer"),
    "sublayers": (["--moe-expert-sublayers", "3"], "--moe-expert-sublayers: must be 1 to upcycle"),
    "expert size": (
        ["--moe-expert-ffn-dim", "64"],
        "--moe-expert-ffn-dim: experts are copies of the dense FFN, of size 128: leave it at 0 or give that size",
    ),
    "zero cosine router": (["--router-init", "zeros", "--moe-router", "cosine"], "--router-init zeros: needs"),
    "noise": (["--expert-noise", "-1"], "--expert-noise: must be a finite number >= 0, got -1.0"),
}


def refused(argv, capsys, tmp_path):
    """The one stderr line of a refusal; nothing written."""
    before = set(tmp_path.iterdir())
    assert upcycle.cli_main([str(a) for a in argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and err.startswith(PROG), err
    assert set(tmp_path.iterdir()) == before  # no output, no temporary file left
    return err.strip()[len(PROG) :]


@pytest.mark.parametrize("kind", BAD_FILES)
def test_a_bad_input_file_is_refused_in_one_line(kind, dense, upcycled, capsys, tmp_path):
    path = bad_file(kind, dense, upcycled, tmp_path)
    message = refused([path, tmp_path / "out.pt"] + ["--moe-encoder-layers", "1"], capsys, tmp_path)
    assert message.startswith(f"{path}: ") and BAD_FILES[kind] in message
    assert not (tmp_path / "executed").exists()


@pytest.mark.parametrize("case", BAD_OPTIONS)
def test_a_bad_option_is_refused_in_one_line(case, dense, capsys, tmp_path):
    flags, expected = BAD_OPTIONS[case]
    base = ["--moe-expert-count", str(E), "--moe-encoder-layers", "1", "--moe-decoder-layers", "1"]
    assert expected in refused([dense[0], tmp_path / "out.pt"] + base + flags, capsys, tmp_path)


def test_an_existing_output_is_refused_and_kept(dense, capsys, tmp_path):
    out = tmp_path / "out.pt"
    out.write_text("keep me")
    message = refused([dense[0], out, "--moe-encoder-layers", "1"], capsys, tmp_path)
    assert message == f"{out}: exists; upcycle writes a new file, never over one (remove it or choose another name)"
    assert out.read_text() == "keep me"


def test_help_lists_every_moe_option(capsys):
    with pytest.raises(SystemExit) as exit:
        upcycle.cli_main(["--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    for f in dataclasses.fields(MoEConfig):
        assert f"--{f.name.replace('_', '-')}" in out
    assert "E % G == 0" in " ".join(out.split())  # help texts with a percent sign


def test_the_command_prints_one_line_and_no_traceback(tmp_path):
    """The real `python -m` entry point, on a malicious pickle: one line on stderr, exit status 2, nothing run."""
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "payload": RunsACommand(tmp_path / "executed")}, path)
    cmd = [sys.executable, "-m", "fairseq_moec.upcycle", path, tmp_path / "out.pt", "--moe-encoder-layers", "1"]
    proc = subprocess.run(
        [str(c) for c in cmd], capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1")
    )
    assert proc.returncode == 2 and proc.stdout == ""
    why = " (torch's weights_only unpickler stopped before running anything)"
    assert proc.stderr.splitlines() == [f"{PROG}{path}: {BAD_FILES['pickle']}{why}"]
    assert not (tmp_path / "executed").exists() and not (tmp_path / "out.pt").exists()
