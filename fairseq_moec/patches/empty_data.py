"""Name the file when a binarized data split is empty.

Upstream behaviour (fairseq-fixed 0.12.3.1): an empty split binarizes to a zero-byte .bin file, which
``fairseq.data.data_utils.load_indexed_dataset`` fails to load with numpy's "cannot mmap an empty file", naming
no file. We raise a ConfigError that names the file and the split first (input_checks.refuse_empty_data).
"""

from fairseq.data import data_utils

from ..input_checks import refuse_empty_data
from .target import Patch

PATCH = Patch("empty_data", "an empty data split fails with 'cannot mmap an empty file', naming no file")

fairseq_load_indexed_dataset = None  # fairseq's function, kept by apply()


def load_indexed_dataset_refusing_empty_data(path, dictionary=None, dataset_impl=None, combine=False, default="cached"):
    refuse_empty_data(path, combine)
    return fairseq_load_indexed_dataset(path, dictionary, dataset_impl, combine, default)


def installed() -> bool:
    return PATCH.installed(data_utils, "load_indexed_dataset")


def check() -> None:
    PATCH.expect_fairseq()
    PATCH.expect_parameters(
        data_utils,
        "load_indexed_dataset",
        "fairseq.data.data_utils",
        ["path", "dictionary", "dataset_impl", "combine", "default"],
    )


def apply() -> None:
    global fairseq_load_indexed_dataset
    fairseq_load_indexed_dataset = data_utils.load_indexed_dataset
    PATCH.replace(data_utils, "load_indexed_dataset", load_indexed_dataset_refusing_empty_data)
    PATCH.log("replaced fairseq.data.data_utils.load_indexed_dataset (names an empty data file)")
