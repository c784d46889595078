"""The experiments' hydra configs (configs/wmt14_en_de/*.yaml), composed by hydra the way fairseq-hydra-train
composes them, for the recipe's scripts.

    hydra_config.py list                                     the experiments
    hydra_config.py get CONFIG... --key KEY... [-- OVERRIDES...]
        resolved values (e.g. task.data, checkpoint.save_dir), for each config each key, one a line
    hydra_config.py plan CONFIG [--gpus N] [--tokens-per-update N] [-- OVERRIDES...]
        for scripts/train.sh, one a line: the config directory, the config name, task.data, checkpoint.save_dir
        and the update_freq for which GPUs x dataset.max_tokens x update_freq is about N tokens (default
        524288; an empty line when OVERRIDES set optimization.update_freq)

CONFIG is an experiment name (moec64_big) or its YAML file. OVERRIDES are hydra overrides, as given to
fairseq-hydra-train (task.data=DIR, dataset.max_tokens=2048, ...). Bad input: one 'error:' line, exit 2.
"""

import argparse
import logging
import os
import shutil
import subprocess
import sys
import warnings
from typing import List, Optional, Sequence, Tuple

from wmt_common import die, log, main_guard, warn

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_DIR = os.path.join(REPO, "configs", "wmt14_en_de")
TOKENS_PER_UPDATE = 524288  # the paper's batch: about 0.5M tokens per update


def experiments(config_dir: str = CONFIG_DIR) -> List[str]:
    """The experiment configs: the YAML files at the top of the config directory (groups are in subdirectories)."""
    return sorted(f[:-5] for f in os.listdir(config_dir) if f.endswith(".yaml"))


def locate(config: str) -> Tuple[str, str]:
    """(config directory, config name) of an experiment name or a YAML file."""
    path = config if config.endswith(".yaml") else os.path.join(CONFIG_DIR, config + ".yaml")
    if not os.path.isfile(path):
        listing = " ".join(experiments())
        die(f"config not found: {config} (experiments in {os.path.relpath(CONFIG_DIR)}: {listing})")
    return os.path.dirname(os.path.abspath(path)), os.path.basename(path)[:-5]


def compose(config: str, overrides: Sequence[str] = (), with_plugin: bool = False):
    """The resolved config that fairseq-hydra-train trains with (an omegaconf DictConfig, without hydra's node).

    Like fairseq-hydra-train: fairseq's config schema is registered under the config's name (hydra_init), and
    the registries' dataclass defaults are added (add_defaults). ``with_plugin`` imports the plugin first, so
    that the defaults of its task, criterion and optimizer are filled in too (fairseq-hydra-train fills them
    later, when it builds them)."""
    from fairseq.dataclass.initialize import add_defaults, hydra_init
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import HydraException
    from omegaconf import OmegaConf, open_dict
    from omegaconf.errors import OmegaConfBaseException

    config_dir, name = locate(config)
    logging.getLogger("hydra").setLevel(logging.WARNING)
    if with_plugin:
        import fairseq_moec  # noqa: F401  (registers the plugin's task, criterion, optimizer and models)
    hydra_init(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fairseq's schema has the config's name: hydra's deprecation notice
        try:
            with initialize_config_dir(config_dir=config_dir, version_base="1.1", job_name="hydra_train"):
                cfg = hydra_compose(config_name=name, overrides=list(overrides), return_hydra_config=True)
                HydraConfig.instance().set_config(cfg)  # for ${hydra:job.config_name}
                with open_dict(cfg):
                    del cfg["hydra"]
                add_defaults(cfg)
                return OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
        except (HydraException, OmegaConfBaseException) as e:
            die(f"{name}: {e}".replace("\n", " "))


def select(cfg, key: str):
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key, default=KeyError)
    if value is KeyError:
        die(f"the config has no {key}")
    return value


def detect_gpus() -> int:
    """GPUs a run will use on this machine: CUDA_VISIBLE_DEVICES if set, else nvidia-smi, else 0."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi"):
        try:
            out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
            return sum(1 for line in out.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.SubprocessError):
            return 0
    return 0


def update_freq(tokens_per_update: int, max_tokens: int, gpus: int) -> int:
    """update_freq such that gpus x max_tokens x update_freq is closest to tokens_per_update (at least 1)."""
    return max(1, round(tokens_per_update / (max_tokens * gpus)))


def derive_update_freq(cfg, gpus: Optional[int], tokens_per_update: int) -> int:
    max_tokens = cfg.dataset.max_tokens
    if not max_tokens:
        die("update_freq from a tokens-per-update target needs dataset.max_tokens")
    if gpus is None:
        gpus = 1 if cfg.common.cpu else max(1, detect_gpus())
    uf = update_freq(tokens_per_update, max_tokens, gpus)
    got = gpus * max_tokens * uf
    msg = (
        f"[config] {gpus} GPU(s) x dataset.max_tokens {max_tokens} x optimization.update_freq {uf} = {got} "
        f"tokens per update (the target: {tokens_per_update})"
    )
    if abs(got - tokens_per_update) > 0.1 * tokens_per_update:
        warn(msg + ": off by more than 10%; pass optimization.update_freq=[N] or dataset.max_tokens=N to choose")
    else:
        log(msg)
    return uf


def plan(config: str, overrides: Sequence[str], gpus: Optional[int], tokens_per_update: int) -> List[str]:
    config_dir, name = locate(config)
    cfg = compose(config, overrides)
    chosen = any(o.startswith(("optimization.update_freq=", "++optimization.update_freq=")) for o in overrides)
    uf = "" if chosen else str(derive_update_freq(cfg, gpus, tokens_per_update))
    return [config_dir, name, str(cfg.task.data), str(cfg.checkpoint.save_dir), uf]


def positive_int(flag: str):
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < 1:
            die(f"{flag} must be a positive integer, got {text!r}")
        return int(text)

    return parse


def main() -> int:
    argv = sys.argv[1:]
    overrides: List[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, overrides = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    get = sub.add_parser("get")
    get.add_argument("configs", nargs="+")
    get.add_argument("--key", action="append", required=True)
    plan_cmd = sub.add_parser("plan")
    plan_cmd.add_argument("config")
    plan_cmd.add_argument("--gpus", type=positive_int("--gpus"))
    plan_cmd.add_argument("--tokens-per-update", type=positive_int("--tokens-per-update"), default=TOKENS_PER_UPDATE)
    args = ap.parse_args(argv)
    if args.cmd == "list":
        print("\n".join(experiments()))
    elif args.cmd == "get":
        for config in args.configs:
            cfg = compose(config, overrides)
            for key in args.key:
                print(select(cfg, key))
    else:
        print("\n".join(plan(args.config, overrides, args.gpus, args.tokens_per_update)))
    return 0


if __name__ == "__main__":
    main_guard(main)
