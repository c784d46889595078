"""The cluster-dropout schedule in real training: a short fairseq-train on the tiny corpus, then the survivor
masks and resample periods saved in its checkpoints.

fairseq numbers updates from 0: the update numbered u (the one after which the checkpoint of update u + 1 is
written) trains with the mask of resample period u // I, I = --cluster-dropout-interval. If the update number
never reaches the MoE layers, every mask stays at period 0.
"""

import torch
from conftest import TINY_MOEC_ARGS, cli, run

import fairseq_moec  # noqa: F401  (allowlists the globals of fairseq checkpoints for torch.load)

INTERVAL, UPDATES, SAVE_EVERY = 2, 6, 2
LAYERS = ["decoder.layers.1.fc1.moe.cluster_dropout", "encoder.layers.1.fc1.moe.cluster_dropout"]


def saved_schedule(path):
    """{layer: (period, survivors)} of every MoE layer of a checkpoint."""
    model = torch.load(path, map_location="cpu", weights_only=True)["model"]
    names = sorted(k[: -len(".period")] for k in model if k.endswith("cluster_dropout.period"))
    assert names == LAYERS
    return {n: (int(model[n + ".period"]), model[n + ".survivors"]) for n in names}


def test_training_resamples_the_masks_every_interval_updates(tiny_corpus, tmp_path):
    _, _, data_bin = tiny_corpus
    run(
        [
            cli("fairseq-train"),
            data_bin,
            *TINY_MOEC_ARGS,
            "--cluster-dropout-interval",
            str(INTERVAL),
            "--max-update",
            str(UPDATES),
            "--save-interval-updates",
            str(SAVE_EVERY),
            "--save-dir",
            tmp_path,
        ]
    )

    saved_at = range(SAVE_EVERY, UPDATES + 1, SAVE_EVERY)
    schedules = {u: saved_schedule(tmp_path / f"checkpoint_1_{u}.pt") for u in saved_at}
    # after updates 2, 4, 6 the last update was numbered 1, 3, 5: periods 0, 1, 2
    assert {u: sorted({p for p, _ in s.values()}) for u, s in schedules.items()} == {2: [0], 4: [1], 6: [2]}
    for s in schedules.values():
        for _, survivors in s.values():  # 4 experts in 2 clusters, rate 0.5: one survivor per cluster
            assert survivors.view(2, 2).sum(1).tolist() == [1, 1]
    # each new period draws new masks (seeded by --moe-seed, layer and period; with these seeds every
    # period change alters at least one of the two layers' masks)
    for a, b in ((2, 4), (4, 6)):
        assert any(not torch.equal(schedules[a][n][1], schedules[b][n][1]) for n in LAYERS), (a, b)
    last = saved_schedule(tmp_path / "checkpoint_last.pt")
    assert all(last[n][0] == 2 and torch.equal(last[n][1], schedules[6][n][1]) for n in LAYERS)
