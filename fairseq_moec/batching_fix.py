"""Undo a batching change of the fairseq-fixed fork that loses data.

fairseq-fixed 0.12.3.1 drops the last batch whenever its size is not a multiple of
--required-batch-size-multiple (default 8): fairseq-generate then silently skips up to 7 test sentences and
validation skips up to 7 sentences. Upstream fairseq keeps that batch; so do we, by re-adding whatever
indices the fork's batch_by_size left out as one final batch.
"""
import numpy as np
from fairseq.data import data_utils

_fork_batch_by_size = data_utils.batch_by_size


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
