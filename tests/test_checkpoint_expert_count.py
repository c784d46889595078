"""A checkpoint loaded by a model of another --moe-expert-count is refused with what is true: the checkpoint's
expert count and the flag's (not a claim about expert-parallel processes); a real expert-parallel main file
still gets the consolidation advice. From a file, fairseq-train compares the saved options first (the general
check of tests/test_reliability.py) and names the count in the same form."""

import shutil

import pytest
from conftest import TINY_MOEC_ARGS, cli, run
from test_model import build

from fairseq_moec.modules.config import ConfigError


def model_with(experts: int):
    return build("moec_transformer_tiny", ["--moe-expert-count", str(experts), "--moe-clusters", "2"])[0]


def main_file_of_two_processes(state):
    """What process 0 of a 2-process expert-parallel run saves: half of every expert tensor, everything else
    (router, cluster-dropout mask over all experts) whole."""
    return {k: v[: v.shape[0] // 2] if ".experts." in k else v for k, v in state.items()}


@pytest.mark.parametrize("saved, asked", [(4, 2), (4, 8), (8, 2)])
def test_another_expert_count_names_both_counts(saved, asked):
    state = model_with(saved).state_dict()
    with pytest.raises(ConfigError) as error:
        model_with(asked).load_state_dict(state)
    assert str(error.value).startswith(
        f"--moe-expert-count: checkpoint {saved}, given {asked} (experts in each MoE layer). "
        f"Continue it with --moe-expert-count {saved}"
    )
    assert "processes" not in str(error.value)


def test_a_sharded_checkpoint_of_another_expert_count_names_both_counts():
    shard = main_file_of_two_processes(model_with(4).state_dict())  # expert tensors of 2: like an E=2 model's
    for asked in (2, 8):
        with pytest.raises(ConfigError, match=rf"--moe-expert-count: checkpoint 4, given {asked} \(experts in each"):
            model_with(asked).load_state_dict(shard)


def test_a_sharded_checkpoint_of_the_same_expert_count_points_to_consolidation():
    shard = main_file_of_two_processes(model_with(4).state_dict())
    with pytest.raises(
        ConfigError,
        match=r"holds 2 experts, but this model has 4 experts .* written by 2 processes"
        r"\. Merge it with scripts/consolidate_checkpoint\.py",
    ):
        model_with(4).load_state_dict(shard)


@pytest.mark.slow
def test_resuming_with_another_expert_count_stops_before_training(tiny_moec_checkpoint, tmp_path):
    checkpoint, data_bin = tiny_moec_checkpoint  # 4 experts per MoE layer
    shutil.copy(checkpoint, tmp_path / "checkpoint_last.pt")
    args = list(TINY_MOEC_ARGS)
    args[args.index("--moe-expert-count") + 1] = "8"
    proc = run([cli("fairseq-train"), data_bin, *args, "--max-update", "6", "--save-dir", tmp_path], check=False)
    assert proc.returncode != 0
    assert "other model options than this run's: --moe-expert-count: checkpoint 4, given 8. " in proc.stderr
    assert "written by" not in proc.stderr and "train_inner" not in proc.stdout + proc.stderr
