"""Build the reusable batches of a training run with epoch 1's seed, so that a run resumed in a later epoch
sees the batches of the uninterrupted run.

Upstream behaviour (fairseq-fixed 0.12.3.1): ``FairseqTask.get_batch_iterator`` builds the batches of a training
run under the numpy seed ``--seed + epoch`` of the epoch in which the run *starts* (shuffle, then a stable sort
by length: the seed decides the order of sentences of equal length, and so which batch each goes to and where in
it), and reuses them for every later epoch. An uninterrupted run uses the batches of epoch 1 throughout; a run
resumed in epoch 2 or later built them with another seed, so it saw the same sentences in other places: resuming
was exact only inside epoch 1. We build reusable batches with the seed of epoch 1 whatever the starting epoch,
which is what the uninterrupted run does; the order of the batches is still shuffled with ``--seed + epoch``
every epoch.
"""

import inspect

from fairseq.tasks import FairseqTask

from .target import Patch

PATCH = Patch("first_epoch_batches", "a run resumed after epoch 1 trains on other batches than the uninterrupted run")

fork_get_batch_iterator = None  # the fork's method, kept by apply()
_signature = None


def get_batch_iterator_with_first_epoch_batches(self, *args, **kwargs):
    call = _signature.bind(self, *args, **kwargs)
    call.apply_defaults()
    a = call.arguments
    epoch, dataset = a["epoch"], a["dataset"]
    reusable = (
        not a["disable_iterator_cache"]
        and not a["update_epoch_batch_itr"]
        and not getattr(getattr(self, "cfg", None), "rebuild_batches", False)
        and self.can_reuse_epoch_itr(dataset)
    )
    if not reusable or epoch <= 1 or dataset in self.dataset_to_epoch_iter:
        return fork_get_batch_iterator(*call.args, **call.kwargs)  # per-epoch batches, or the cached iterator
    a["epoch"] = 1
    itr = fork_get_batch_iterator(*call.args, **call.kwargs)  # builds the batches under the seed of epoch 1
    itr.epoch = epoch  # the iterator itself starts in the epoch asked for
    dataset.set_epoch(epoch)
    return itr


def installed() -> bool:
    return PATCH.installed(FairseqTask, "get_batch_iterator")


def check() -> None:
    PATCH.expect_fairseq()
    PATCH.expect_parameters(
        FairseqTask,
        "get_batch_iterator",
        "fairseq.tasks.FairseqTask",
        [
            "self",
            "dataset",
            "max_tokens",
            "max_sentences",
            "max_positions",
            "ignore_invalid_inputs",
            "required_batch_size_multiple",
            "seed",
            "num_shards",
            "shard_id",
            "num_workers",
            "epoch",
            "data_buffer_size",
            "disable_iterator_cache",
            "skip_remainder_batch",
            "grouped_shuffling",
            "update_epoch_batch_itr",
        ],
    )
    PATCH.expect_attribute(FairseqTask, "can_reuse_epoch_itr", "fairseq.tasks.FairseqTask")


def apply() -> None:
    global fork_get_batch_iterator, _signature
    fork_get_batch_iterator = FairseqTask.get_batch_iterator
    _signature = inspect.signature(fork_get_batch_iterator)
    PATCH.replace(FairseqTask, "get_batch_iterator", get_batch_iterator_with_first_epoch_batches)
    PATCH.log("replaced fairseq.tasks.FairseqTask.get_batch_iterator (reusable batches built with epoch 1's seed)")
