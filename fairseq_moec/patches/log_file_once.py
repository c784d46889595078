"""Write each record once to --log-file, however many epochs a run trains.

Upstream behaviour (fairseq-fixed 0.12.3.1): ``fairseq.logging.progress_bar.progress_bar(..., log_file=F)`` adds a
new ``logging.FileHandler(F)`` to its module logger on every call, and fairseq-train calls it once per epoch: in
epoch N every progress record (train_inner, valid, train) is written N times to F, the file grows quadratically
with the epochs and the handlers' open files leak. We call fairseq's function, then keep the first FileHandler of
each file on that logger and close the others. The FileHandler fairseq-train adds to the logger
"fairseq_cli.train" (once, in main()) is another logger's and is left alone.
"""

import logging

from fairseq.logging import progress_bar

from .target import Patch

PATCH = Patch("log_file_once", "--log-file repeats each record of epoch N N times and leaks a file handler an epoch")

fairseq_progress_bar = None  # fairseq's progress_bar.progress_bar, kept by apply()


def close_repeated_file_handlers(logger: logging.Logger) -> None:
    """Keep the first FileHandler of each file on ``logger``; remove and close the later ones."""
    kept = set()
    for handler in list(logger.handlers):
        if not isinstance(handler, logging.FileHandler):
            continue
        if handler.baseFilename in kept:
            logger.removeHandler(handler)
            handler.close()
        else:
            kept.add(handler.baseFilename)


def progress_bar_with_one_file_handler(*args, **kwargs):
    bar = fairseq_progress_bar(*args, **kwargs)
    close_repeated_file_handlers(progress_bar.logger)
    return bar


def installed() -> bool:
    return PATCH.installed(progress_bar, "progress_bar")


def check() -> None:
    PATCH.expect_fairseq()
    PATCH.expect_parameters(
        progress_bar,
        "progress_bar",
        "fairseq.logging.progress_bar",
        [
            "iterator",
            "log_format",
            "log_interval",
            "log_file",
            "epoch",
            "prefix",
            "aim_repo",
            "aim_run_hash",
            "aim_param_checkpoint_dir",
            "tensorboard_logdir",
            "default_log_format",
            "wandb_project",
            "wandb_run_name",
            "azureml_logging",
        ],
    )
    PATCH.expect_attribute(progress_bar, "logger", "fairseq.logging.progress_bar")


def apply() -> None:
    global fairseq_progress_bar
    fairseq_progress_bar = progress_bar.progress_bar
    PATCH.replace(progress_bar, "progress_bar", progress_bar_with_one_file_handler)
    PATCH.log("replaced fairseq.logging.progress_bar.progress_bar (one FileHandler per --log-file, not one an epoch)")
