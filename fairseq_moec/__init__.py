"""fairseq_moec: Mixture of Expert Clusters (MoEC) Transformers for fairseq (use with --user-dir fairseq_moec).

Importing registers the ``moec_transformer`` model and its architectures, the
``moec_label_smoothed_cross_entropy`` criterion, the ``translation_moec`` task and the ``torch_adam`` optimizer,
and applies the plugin's patches of fairseq's internals (fairseq_moec/patches/, one module per patch, each
checked against fairseq-fixed 0.12.3.1 before it replaces anything): fairseq checkpoints load under torch's
weights_only unpickler, upstream fairseq's batching is restored, torchrun drives fairseq-train on CPU,
fairseq-train --bf16 runs on GPUs/CPUs, fairseq-hydra-train builds the moec_transformer_* architectures, the
Trainer learns expert parallelism, checkpoints are copied atomically, unusable inputs are refused before training
(input_checks.py) and the fairseq commands print bad flags and files as one line.
"""

import logging

# Importing fairseq runs logging.basicConfig(level=DEBUG) (fairseq/models/wav2vec/wav2vec2_classification.py): a
# script that imports the plugin would print every library's DEBUG lines, and its own basicConfig would do nothing.
# Undo it when this import is the one that imports fairseq (the fairseq commands configure logging first).
_root = logging.getLogger()
_root_level, _root_handlers = _root.level, list(_root.handlers)

from . import patches  # noqa: E402  (imports fairseq)

for _handler in [h for h in _root.handlers if h not in _root_handlers]:
    _root.removeHandler(_handler)
_root.setLevel(_root_level)

patches.install()

from . import criterions, models, optim, tasks  # noqa: E402,F401  (registration)
