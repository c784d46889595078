"""Let fairseq-hydra-train build legacy architectures whose options TransformerConfig does not declare.

Upstream behaviour (fairseq-fixed 0.12.3.1): fairseq's legacy ``TransformerModel.build_model`` turns its args into
a ``TransformerConfig`` with ``TransformerConfig.from_namespace``, which copies every undeclared option from
``vars(args)``. Under fairseq-hydra-train the args are an omegaconf ``DictConfig``, whose ``vars()`` are
omegaconf's internals, not its keys: every undeclared option is lost, and building a ``moec_transformer_*`` model
fails with ``AttributeError: invalid argument moe_encoder_layers.`` Handing from_namespace a plain ``Namespace``
with the same keys makes it copy them, as it does for fairseq-train's argparse args.
"""

import argparse

from fairseq.models.transformer import TransformerConfig
from omegaconf import DictConfig, OmegaConf

from .target import Patch

PATCH = Patch("hydra_legacy_arch", "fairseq-hydra-train cannot build the moec_transformer_* architectures")

fairseq_from_namespace = None  # fairseq's function (the classmethod's __func__), kept by apply()


def from_namespace_keeping_dictconfig_keys(cls, args):
    if isinstance(args, DictConfig):
        args = argparse.Namespace(**OmegaConf.to_container(args, resolve=True))
    return fairseq_from_namespace(cls, args)


def installed() -> bool:
    return PATCH.installed(TransformerConfig, "from_namespace")


def check() -> None:
    PATCH.expect_fairseq()
    where = "fairseq.models.transformer.TransformerConfig"
    if not isinstance(TransformerConfig.__dict__.get("from_namespace"), classmethod):
        raise PATCH.refuse(
            f"{where}.from_namespace as a classmethod", repr(TransformerConfig.__dict__.get("from_namespace"))
        )
    PATCH.expect_parameters(TransformerConfig, "from_namespace", where, ["cls", "args"])


def apply() -> None:
    global fairseq_from_namespace
    fairseq_from_namespace = TransformerConfig.from_namespace.__func__
    PATCH.replace(TransformerConfig, "from_namespace", classmethod(from_namespace_keeping_dictconfig_keys))
    PATCH.log("replaced fairseq.models.transformer.TransformerConfig.from_namespace (copies a DictConfig's keys)")
