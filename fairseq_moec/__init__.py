"""fairseq_moec: Mixture of Expert Clusters (MoEC) Transformers for fairseq (use with --user-dir fairseq_moec).

Importing registers the ``moec_transformer`` model and its architectures, the
``moec_label_smoothed_cross_entropy`` criterion and the ``translation_moec`` task, lets fairseq checkpoints
load under torch's weights_only unpickler, and restores upstream fairseq's batching (see batching_fix).
"""
from .batching_fix import keep_last_batches
from .checkpoint_safety import allow_fairseq_checkpoint_globals

allow_fairseq_checkpoint_globals()
keep_last_batches()

from . import criterions, models, tasks  # noqa: E402,F401  (registration)
