"""Expert parallelism: 2 gloo processes on CPU against one process holding every expert; fairseq-train under
torchrun (train, save, resume, consolidate, generate on one process); a process dying mid-training."""

import json
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import BIN, FIXTURE, PLUGIN, ROOT, TINY_MOEC_ARGS, cli, run

import fairseq_moec  # noqa: F401  (allowlists the globals of fairseq checkpoints for torch.load)
from fairseq_moec import sharded_checkpoint as sc
from fairseq_moec.modules import ExpertParallel, MoEConfig, MoELayer

W, D, F = 2, 16, 24
# (config, tokens per process): top-1 with cluster dropout and padding; top-2 with token dropping (capacity)
# and process 1 holding padding only, so that it sends nothing and still serves its experts; clusters that
# straddle the processes (G = 3 is not a multiple of W: process 0 holds experts 0-2, process 1 experts 3-5, so
# cluster 1 = {2, 3} lies on both) with cluster dropout: a token rerouted inside its cluster changes process.
CASES = [
    (dict(moe_expert_count=8, moe_clusters=2, cluster_dropout=0.5, moe_expert_sublayers=2), (13, 9)),
    (dict(moe_expert_count=4, moe_clusters=2, moe_top_k=2, moe_capacity_factor=0.6, moe_router="cosine"), (17, 0)),
    (dict(moe_expert_count=6, moe_clusters=3, cluster_dropout=0.5), (15, 11)),
]
STRADDLING = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_inputs(case, rank):
    """Tokens of process ``rank`` (with a few padding positions), the padding mask and an output projection."""
    g = torch.Generator().manual_seed(100 + rank)
    n = case[1][rank]
    x = torch.randn(n + 3, D, generator=g, dtype=torch.float64)
    pad = torch.zeros(n + 3, dtype=torch.bool)
    pad[torch.randperm(n + 3, generator=g)[:3]] = True
    if n == 0:
        pad[:] = True
    return x.requires_grad_(), pad, torch.randn(n + 3, D, generator=g, dtype=torch.float64)


def build_layer(case, ep=None):
    torch.manual_seed(0)  # the same initial experts whatever the placement (see GroupedLinear)
    layer = MoELayer(MoEConfig(**case[0]), D, F, layer_id=3, expert_parallel=ep).double().train()
    layer.set_num_updates(0)
    return layer


def loss_of(model, x, pad, proj, moe=None):
    out = model(x, pad)
    aux = (moe or model).last_losses
    return out, (out * proj).sum() + aux["balance"] + 0.5 * aux["cluster"] + 0.1 * aux["z"]


class SharedThenMoE(torch.nn.Module):
    """A shared (data-parallel) linear map before a MoE layer: what fairseq's gradient handling sees."""

    def __init__(self, ep=None):
        super().__init__()
        torch.manual_seed(0)
        self.shared = torch.nn.Linear(D, D)
        self.moe = MoELayer(MoEConfig(**CASES[0][0]), D, F, expert_parallel=ep)
        self.double().train()

    def forward(self, x, pad):
        return self.moe(self.shared(x), pad)


def fairseq_grads(backend, rank):
    """Gradients as fairseq's trainer leaves them before clipping: DDP-averaged, then times W / sample_size."""
    from fairseq.distributed import LegacyDistributedDataParallel
    from torch.nn.parallel import DistributedDataParallel

    from fairseq_moec.expert_parallel import prepare_for_expert_parallel

    model = SharedThenMoE(ExpertParallel(rank, W))
    prepare_for_expert_parallel(model, model.moe.expert_parallel)
    wrapped = (
        DistributedDataParallel(model)
        if backend == "pytorch_ddp"
        else LegacyDistributedDataParallel(model, dist.group.WORLD)
    )
    x, pad, proj = make_inputs(CASES[0], rank)
    loss_of(wrapped, x.detach(), pad, proj, model.moe)[1].backward()
    if backend == "legacy_ddp":
        wrapped.all_reduce_grads()
    sample_size = sum((~make_inputs(CASES[0], r)[1]).sum().item() for r in range(W))
    return {n: p.grad * W / sample_size for n, p in model.named_parameters()}


def ep_worker(rank, port, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W)
    results = []
    for case in CASES:
        layer = build_layer(case, ExpertParallel(rank, W))
        x, pad, proj = make_inputs(case, rank)
        out, loss = loss_of(layer, x, pad, proj)
        loss.backward()
        results.append(
            {"out": out.detach(), "x_grad": x.grad, "grads": {n: p.grad for n, p in layer.named_parameters()}}
        )
    fairseq = {backend: fairseq_grads(backend, rank) for backend in ("pytorch_ddp", "legacy_ddp")}
    torch.save({"layer": results, "fairseq": fairseq}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_processes_match_one_process_holding_all_experts(tmp_path):
    # spawn, not fork: a forked child can inherit a lock held by one of the test process's threads and hang
    mp.spawn(ep_worker, args=(free_port(), str(tmp_path)), nprocs=W)
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(W)]
    ranks = [s["layer"] for s in saved]
    crossed = 0  # straddling case: tokens rerouted from a dropped expert to a survivor on the other process
    for c, case in enumerate(CASES):
        full = build_layer(case)  # one process, all experts, the two processes' batches one after the other
        full.keep_routing = True
        E = case[0]["moe_expert_count"]
        for r in range(W):
            x, pad, proj = make_inputs(case, r)
            out, loss = loss_of(full, x, pad, proj)
            loss.backward()
            if c == STRADDLING:
                preferred = full.router(x[~pad]).argmax(-1)  # the choice without dropout
                chosen = full.last_routing[1][:, 0]
                assert torch.equal(preferred // 2, chosen // 2)  # rerouted inside its cluster (m = 2)
                crossed += int((preferred // (E // W) != chosen // (E // W)).sum())
            torch.testing.assert_close(ranks[r][c]["out"], out.detach(), atol=1e-5, rtol=0)
            torch.testing.assert_close(ranks[r][c]["x_grad"], x.grad, atol=1e-5, rtol=0)
        for name, p in full.named_parameters():
            if name.startswith("experts."):  # each process holds E/W experts: compare with its block
                for r in range(W):
                    block = slice(r * E // W, (r + 1) * E // W)
                    torch.testing.assert_close(ranks[r][c]["grads"][name], p.grad[block], atol=1e-5, rtol=0)
            else:  # router: replicated, its gradient is the sum over processes
                total = sum(ranks[r][c]["grads"][name] for r in range(W))
                torch.testing.assert_close(total, p.grad, atol=1e-5, rtol=0)
    assert crossed > 0

    # through fairseq's DDP wrappers and gradient scaling: single-process training on the union of the batches
    full = SharedThenMoE()
    sample_size = 0
    for r in range(W):
        x, pad, proj = make_inputs(CASES[0], r)
        loss_of(full, x.detach(), pad, proj, full.moe)[1].backward()
        sample_size += (~pad).sum().item()
    E = CASES[0][0]["moe_expert_count"]
    for backend in ("pytorch_ddp", "legacy_ddp"):
        for name, p in full.named_parameters():
            expected = p.grad / sample_size
            for r in range(W):
                got = saved[r]["fairseq"][backend][name]
                if ".experts." in name:
                    expected_r = expected[r * E // W : (r + 1) * E // W]
                else:
                    expected_r = expected
                torch.testing.assert_close(got, expected_r, atol=1e-5, rtol=0, msg=f"{backend} {name} rank {r}")


def test_expert_count_and_cluster_placement_must_fit_the_processes():
    MoEConfig(moe_expert_count=8, moe_clusters=2).validate_expert_parallel(4)
    MoEConfig(moe_expert_count=8, moe_clusters=4, moe_expert_placement="cluster").validate_expert_parallel(2)
    with pytest.raises(ValueError, match=r"--moe-expert-count: 6 experts cannot be split evenly over 4 processes"):
        MoEConfig(moe_expert_count=6, moe_clusters=2).validate_expert_parallel(4)
    with pytest.raises(ValueError, match=r"--moe-expert-placement cluster: the 2 clusters of 4 experts"):
        MoEConfig(moe_expert_count=8, moe_clusters=2, moe_expert_placement="cluster").validate_expert_parallel(4)


def test_expert_parallel_placement_from_the_model_options(monkeypatch):
    from types import SimpleNamespace

    from fairseq_moec import expert_parallel as glue

    monkeypatch.setattr(glue.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(glue.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(glue.dist, "get_rank", lambda group=None: 1)
    args = SimpleNamespace(moe_expert_count=8, moe_clusters=2, moe_expert_parallel="auto")
    assert glue.expert_parallel_for(args) == ExpertParallel(rank=1, world_size=2)
    assert glue.expert_parallel_for(SimpleNamespace(moe_expert_count=6, moe_expert_parallel="off")) is None
    with pytest.raises(ValueError, match=r"--moe-expert-count: 5 experts cannot be split evenly over 2"):
        glue.expert_parallel_for(SimpleNamespace(moe_expert_count=5, moe_clusters=1))


# Every option that cannot work with split experts, as fairseq-train and fairseq-hydra-train spell it, and the
# words the refusal must contain for it (flag, hydra spelling, what to do instead). '+': not in the WMT configs.
UNSUPPORTED = [
    (["--ddp-backend", "fully_sharded"], "distributed_training.ddp_backend=fully_sharded", "use pytorch_ddp or"),
    (["--use-bmuf"], "optimization.use_bmuf=true", "--use-bmuf (optimization.use_bmuf=true)"),
    (["--zero-sharding", "os"], "distributed_training.zero_sharding=os", "--zero-sharding os (distributed_"),
    (["--store-ema"], "ema.store_ema=true", "--store-ema (ema.store_ema=true): the EMA copy"),
    (["--eval-bleu"], "+task.eval_bleu=true", "--eval-bleu (task.eval_bleu=true): beam search"),
    (["--decoder-layerdrop", "0.1"], "+model.decoder_layerdrop=0.1", "--decoder-layerdrop 0.1 (model.decoder_"),
    (["--model-parallel-size", "2"], "common.model_parallel_size=2", "--model-parallel-size 2 (common.model_"),
    (["--fp16"], "common.fp16=true", "--fp16 (common.fp16=true) with flattened gradients: add --fp16-no-flatten"),
]
FP16 = ["common.fp16=true", "common.bf16=false"]  # the WMT configs' precision is bf16 (precision/bf16.yaml)


def fairseq_train_cfg(*flags):
    """The full config fairseq-train gives the Trainer for the tiny MoEC model and ``flags``."""
    from fairseq import options
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    args = options.parse_args_and_arch(options.get_training_parser(), [str(FIXTURE), *map(str, TINY_MOEC_ARGS), *flags])
    return convert_namespace_to_omegaconf(args)


def test_unsupported_options_are_refused_from_the_full_config_of_both_entry_points():
    """fairseq-hydra-train gives build_model only the model's options; the Trainer sees them all, under
    fairseq-hydra-train (a WMT config) as under fairseq-train."""
    from test_hydra_configs import compose

    from fairseq_moec.expert_parallel import refuse_unsupported
    from fairseq_moec.modules.config import ConfigError

    hydra_cfg = compose("moec16_base", *FP16, *[override for _, override, _ in UNSUPPORTED if "fp16" not in override])
    argparse_cfg = fairseq_train_cfg(*[a for flags, _, _ in UNSUPPORTED for a in flags])
    for cfg in (hydra_cfg, argparse_cfg):
        with pytest.raises(ConfigError) as e:
            refuse_unsupported(cfg, 2)
        message = str(e.value)
        assert message.startswith("--moe-expert-parallel auto (on 2 processes) does not work with: --ddp-backend")
        assert "\n" not in message and message.endswith(
            "off (model.moe_expert_parallel=off): every expert on every process"
        )
        for _, override, words in UNSUPPORTED:
            assert words in message and override.lstrip("+") in message, (override, message)
    # each one alone is refused, in either spelling; the configs as they are (plain bf16) are not
    for flags, override, words in UNSUPPORTED:
        for cfg in (compose("moec16_base", *FP16[1:], override), fairseq_train_cfg(*flags)):
            with pytest.raises(ConfigError, match=re.escape(words)):
                refuse_unsupported(cfg, 2)
    refuse_unsupported(compose("moec16_base"), 8)
    refuse_unsupported(compose("moec16_base", *FP16, "common.fp16_no_flatten_grads=true"), 2)
    refuse_unsupported(fairseq_train_cfg("--bf16"), 2)
    refuse_unsupported(fairseq_train_cfg("--fp16", "--memory-efficient-fp16"), 2)


def test_flattened_gradients_are_predicted_as_fairseq_builds_its_optimizer(monkeypatch):
    """flattens_gradients against fairseq's own choice (Trainer._build_optimizer, FP16Optimizer.build_optimizer)
    for every combination of the precision options: a flat fp32 copy of all parameters has no ``expert``."""
    from itertools import product

    from fairseq import optim
    from fairseq.trainer import Trainer

    from fairseq_moec.expert_parallel import flattens_gradients

    class Built(Exception):
        pass

    def flat_or_not(cls, args, params, flatten=True):
        raise Built(flatten)

    def keeps_the_parameters(*args, **kwargs):
        raise Built(False)

    monkeypatch.setattr(optim.FP16Optimizer, "build_fp32_params", classmethod(flat_or_not))
    for other in ("MemoryEfficientFP16Optimizer", "AMPOptimizer"):
        monkeypatch.setattr(getattr(optim, other), "build_optimizer", keeps_the_parameters)
    monkeypatch.setattr(optim, "build_optimizer", keeps_the_parameters)  # fp32
    names = ("fp16", "bf16", "amp", "memory_efficient_fp16", "memory_efficient_bf16", "fp16_no_flatten_grads")
    trainer = Trainer.__new__(Trainer)  # _build_optimizer reads cfg, the parameters and the device only
    trainer.cfg, trainer.cuda = fairseq_train_cfg(), False
    trainer._wrapped_model, trainer._wrapped_criterion = torch.nn.Linear(2, 2), torch.nn.Module()
    flat = []
    for values in product((False, True), repeat=len(names)):
        for name, value in zip(names, values):
            setattr(trainer.cfg.common, name, value)
        with pytest.raises(Built) as built:
            trainer._build_optimizer()
        assert flattens_gradients(trainer.cfg) is built.value.args[0], dict(zip(names, values))
        flat.append(built.value.args[0])
    assert sum(flat) == 1  # --fp16 alone


def test_the_trainer_refuses_unsupported_options_for_an_expert_parallel_model(monkeypatch):
    """The patched Trainer.__init__ checks the full config of an expert-parallel model before fairseq's own
    __init__ runs; a model on one process (no expert_parallel) is not checked."""
    from fairseq.trainer import Trainer

    from fairseq_moec.modules.config import ConfigError
    from fairseq_moec.patches import expert_parallel_trainer

    started = []
    monkeypatch.setitem(expert_parallel_trainer.fairseq_trainer, "__init__", lambda *args: started.append(args))
    model, cfg = torch.nn.Linear(2, 2), fairseq_train_cfg("--fp16")
    Trainer(cfg, None, model, None)
    model.expert_parallel = ExpertParallel(rank=0, world_size=4)
    with pytest.raises(ConfigError, match=r"^--moe-expert-parallel auto \(on 4 processes\) does not work with: --fp16"):
        Trainer(cfg, None, model, None)
    Trainer(fairseq_train_cfg("--fp16", "--fp16-no-flatten-grads"), None, model, None)
    assert len(started) == 2


def test_an_interrupted_save_leaves_a_loadable_checkpoint(tmp_path):
    """Shards are written before the main file commits the save, and the shard they replace is kept: after a
    kill at any point, the main file on disk finds the shard of its own save (and puts it back in place)."""
    main, shard = str(tmp_path / "checkpoint_last.pt"), sc.shard_path(str(tmp_path / "checkpoint_last.pt"), 1)
    for token, value in (("A", 1.0), ("B", 2.0)):
        sc.atomic_save({sc.META: {"token": token}, "model": {"w": torch.tensor([value])}}, shard)
    sc.atomic_save({"extra_state": {sc.META: {"token": "A"}}}, main)  # killed before B's main file was written
    assert sc.find_shard(main, 1, "A")["model"]["w"].item() == 1.0
    assert sc.load(shard)[sc.META]["token"] == "A" and not os.path.exists(shard + ".prev")
    # save C wrote checkpoint_1_4 (main and shard), then only the main file reached checkpoint_last
    sc.atomic_save(
        {sc.META: {"token": "C"}, "model": {"w": torch.tensor([3.0])}}, str(tmp_path / "checkpoint_1_4-expert-rank1.pt")
    )
    assert sc.find_shard(main, 1, "C")["model"]["w"].item() == 3.0
    assert sc.load(shard)[sc.META]["token"] == "C"
    with pytest.raises(FileNotFoundError, match="no expert shard of process 1 belongs to"):
        sc.find_shard(main, 1, "D")
    assert not list(tmp_path.glob("*.tmp"))


def test_one_shard_of_an_expert_parallel_checkpoint_is_refused_with_a_clear_message():
    from test_model import build

    model, _ = build("moec_transformer_tiny", ["--moe-expert-count", "4", "--moe-clusters", "2"])
    state = model.state_dict()
    shard = {k: v[:2] if ".experts." in k else v for k, v in state.items()}
    with pytest.raises(ValueError, match=r"holds 2 experts, but this model has 4 .*consolidate_checkpoint\.py"):
        model.load_state_dict(shard)
    model.load_state_dict(state)


# ------------------------------------------------------------------------------- fairseq-train under torchrun
def with_value(args, flag, value):
    i = args.index(flag)
    return args[: i + 1] + [value] + args[i + 2 :]


# the tiny MoEC model with 8 experts in 2 clusters (4 + 4 on two processes), cluster dropout resampled every 2
# updates; no dropout, so that one process with --update-freq 2 sees exactly what the two processes see
E2E_ARGS = with_value(TINY_MOEC_ARGS, "--moe-expert-count", "8") + ["--dropout", "0", "--disable-validation"]
UPDATES = 8


def train_log(text):
    return {int(r["num_updates"]): r for r in (json.loads(m) for m in re.findall(r"\| train_inner \| (\{.*\})", text))}


def torchrun_train(data_bin, save_dir, max_update, stdout=None):
    """scripts/launch.sh: torchrun --standalone --nproc_per_node 2 fairseq-train ... --cpu (+ gloo)."""
    cmd = [
        "bash",
        ROOT / "scripts" / "launch.sh",
        str(W),
        data_bin,
        *E2E_ARGS,
        "--save-interval-updates",
        "2",
        "--max-update",
        str(max_update),
        "--save-dir",
        save_dir,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if stdout is None:
        return run(cmd, env={"PATH": env["PATH"]})
    return subprocess.Popen([str(c) for c in cmd], stdout=stdout, stderr=subprocess.STDOUT, env=env)


def saved_update(path):
    try:
        return sc.load(str(path), mmap=True)["extra_state"][sc.META]["num_updates"]
    except (FileNotFoundError, RuntimeError, KeyError, EOFError):
        return -1


def worker_pid(launcher_pid, rank):
    """The pid of torchrun's worker process of ``rank`` (read from /proc)."""
    children = Path(f"/proc/{launcher_pid}/task/{launcher_pid}/children").read_text().split()
    for pid in children:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        if f"RANK={rank}".encode() in env:
            return int(pid)
    raise AssertionError(f"no worker of rank {rank} among {children}")


@pytest.fixture(scope="module")
def single_process_reference(tiny_corpus, tmp_path_factory):
    """One process holding all 8 experts, two batches per update (--update-freq 2): the union of what the two
    expert-parallel processes see in each update."""
    _, _, data_bin = tiny_corpus
    save_dir = tmp_path_factory.mktemp("ep_reference")
    proc = run(
        [
            cli("fairseq-train"),
            data_bin,
            *E2E_ARGS,
            "--update-freq",
            str(W),
            "--max-update",
            UPDATES,
            "--save-dir",
            save_dir,
        ]
    )
    return train_log(proc.stdout + proc.stderr), save_dir / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def killed_and_restarted(tiny_corpus, tmp_path_factory):
    """Train on 2 processes (8 experts, 4 + 4), SIGKILL process 1 once a checkpoint at update >= 2 exists,
    then restart, which resumes from checkpoint_last.pt and trains to update 8."""
    _, _, data_bin = tiny_corpus
    save_dir = tmp_path_factory.mktemp("ep_run")
    with open(save_dir / "killed.log", "w+") as log:
        launcher = torchrun_train(data_bin, save_dir, 1000, stdout=log)
        try:
            deadline = time.time() + 240
            while saved_update(save_dir / "checkpoint_last.pt") < 2:
                assert launcher.poll() is None and time.time() < deadline, "training did not reach update 2"
                time.sleep(0.2)
            os.kill(worker_pid(launcher.pid, 1), signal.SIGKILL)
            killed_at = time.time()
            launcher.wait(timeout=120)
            stopped_after = time.time() - killed_at
            print(f"torchrun stopped {stopped_after:.1f}s after process 1 was killed")  # shown with pytest -s
        finally:
            if launcher.poll() is None:
                launcher.kill()
        log.seek(0)
        killed_log = log.read()
    resumed_from = saved_update(save_dir / "checkpoint_last.pt")
    proc = torchrun_train(data_bin, save_dir, UPDATES)
    return dict(
        save_dir=save_dir,
        returncode=launcher.returncode,
        stopped_after=stopped_after,
        killed_log=killed_log,
        resumed_from=resumed_from,
        resumed_log=proc.stdout + proc.stderr,
    )


def hydra_tiny_command(program, data_bin, save):
    """The WMT recipe's moec16_base config at tiny dimensions on the tiny corpus, on the CPU."""
    from test_hydra_configs import CONFIG_DIR, TINY

    return [
        str(cli(program)),
        "--config-dir",
        str(CONFIG_DIR),
        "--config-name",
        "moec16_base",
        f"common.user_dir={PLUGIN}",
        f"task.data={data_bin}",
        "task.source_lang=es",
        "task.target_lang=en",
        *TINY,
        "common.cpu=true",
        "dataset.max_tokens=1000",
        "dataset.num_workers=0",
        f"checkpoint.save_dir={save}",
        "distributed_training.distributed_backend=gloo",
    ]


def test_fairseq_hydra_train_on_two_processes_refuses_fp16_with_flattened_gradients(tiny_corpus, tmp_path):
    """The WMT recipe on 2 gloo processes (tiny dimensions): with common.fp16 and flattened gradients each process
    would compute another gradient norm; both stop with the one-line refusal (exit 2) before training. The two
    processes meet at an explicit init method (fairseq-hydra-train loads the plugin, and so the torchrun_cpu
    patch, only after it has read torchrun's environment)."""
    _, _, data_bin = tiny_corpus
    save = tmp_path / "ckpt"
    port = free_port()
    command = [
        *hydra_tiny_command("fairseq-hydra-train", data_bin, save),
        *FP16,
        f"distributed_training.distributed_init_method=tcp://127.0.0.1:{port}",
        f"distributed_training.distributed_world_size={W}",
        "distributed_training.distributed_no_spawn=true",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [
        subprocess.Popen(
            [*command, f"distributed_training.distributed_rank={rank}"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(W)
    ]
    try:
        outputs = [proc.communicate(timeout=120) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    refusal = (
        "fairseq-hydra-train: error: --moe-expert-parallel auto (on 2 processes) does not work with: --fp16 "
        "(common.fp16=true) with flattened gradients: add --fp16-no-flatten-grads (common.fp16_no_flatten_grads"
    )
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 2 and refusal in err and "Traceback" not in err, (out + err)[-3000:]
        assert "num_updates" not in out + err
    assert not list(save.glob("*.pt"))


def test_fairseq_moec_hydra_train_under_torchrun_on_cpu_trains_one_expert_parallel_model(tiny_corpus, tmp_path):
    """fairseq-moec-hydra-train = fairseq-hydra-train with the plugin imported first, so that torchrun's 2 CPU
    processes form one group (stock fairseq-hydra-train: each trains alone): 16 experts split 8 + 8, and the
    checkpoint has its second process's shard."""
    _, _, data_bin = tiny_corpus
    save = tmp_path / "ckpt"
    command = [
        str(cli("torchrun")),
        "--standalone",
        f"--nproc_per_node={W}",
        *hydra_tiny_command("fairseq-moec-hydra-train", data_bin, save),
        "common.bf16=false",
        "optimization.max_update=2",
        "dataset.disable_validation=true",
    ]
    log = run(command, cwd=tmp_path).stdout
    assert "distributed init (rank 1): env://" in log, log[-3000:]
    main = save / "checkpoint_last.pt"
    assert sc.load(str(main), mmap=True)["extra_state"][sc.META]["num_updates"] == 2
    shard = sc.load(str(sc.shard_path(str(main), 1)))
    assert shard["model"]["encoder.layers.3.fc1.moe.experts.fc1.0.weight"].shape[0] == 8


@pytest.mark.slow
def test_a_dead_process_stops_the_others_and_the_run_restarts_from_its_last_checkpoint(killed_and_restarted):
    r = killed_and_restarted
    assert r["returncode"] != 0
    assert r["stopped_after"] < 60, f"the surviving process took {r['stopped_after']:.0f}s to stop"
    assert "ChildFailedError" in r["killed_log"]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*\n\s*exitcode\s*: -9", r["killed_log"]), r["killed_log"][-2000:]
    assert (
        f"Loaded checkpoint {r['save_dir']}/checkpoint_last.pt (epoch 1 @ {r['resumed_from']} updates)"
        in r["resumed_log"]
    )
    assert sorted(train_log(r["resumed_log"])) == list(range(r["resumed_from"] + 1, UPDATES + 1))


@pytest.mark.slow
def test_torchrun_expert_parallel_training_equals_one_process_then_consolidates_and_generates(
    killed_and_restarted, single_process_reference, tiny_corpus, tmp_path
):
    _, _, data_bin = tiny_corpus
    r = killed_and_restarted
    reference_log, reference_checkpoint = single_process_reference
    # the updates before the kill and after the restart: the same numbers as one process on the same batches
    logs = {**train_log(r["killed_log"]), **train_log(r["resumed_log"])}
    for update in range(1, UPDATES + 1):
        for key in ("loss", "gnorm", "moe_loss", "moe_enc1_rerouted_frac", "moe_dec1_balance", "moe_dec1_load_cv"):
            assert float(logs[update][key]) == pytest.approx(float(reference_log[update][key]), abs=2e-3), (update, key)
    main = r["save_dir"] / "checkpoint_last.pt"
    shard = sc.load(str(sc.shard_path(str(main), 1)))
    assert shard[sc.META]["token"] == sc.load(str(main))["extra_state"][sc.META]["token"]
    assert shard["model"]["encoder.layers.1.fc1.moe.experts.fc1.0.weight"].shape[0] == 4

    # consolidate: every expert (and its optimizer state) in one file, equal to the one-process run's
    consolidate = load_script("consolidate_checkpoint")
    merged = tmp_path / "merged.pt"
    consolidate.main([str(main), "-o", str(merged)])
    got, want = torch.load(merged, weights_only=True), torch.load(reference_checkpoint, weights_only=True)
    assert got["model"].keys() == want["model"].keys()
    # Another summation order changes the last bits, and Adam turns rounding noise in near-zero gradients into
    # steps: after 8 updates weights differ by up to ~2e-5 (lr 2e-3), optimizer moments by < 1e-3 of their
    # scale. A lost or misplaced expert or optimizer state differs by the size of whole steps. Attention key
    # biases are left out: their gradient is exactly zero (softmax ignores them), so they are noise only.
    noise = lambda k: k.endswith("k_proj.bias")  # noqa: E731
    for k, v in want["model"].items():
        if not v.is_floating_point():  # the cluster-dropout state (survivors, period): exactly
            assert torch.equal(got["model"][k], v), k
        elif not noise(k):
            assert (got["model"][k] - v).abs().max() < 1e-4, k
    names = got["extra_state"]["moe_expert_layout"]["optimizer_param_names"]
    for i, state in want["last_optimizer_state"]["state"].items():
        for f, v in state.items():
            if not noise(names[i]) and torch.is_tensor(v) and v.dim() > 0:
                diff = (got["last_optimizer_state"]["state"][i][f] - v).abs().max()
                assert diff <= 1e-2 * v.abs().max(), (names[i], f)

    # reshard for 4 processes and merge back: the same checkpoint
    resharded = tmp_path / "w4" / "checkpoint_last.pt"
    consolidate.main([str(merged), "--world-size", "4", "-o", str(resharded)])
    assert (
        sc.load(str(sc.shard_path(str(resharded), 3)))["model"]["decoder.layers.1.fc1.moe.experts.fc2.0.bias"].shape[0]
        == 2
    )
    consolidate.main([str(resharded), "-o", str(tmp_path / "back.pt")])
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert all(torch.equal(back["model"][k], v) for k, v in got["model"].items())

    # fairseq-generate on one CPU process translates every test line with the merged checkpoint
    proc = run(
        [
            cli("fairseq-generate"),
            data_bin,
            "--user-dir",
            PLUGIN,
            "--task",
            "translation_moec",
            "--path",
            merged,
            "--beam",
            "2",
            "--batch-size",
            "64",
            "--remove-bpe",
            "sentencepiece",
            "--cpu",
        ]
    )
    hyps = re.findall(r"^D-(\d+)\t", proc.stdout, flags=re.M)
    assert len(hyps) == len((FIXTURE / "test.en").read_text(encoding="utf-8").splitlines()) == 37


def load_script(name):
    """scripts/NAME.py as a module (pyproject.toml puts scripts/ on the tests' path)."""
    import importlib

    return importlib.import_module(name)
