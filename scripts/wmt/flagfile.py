"""Experiment configs: fairseq-train flags in plain files, one option a line, with includes.

    flagfile.py argv CONFIG [--gpus N] [--data DIR] [--unset --FLAG]... [-- FAIRSEQ_ARGS...]
        print the fairseq-train arguments (data directory first), NUL-separated, for scripts/train.sh
    flagfile.py get CONFIG data|save-dir|name     print one resolved value
    flagfile.py show CONFIG [same options as argv] print the resolved command line

Config syntax (configs/wmt14_en_de/*.flags):
    # a comment; also after a value
    @include _common.flags        include another file (path relative to this one) at this point
    @data data-bin/wmt14_en_de    the data directory (fairseq-train's positional argument)
    @tokens-per-update 524288     derive --update-freq = N / (--max-tokens x GPUs) unless --update-freq is set
    @unset --fp16                 drop an option set earlier (e.g. by an include)
    --lr 5e-4                     an option and its values (shell-style quoting)
    --fp16                        a switch
Later settings of a flag replace earlier ones (includes first, then the file, then the command line), so a
resolved config has each flag once. Placeholders: {name} = the experiment (config file name without
extension), {repo} = the repository root.
"""
import os
import shlex
import shutil
import subprocess
import sys
from typing import Dict, List, Optional

from wmt_common import die, log, main_guard, warn

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG_ROOT = os.path.join(REPO, "configs")


class Config:
    def __init__(self, path: str):
        self.path = path
        self.name = os.path.splitext(os.path.basename(path))[0]
        self.data: Optional[str] = None
        self.tokens_per_update: Optional[int] = None
        self.options: Dict[str, List[str]] = {}  # insertion-ordered; later settings replace values

    def set(self, flag: str, values: List[str]) -> None:
        self.options.pop(flag, None)  # re-inserted at the end: the resolved order follows the last setting
        self.options[flag] = values

    def expand(self, text: str) -> str:
        return text.replace("{name}", self.name).replace("{repo}", REPO)

    def value(self, flag: str) -> Optional[str]:
        v = self.options.get(flag)
        return None if v is None else (v[0] if v else "")

    def argv(self) -> List[str]:
        out = []
        for flag, values in self.options.items():
            out.append(flag)
            out.extend(self.expand(v) for v in values)
        return out


def available_configs() -> List[str]:
    found = []
    for root, _, files in os.walk(CONFIG_ROOT):
        for f in sorted(files):
            if f.endswith(".flags") and not f.startswith("_"):
                found.append(os.path.relpath(os.path.join(root, f), REPO))
    return sorted(found)


def resolve_path(path: str) -> str:
    if os.path.isfile(path):
        return path
    for candidate in (os.path.join(REPO, path), os.path.join(CONFIG_ROOT, path),
                      os.path.join(CONFIG_ROOT, "wmt14_en_de", path),
                      os.path.join(CONFIG_ROOT, "wmt14_en_de", path + ".flags")):
        if os.path.isfile(candidate):
            return candidate
    listing = "\n  ".join(available_configs()) or "(none)"
    die(f"config not found: {path}\navailable configs:\n  {listing}")


def _parse_options(tokens: List[str], where: str, cfg: Config) -> None:
    """--flag v1 v2 --switch ... -> cfg.set; a token that is not a flag before any flag is an error."""
    flag = None
    for tok in tokens:
        if tok.startswith("--") and len(tok) > 2:
            flag = tok
            cfg.set(flag, [])
        elif flag is None:
            die(f"{where}: expected an option starting with '--', got {tok!r}")
        else:
            cfg.options[flag].append(tok)


def load(path: str, cfg: Optional[Config] = None, stack: tuple = ()) -> Config:
    path = os.path.abspath(resolve_path(path) if cfg is None else path)
    if cfg is None:
        cfg = Config(path)
    if path in stack:
        die(f"include cycle: {' -> '.join(stack + (path,))}")
    if not os.path.isfile(path):
        die(f"included config not found: {path} (from {stack[-1] if stack else '?'})")
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, 1):
        where = f"{os.path.relpath(path)}:{n}"
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as e:
            die(f"{where}: {e}")
        if not tokens:
            continue
        head, rest = tokens[0], tokens[1:]
        if head == "@include":
            if len(rest) != 1:
                die(f"{where}: @include takes one file")
            load(os.path.join(os.path.dirname(path), rest[0]), cfg, stack + (path,))
        elif head == "@data":
            if len(rest) != 1:
                die(f"{where}: @data takes one directory")
            cfg.data = rest[0]
        elif head == "@tokens-per-update":
            if len(rest) != 1 or not rest[0].isdigit() or int(rest[0]) < 1:
                die(f"{where}: @tokens-per-update takes one positive integer")
            cfg.tokens_per_update = int(rest[0])
        elif head == "@unset":
            if not rest:
                die(f"{where}: @unset takes flags")
            for flag in rest:
                cfg.options.pop(flag, None)
        elif head.startswith("@"):
            die(f"{where}: unknown directive {head} (known: @include, @data, @tokens-per-update, @unset)")
        elif head.startswith("--"):
            _parse_options(tokens, where, cfg)
        else:
            die(f"{where}: expected '--flag [value...]' or a directive, got {line.strip()!r}")
    return cfg


def detect_gpus() -> int:
    """GPUs fairseq-train will use on this machine: CUDA_VISIBLE_DEVICES if set, else nvidia-smi, else 0."""
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


def derive_update_freq(cfg: Config, gpus: Optional[int], verbose: bool = True) -> None:
    """Set --update-freq so that max-tokens x update-freq x GPUs is about @tokens-per-update."""
    if cfg.tokens_per_update is None:
        return
    max_tokens = cfg.value("--max-tokens")
    if "--update-freq" in cfg.options:
        if max_tokens and gpus and verbose:
            uf = int(cfg.value("--update-freq").split(",")[0])
            log(f"[config] --update-freq {uf} given: {gpus} x {max_tokens} x {uf} = "
                f"{gpus * int(max_tokens) * uf} tokens per update (the recipe: {cfg.tokens_per_update})")
        return
    if not max_tokens or not max_tokens.isdigit():
        die("@tokens-per-update needs --max-tokens N in the config")
    if gpus is None:
        if "--cpu" in cfg.options:
            gpus = 1
        elif cfg.value("--distributed-world-size"):
            gpus = int(cfg.value("--distributed-world-size"))
        else:
            gpus = max(1, detect_gpus())
    per_step = int(max_tokens) * gpus
    uf = max(1, round(cfg.tokens_per_update / per_step))
    cfg.set("--update-freq", [str(uf)])
    got = per_step * uf
    msg = (f"[config] {gpus} GPU(s) x --max-tokens {max_tokens} x --update-freq {uf} = {got} tokens per update "
           f"(the recipe: {cfg.tokens_per_update})")
    if abs(got - cfg.tokens_per_update) > 0.1 * cfg.tokens_per_update:
        warn(msg + ": off by more than 10%; pass --update-freq or --max-tokens to choose")
    elif verbose:
        log(msg)


def resolve(config: str, extra: List[str], gpus: Optional[int] = None, data: Optional[str] = None,
            unset: List[str] = (), verbose: bool = True) -> Config:
    cfg = load(config)
    for flag in unset:
        if flag not in cfg.options:
            warn(f"--unset {flag}: the config does not set it")
        cfg.options.pop(flag, None)
    if extra:
        _parse_options(extra, "command line", cfg)
    derive_update_freq(cfg, gpus, verbose)
    cfg.data = data or os.environ.get("DATA") or cfg.data
    if not cfg.data:
        die(f"{config}: no data directory: add '@data DIR' to the config or pass --data DIR")
    cfg.data = cfg.expand(cfg.data)
    return cfg


def _cli_resolve(args: List[str]) -> Config:
    if not args:
        die("missing CONFIG")
    config, rest = args[0], args[1:]
    gpus, data, unset, extra = None, None, [], []
    i = 0
    while i < len(rest):
        a = rest[i]
        if a in ("--gpus", "--data", "--unset"):
            if i + 1 >= len(rest):
                die(f"{a} needs a value")
            v = rest[i + 1]
            if a == "--gpus":
                if not v.isdigit() or int(v) < 1:
                    die(f"--gpus must be a positive integer, got {v!r}")
                gpus = int(v)
            elif a == "--data":
                data = v
            else:
                unset.append(v)
            i += 2
        elif a == "--":
            extra = rest[i + 1:]
            break
        else:
            extra = rest[i:]
            break
    return resolve(config, extra, gpus, data, unset)


def main():
    argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    cmd, args = argv[0], argv[1:]
    if cmd == "argv":
        cfg = _cli_resolve(args)
        sys.stdout.write("\0".join([cfg.data] + cfg.argv()) + "\0")
    elif cmd == "show":
        cfg = _cli_resolve(args)
        print(" ".join(shlex.quote(a) for a in ["fairseq-train", cfg.data] + cfg.argv()))
    elif cmd == "get":
        if len(args) != 2:
            die("usage: flagfile.py get CONFIG data|save-dir|name")
        cfg = resolve(args[0], [], gpus=1, verbose=False)
        key = args[1]
        if key == "data":
            print(cfg.data)
        elif key == "name":
            print(cfg.name)
        elif key == "save-dir":
            print(cfg.expand(cfg.value("--save-dir") or "checkpoints"))
        else:
            die(f"unknown key {key!r} (data, save-dir, name)")
    elif cmd == "list":
        print("\n".join(available_configs()))
    else:
        die(f"unknown command {cmd!r} (argv, show, get, list)")
    return 0


if __name__ == "__main__":
    main_guard(main)
