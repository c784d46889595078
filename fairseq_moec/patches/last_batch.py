"""Keep the last batch, which the fairseq-fixed fork drops when its size is not a multiple of the batch size
multiple.

Upstream behaviour (fairseq-fixed 0.12.3.1): ``fairseq.data.data_utils.batch_by_size`` drops the last batch
whenever its size is not a multiple of --required-batch-size-multiple (default 8): fairseq-generate then silently
skips up to 7 test sentences and validation skips up to 7 sentences. Upstream fairseq (0.12.2) keeps that batch;
so do we, by re-adding whatever indices the fork's batch_by_size left out as one final batch.
"""

import numpy as np
from fairseq.data import data_utils

from .target import Patch

PATCH = Patch("last_batch", "fairseq-generate and validation silently skip up to 7 sentences (the last batch)")

fork_batch_by_size = None  # the fork's function, kept by apply()


def batch_by_size_keeping_tail(indices, *args, **kwargs):
    batches = fork_batch_by_size(indices, *args, **kwargs)
    covered = sum(len(b) for b in batches)
    if kwargs.get("fixed_shapes") is None and covered < len(indices):
        batched = np.concatenate(batches) if batches else np.zeros(0, dtype=np.int64)
        missing = np.asarray(indices)[~np.isin(indices, batched)]
        if len(missing):
            batches = list(batches) + [missing.astype(np.int64)]
    return batches


def installed() -> bool:
    return PATCH.installed(data_utils, "batch_by_size")


def check() -> None:
    PATCH.expect_fairseq()
    PATCH.expect_parameters(
        data_utils,
        "batch_by_size",
        "fairseq.data.data_utils",
        [
            "indices",
            "num_tokens_fn",
            "num_tokens_vec",
            "max_tokens",
            "max_sentences",
            "required_batch_size_multiple",
            "fixed_shapes",
        ],
    )


def apply() -> None:
    global fork_batch_by_size
    fork_batch_by_size = data_utils.batch_by_size
    PATCH.replace(data_utils, "batch_by_size", batch_by_size_keeping_tail)
    PATCH.log("replaced fairseq.data.data_utils.batch_by_size (keeps the last batch the fork drops)")
