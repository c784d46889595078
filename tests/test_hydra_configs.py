"""The WMT'14 experiments as hydra configs (configs/wmt14_en_de/), run by fairseq-hydra-train.

Every config composes with hydra and builds the model it names (tiny dimensions, the fixture data); the 64-expert
MoEC big config resolves to the settings of the flag file it replaced, flag by flag, compared through fairseq's
own argparse parser; fairseq-hydra-train trains from a config end to end; scripts/train.sh sets update_freq.
"""

import os
import re
import shlex
import sys
import warnings

import hydra_config  # scripts/wmt/hydra_config.py (on the tests' path: pyproject.toml)
import pytest
from conftest import BIN, ROOT, cli, run

CONFIG_DIR = ROOT / "configs" / "wmt14_en_de"
EXPERIMENTS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
# Small enough to build 64 experts x 3 sublayers in milliseconds; 4 layers keep the MoE layers' index 3.
TINY = [
    "+model.encoder_embed_dim=16",
    "+model.decoder_embed_dim=16",
    "+model.encoder_ffn_embed_dim=32",
    "+model.decoder_ffn_embed_dim=32",
    "+model.encoder_attention_heads=2",
    "+model.decoder_attention_heads=2",
    "+model.encoder_layers=4",
    "+model.decoder_layers=4",
]

# moec64_big as scripts/wmt/flagfile.py resolved configs/wmt14_en_de/moec64_big.flags for 8 GPUs, in order, just
# before the flag files were replaced ({repo} = the repository root).
FLAGS_MOEC64_BIG = """data-bin/wmt14_en_de --user-dir {repo}/fairseq_moec --source-lang en --target-lang de
--share-all-embeddings --max-tokens 4096 --optimizer torch_adam --adam-betas (0.9,0.98) --adam-eps 1e-08 --lr 5e-4
--lr-scheduler inverse_sqrt --warmup-updates 250 --warmup-init-lr 1e-07 --max-update 32000 --clip-norm 0.1
--weight-decay 0.0 --label-smoothing 0.1 --fp16 --save-dir checkpoints/wmt14_en_de/moec64_big
--save-interval-updates 1000 --keep-interval-updates 10 --no-epoch-checkpoints --validate-interval-updates 1000
--log-format simple --log-interval 100 --seed 1 --task translation_moec --criterion moec_label_smoothed_cross_entropy
--moe-encoder-layers 3 --moe-decoder-layers 3 --moe-expert-sublayers 3 --moe-top-k 1 --moe-router cosine
--moe-balance-weight 0.01 --moe-z-weight 0 --ddp-backend legacy_ddp --cluster-dropout 0.5
--cluster-dropout-interval 250 --cluster-dropout-reroute cluster --moe-cluster-loss intra
--moe-cluster-loss-norm mean --dropout 0.3 --memory-efficient-fp16 --arch moec_transformer_wmt_en_de_big
--moe-expert-count 64 --moe-clusters 8 --moe-cluster-weight 40.96 --update-freq 16"""
# The changes decided with the move to hydra: bf16 (the grouped expert kernel's dtype) instead of fp16, and the
# cluster loss's 'relative' normalisation (the former 'mean' times E'^2), whose weight is 0.01 at every E.
DECIDED = {
    "--fp16": "--bf16",
    "--memory-efficient-fp16": "--memory-efficient-bf16",
    "--optimizer torch_adam": "--optimizer adam",  # fairseq's memory-efficient wrapper needs fairseq's adam
    "--moe-cluster-loss-norm mean": "--moe-cluster-loss-norm relative",
    "--moe-cluster-weight 40.96": "--moe-cluster-weight 0.01",
}


def compose(name, *overrides):
    """The config fairseq-hydra-train trains with, run through scripts/train.sh (the plugin by absolute path)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hydra_config.compose(name, [f"common.user_dir={ROOT}/fairseq_moec", *overrides], with_plugin=True)


def expected_argv():
    text = " " + " ".join(FLAGS_MOEC64_BIG.split()) + " "
    for old, new in DECIDED.items():
        assert text.count(f" {old} ") == 1, old
        text = text.replace(f" {old} ", f" {new} ")
    return text.replace("{repo}", str(ROOT)).split()


def test_one_config_per_experiment():
    want = {f"dense_{s}" for s in ("base", "big")} | {
        f"{k}{e}_{s}" for k in ("moe", "moec") for e in (16, 32, 64) for s in ("base", "big")
    }
    assert set(EXPERIMENTS) == want


def test_moec64_big_resolves_to_the_flag_file_settings():
    """Each flag of the former flag file, parsed by fairseq-train's own parser, has the same value at the same
    place of the hydra config; so does every other setting of fairseq's config groups (their defaults), and
    every model option once the architecture has filled in its defaults."""

    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from fairseq.models import ARCH_CONFIG_REGISTRY
    from omegaconf import OmegaConf, open_dict

    argv = expected_argv()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = options.parse_args_and_arch(options.get_training_parser(), argv)
        legacy = convert_namespace_to_omegaconf(args)
    hydra_cfg = compose("moec64_big")
    with open_dict(hydra_cfg):
        ARCH_CONFIG_REGISTRY[hydra_cfg.model._name](hydra_cfg.model)  # what fairseq's build_model does first
    want = OmegaConf.to_container(legacy, resolve=True)
    want["model"] = vars(want["model"])  # fairseq-train's model config: all of its argparse namespace
    # the model namespace also holds every other option, and each group's choice (args.task, ...)
    not_model = set(want) | {k for g, v in want.items() if g != "model" and isinstance(v, dict) for k in v}
    got = OmegaConf.to_container(hydra_cfg, resolve=True)
    # fairseq-train's --bf16 also switches on --tpu (fairseq/options.py; the bf16_without_tpu patch drops it when
    # training starts); fairseq-hydra-train never sets it. The scorer is only read by fairseq-generate.
    for group in ("common", "distributed_training", "optimizer"):
        assert want[group].pop("tpu") is True and got[group].pop("tpu") is False
    assert want.pop("scoring")["_name"] == "bleu" and got.pop("scoring") is None

    flags = [a for a in argv if a.startswith("--")]
    assert len(flags) == 47
    named = {
        "--arch": "model",
        "--task": "task",
        "--criterion": "criterion",
        "--optimizer": "optimizer",
        "--lr-scheduler": "lr_scheduler",
    }  # a group's choice: its _name
    where = {}
    for flag in flags:
        key = "_name" if flag in named else flag[2:].replace("-", "_")
        groups = (
            [named[flag]]
            if flag in named
            else [g for g, v in want.items() if g != "model" and isinstance(v, dict) and key in v] or ["model"]
        )
        where[flag] = groups
        for g in groups:
            assert got[g].get(key, "<unset>") == want[g][key], f"{flag}: hydra {g}.{key}"
    assert got["task"]["data"] == want["task"]["data"] == argv[0]
    assert where["--max-tokens"] == ["dataset"] and where["--bf16"] == ["common"]
    assert "optimization" in where["--lr"] and where["--moe-cluster-weight"] == ["criterion"]
    assert where["--moe-clusters"] == ["model"] and where["--save-dir"] == ["checkpoint"]
    # ... and nothing else differs: every key of every group; the model's once its architecture filled them in
    assert got["model"] == {k: v for k, v in want["model"].items() if k in got["model"]}
    assert set(want["model"]) - set(got["model"]) <= not_model | {"arch", "no_seed_provided"}
    for group in want:
        if group != "model":
            assert got[group] == want[group], group


def test_every_config_composes_and_builds_the_model_it_names(tiny_corpus):
    """What fairseq-hydra-train builds from each config (hydra's compose, then fairseq's task, model and
    criterion builders), with tiny dimensions on the fixture data."""
    from fairseq import tasks
    from fairseq.models.transformer import TransformerModel

    from fairseq_moec.expert_parallel import refuse_unsupported
    from fairseq_moec.models.moec_transformer import MoECTransformerModel

    _, _, data_bin = tiny_corpus
    for name in EXPERIMENTS:
        cfg = compose(name, f"task.data={data_bin}", "task.source_lang=es", "task.target_lang=en", *TINY)
        big = name.endswith("_big")
        kind, experts = re.fullmatch(r"(dense|moec|moe)(\d*)_(?:base|big)", name).groups()
        # the recipe, the same in every config
        assert (cfg.optimizer._name, cfg.optimizer.adam_betas, cfg.optimizer.adam_eps) == (
            "adam" if cfg.common.memory_efficient_bf16 else "torch_adam",
            "(0.9,0.98)",
            1e-8,
        ), name
        assert cfg.common.memory_efficient_bf16 == name.endswith("64_big"), name
        assert (cfg.optimization.lr, cfg.lr_scheduler._name, cfg.lr_scheduler.warmup_updates) == (
            [5e-4],
            "inverse_sqrt",
            250,
        ), name
        assert (cfg.optimization.max_update, cfg.optimization.clip_norm, cfg.criterion.label_smoothing) == (
            32000,
            0.1,
            0.1,
        ), name
        assert cfg.dataset.max_tokens * cfg.optimization.update_freq[0] * 8 == 524288, name
        assert cfg.checkpoint.save_dir == f"checkpoints/wmt14_en_de/{name}", name
        assert cfg.common.bf16 and not cfg.common.fp16 and not cfg.common.tpu, name
        # 64 big experts do not fit an 80 GB GPU with fp32 master weights (measured): those two only
        assert cfg.common.memory_efficient_bf16 == (experts == "64" and big), name
        assert cfg.model.dropout == (0.3 if big else 0.1) and cfg.model.share_all_embeddings, name

        task = tasks.setup_task(cfg.task)
        model = task.build_model(cfg.model)
        criterion = task.build_criterion(cfg.criterion)
        assert cfg.model._name == ("moec_" if kind != "dense" else "") + "transformer_wmt_en_de" + (
            "_big" if big else ""
        )
        assert model.encoder.embed_tokens is model.decoder.embed_tokens, name  # shared embeddings
        if kind == "dense":
            assert type(model) is TransformerModel and cfg.task._name == "translation", name
            assert type(criterion).__name__ == "LabelSmoothedCrossEntropyCriterion", name
            continue
        assert isinstance(model, MoECTransformerModel) and cfg.task._name == "translation_moec", name
        layers = dict(model.moe_layers())
        assert sorted(layers) == ["dec3", "enc3"], name
        clusters = int(experts) // 8 if kind == "moec" else 1
        for layer in layers.values():
            assert (layer.experts.num_experts, len(layer.experts.fc1)) == (int(experts), 3), name
            assert type(layer.router).__name__ == "CosineRouter" and layer.cfg.moe_top_k == 1, name
            assert layer.cluster_dropout.num_clusters == clusters, name
            # cluster dropout: half of each cluster of 8 for MoEC, resampled every 250 updates; none for MoE
            assert layer.cluster_dropout.num_dropped == (4 if kind == "moec" else 0), name
            assert layer.cluster_dropout.interval == 250, name
        assert criterion.weights == {"balance": 0.01, "cluster": 0.01 if kind == "moec" else 0.0, "z": 0.0}, name
        assert cfg.distributed_training.ddp_backend == "legacy_ddp", name
        refuse_unsupported(cfg, 8)  # the full config, as the Trainer checks it: expert-parallel on 8 GPUs


def test_moe_layer_lists_from_hydra_overrides(tiny_corpus):
    """hydra types model.moe_encoder_layers=1 as an int and =[1,3] as a list; fairseq-train gives strings."""
    from fairseq import tasks

    _, _, data_bin = tiny_corpus
    cfg = compose(
        "moec16_base",
        f"task.data={data_bin}",
        "task.source_lang=es",
        "task.target_lang=en",
        *TINY,
        "model.moe_encoder_layers=1",
        "model.moe_decoder_layers=[0,2]",
    )
    assert cfg.model.moe_encoder_layers == 1 and list(cfg.model.moe_decoder_layers) == [0, 2]
    model = tasks.setup_task(cfg.task).build_model(cfg.model)
    assert sorted(dict(model.moe_layers())) == ["dec0", "dec2", "enc1"]


@pytest.mark.parametrize(
    "gpus, update_freq", [(1, 128), (2, 64), (4, 32), (8, 16), (16, 8), (32, 4), (64, 2), (128, 1), (3, 43)]
)
def test_update_freq_for_each_gpu_count(gpus, update_freq):
    assert hydra_config.update_freq(524288, 4096, gpus) == update_freq


def train_sh(*args, check=True):
    env = {"PYTHON": sys.executable, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    return run(["bash", ROOT / "scripts" / "train.sh", *args], check=check, env=env)


def printed_command(proc):
    return shlex.split(proc.stderr.split("[train] ", 1)[1].splitlines()[0])


def test_train_sh_passes_hydra_overrides(tmp_path):
    proc = train_sh("moec64_big", "--gpus", "4", "--dry-run", "optimization.max_update=10")
    assert printed_command(proc) == [
        "fairseq-hydra-train",
        "--config-dir",
        str(CONFIG_DIR),
        "--config-name",
        "moec64_big",
        f"common.user_dir={ROOT}/fairseq_moec",
        "optimization.update_freq=[32]",
        "optimization.max_update=10",
    ]
    assert "4 GPU(s) x dataset.max_tokens 4096 x optimization.update_freq 32 = 524288" in proc.stderr
    # the user's update_freq is kept as given
    proc = train_sh("moec16_base", "--dry-run", "optimization.update_freq=[3]", "dataset.max_tokens=100")
    assert [a for a in printed_command(proc) if "update_freq" in a] == ["optimization.update_freq=[3]"]
    # bad input: one error line from the helper or hydra, exit 2, before anything runs
    for args, message in [
        (["nope"], "config not found: nope"),
        (["moec64_big", "model.nope=1"], "To append to your config use +model.nope=1"),
        (["moec64_big", "--gpus", "0"], "--gpus must be a positive integer"),
        (["moec64_big", "--gpu", "2"], "unknown option: --gpu"),
        (["moec64_big", "task.data=" + str(tmp_path / "none")], "data directory not found"),
    ]:
        proc = train_sh(*args, check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_fairseq_hydra_train_end_to_end(tiny_corpus, tmp_path):
    """The documented command, fairseq-hydra-train --config-dir configs/wmt14_en_de --config-name moec64_big,
    trains two memory-efficient bf16 updates on the CPU (tiny dimensions), with the config's own optimizer."""
    import torch

    _, _, data_bin = tiny_corpus
    save = tmp_path / "ckpt"
    proc = run(
        [
            cli("fairseq-hydra-train"),
            "--config-dir",
            CONFIG_DIR,
            "--config-name",
            "moec64_big",
            f"common.user_dir={ROOT}/fairseq_moec",
            f"task.data={data_bin}",
            "task.source_lang=es",
            "task.target_lang=en",
            *TINY,
            "common.cpu=true",
            "optimization.max_update=2",
            "optimization.update_freq=[1]",
            "dataset.max_tokens=1000",
            "dataset.num_workers=0",
            f"checkpoint.save_dir={save}",
            "common.log_interval=1",
        ],
        cwd=tmp_path,
    )
    assert "num_updates=2" in proc.stderr + proc.stdout
    state = torch.load(save / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    cfg = state["cfg"]
    assert cfg["common"]["bf16"] and cfg["common"]["memory_efficient_bf16"] and not cfg["common"]["tpu"]
    assert state["optimizer_history"][-1]["num_updates"] == 2
    assert (cfg["model"]["_name"], cfg["model"]["moe_expert_count"], cfg["model"]["moe_clusters"]) == (
        "moec_transformer_wmt_en_de_big",
        64,
        8,
    )
    experts = [v for k, v in state["model"].items() if k.endswith("experts.fc1.0.weight")]
    assert len(experts) == 2 and all(v.shape == (64, 32, 16) for v in experts)
    # hydra's record of the composed config lands next to the checkpoints, not in the working directory
    assert (save / ".hydra" / "config.yaml").exists() and not (tmp_path / "outputs").exists()
