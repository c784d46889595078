"""fairseq_moec: Mixture of Expert Clusters (MoEC) Transformers for fairseq (use with --user-dir fairseq_moec).

Importing registers the ``moec_transformer`` model and its architectures, the
``moec_label_smoothed_cross_entropy`` criterion, the ``translation_moec`` task and the ``torch_adam`` optimizer,
lets fairseq checkpoints load under torch's weights_only unpickler, restores upstream fairseq's batching (see batching_fix), lets
torchrun drive fairseq-train on CPU (torchrun_fix), lets fairseq-train --bf16 run on GPUs/CPUs (bf16_fix), lets
fairseq-hydra-train build the moec_transformer_* architectures (hydra_fix) and teaches fairseq's Trainer expert
parallelism (expert_parallel: gradients, gradient norm, per-process checkpoints, atomic checkpoint copies). It refuses
unusable inputs before training (input_checks: a fresh start over existing checkpoints, unreadable checkpoints,
empty data files) and has the fairseq commands print bad flags and files as one line (cli_errors).
"""
from .batching_fix import build_batches_as_in_first_epoch, keep_last_batches
from .bf16_fix import allow_bf16_without_tpu
from .checkpoint_safety import allow_fairseq_checkpoint_globals
from .cli_errors import print_config_errors_as_one_line
from .expert_parallel import install_trainer_hooks
from .hydra_fix import keep_dictconfig_options
from .input_checks import install_input_checks
from .torchrun_fix import fix_torchrun_on_cpu

allow_fairseq_checkpoint_globals()
allow_bf16_without_tpu()
keep_last_batches()
build_batches_as_in_first_epoch()
fix_torchrun_on_cpu()
keep_dictconfig_options()
install_trainer_hooks()
install_input_checks()
print_config_errors_as_one_line()

from . import criterions, models, optim, tasks  # noqa: E402,F401  (registration)
