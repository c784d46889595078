"""Undo two batching changes of the fairseq-fixed fork: one loses data, one makes resumed runs differ.

1. fairseq-fixed 0.12.3.1 drops the last batch whenever its size is not a multiple of
   --required-batch-size-multiple (default 8): fairseq-generate then silently skips up to 7 test sentences and
   validation skips up to 7 sentences. Upstream fairseq keeps that batch; so do we, by re-adding whatever
   indices the fork's batch_by_size left out as one final batch.

2. The fork builds the batches of a training run under the numpy seed ``--seed + epoch`` of the epoch in which
   the run *starts* (shuffle, then a stable sort by length: the seed decides the order of sentences of equal
   length, and so which batch each goes to and where in it), and reuses them for every later epoch. An
   uninterrupted run uses the batches of epoch 1 throughout; a run resumed in epoch 2 or later built them with
   another seed, so it saw the same sentences in other places: resuming was exact only inside epoch 1. We
   build reusable batches with the seed of epoch 1 whatever the starting epoch, which is what the
   uninterrupted run does; the order of the batches is still shuffled with ``--seed + epoch`` every epoch.
"""
import inspect

import numpy as np
from fairseq.data import data_utils
from fairseq.tasks import FairseqTask

_fork_batch_by_size = data_utils.batch_by_size
_fork_get_batch_iterator = FairseqTask.get_batch_iterator
_signature = inspect.signature(_fork_get_batch_iterator)


def batch_by_size_keeping_tail(indices, *args, **kwargs):
    batches = _fork_batch_by_size(indices, *args, **kwargs)
    covered = sum(len(b) for b in batches)
    if kwargs.get("fixed_shapes") is None and covered < len(indices):
        batched = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
        missing = np.asarray(indices)[~np.isin(indices, batched)]
        if len(missing):
            batches = list(batches) + [missing.astype(np.int64)]
    return batches


def keep_last_batches() -> None:
    if getattr(data_utils.batch_by_size, "__name__", "") != batch_by_size_keeping_tail.__name__:
        data_utils.batch_by_size = batch_by_size_keeping_tail


def get_batch_iterator_with_first_epoch_batches(self, *args, **kwargs):
    call = _signature.bind(self, *args, **kwargs)
    call.apply_defaults()
    a = call.arguments
    epoch, dataset = a["epoch"], a["dataset"]
    reusable = (not a["disable_iterator_cache"] and not a["update_epoch_batch_itr"]
                and not getattr(getattr(self, "cfg", None), "rebuild_batches", False)
                and self.can_reuse_epoch_itr(dataset))
    if not reusable or epoch <= 1 or dataset in self.dataset_to_epoch_iter:
        return _fork_get_batch_iterator(*call.args, **call.kwargs)  # per-epoch batches, or the cached iterator
    a["epoch"] = 1
    itr = _fork_get_batch_iterator(*call.args, **call.kwargs)  # builds the batches under the seed of epoch 1
    itr.epoch = epoch  # the iterator itself starts in the epoch asked for
    dataset.set_epoch(epoch)
    return itr


def build_batches_as_in_first_epoch() -> None:
    if FairseqTask.get_batch_iterator is not get_batch_iterator_with_first_epoch_batches:
        FairseqTask.get_batch_iterator = get_batch_iterator_with_first_epoch_batches
