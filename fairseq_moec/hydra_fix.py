"""Let fairseq-hydra-train build legacy architectures whose options TransformerConfig does not declare.

fairseq's legacy ``TransformerModel.build_model`` turns its args into a ``TransformerConfig`` with
``TransformerConfig.from_namespace``, which copies every undeclared option from ``vars(args)``. Under
fairseq-hydra-train the args are an omegaconf ``DictConfig``, whose ``vars()`` are omegaconf's internals, not
its keys: every undeclared option is lost, and building a ``moec_transformer_*`` model fails with
``AttributeError: invalid argument moe_encoder_layers.`` Handing from_namespace a plain ``Namespace`` with the
same keys makes it copy them, as it does for fairseq-train's argparse args.
"""
import argparse

from fairseq.models.transformer import TransformerConfig
from omegaconf import DictConfig, OmegaConf

_fairseq_from_namespace = TransformerConfig.from_namespace.__func__


def _from_namespace_keeping_dictconfig_keys(cls, args):
    if isinstance(args, DictConfig):
        args = argparse.Namespace(**OmegaConf.to_container(args, resolve=True))
    return _fairseq_from_namespace(cls, args)


def keep_dictconfig_options() -> None:
    TransformerConfig.from_namespace = classmethod(_from_namespace_keeping_dictconfig_keys)
