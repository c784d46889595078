"""moec_transformer: fairseq's Transformer with MoEC layers in place of chosen FFN blocks."""

from contextvars import ContextVar

import torch.nn as nn
from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer import TransformerConfig, TransformerDecoder, TransformerEncoder, TransformerModel
from fairseq.models.transformer.transformer_legacy import (
    base_architecture,
    transformer_iwslt_de_en,
    transformer_wmt_en_de,
    transformer_wmt_en_de_big,
)
from fairseq.modules.transformer_layer import TransformerDecoderLayerBase, TransformerEncoderLayerBase

from ..expert_parallel import expert_parallel_for, local_view, prepare_for_expert_parallel
from ..input_checks import parameters_do_not_fit
from ..modules import MoEConfig, MoELayer
from .options import MoEPlacement, add_dataclass_args, fill_defaults, moe_layer_indices, validate

DECODER_LAYER_ID_OFFSET = 1000  # cluster-dropout masks are seeded per layer: encoder i -> i, decoder i -> 1000 + i

# The expert-parallel placement of the model being built: fairseq's builders take no extra arguments, and a
# process group must not go into ``args`` (they are saved in checkpoints).
_BUILDING_EXPERT_PARALLEL: ContextVar = ContextVar("expert_parallel", default=None)


class MoEFFNSlot(nn.Module):
    """Sits in fairseq's ``fc1`` slot. fairseq's layer computes fc2(dropout(activation(fc1(x)))); in a MoE
    layer activation, dropout and fc2 become identities, so this slot is the whole FFN block. The layer sets
    ``padding_mask`` (T x B, True at padding) just before each forward so routing skips padding."""

    def __init__(self, moe: MoELayer):
        super().__init__()
        self.moe = moe
        self.padding_mask = None

    def forward(self, x):
        mask = self.padding_mask
        if mask is not None and mask.shape != x.shape[:-1]:
            mask = None  # e.g. a key mask of a longer span than the queries: nothing to drop here
        return self.moe(x, mask)


def _identity(x):
    return x


def _turn_into_moe(layer, moe: MoELayer) -> None:
    layer.fc1, layer.fc2 = MoEFFNSlot(moe), nn.Identity()
    layer.activation_fn, layer.activation_dropout_module = _identity, nn.Identity()


def _build_moe(args, cfg: TransformerConfig, side: str, layer_id: int) -> MoELayer:
    sub = cfg.encoder if side == "encoder" else cfg.decoder
    return MoELayer(
        MoEConfig.from_namespace(args),
        sub.embed_dim,
        sub.ffn_embed_dim,
        cfg.activation_fn,
        float(cfg.activation_dropout or cfg.relu_dropout or 0.0),
        layer_id,
        expert_parallel=_BUILDING_EXPERT_PARALLEL.get(),
    )


class MoECEncoderLayer(TransformerEncoderLayerBase):
    def __init__(self, cfg, moe: MoELayer):
        super().__init__(cfg)
        _turn_into_moe(self, moe)

    def forward(self, x, encoder_padding_mask, attn_mask=None):
        self.fc1.padding_mask = None if encoder_padding_mask is None else encoder_padding_mask.t()
        return super().forward(x, encoder_padding_mask, attn_mask)


class MoECDecoderLayer(TransformerDecoderLayerBase):
    def __init__(self, cfg, moe: MoELayer, no_encoder_attn=False):
        super().__init__(cfg, no_encoder_attn)
        _turn_into_moe(self, moe)

    def forward(self, x, *args, self_attn_padding_mask=None, **kwargs):
        self.fc1.padding_mask = None if self_attn_padding_mask is None else self_attn_padding_mask.t()
        return super().forward(x, *args, self_attn_padding_mask=self_attn_padding_mask, **kwargs)


class MoECTransformerEncoder(TransformerEncoder):
    def __init__(self, args, dictionary, embed_tokens):
        self._moe_indices, self._next_index = set(moe_layer_indices(args, "encoder")), iter(range(args.encoder_layers))
        super().__init__(args, dictionary, embed_tokens)

    def build_encoder_layer(self, args):
        i = next(self._next_index)
        if i not in self._moe_indices:
            return super().build_encoder_layer(args)
        cfg = TransformerConfig.from_namespace(args)
        return MoECEncoderLayer(cfg, _build_moe(args, cfg, "encoder", i))


class MoECTransformerDecoder(TransformerDecoder):
    def __init__(self, args, dictionary, embed_tokens, no_encoder_attn=False):
        self._moe_indices, self._next_index = set(moe_layer_indices(args, "decoder")), iter(range(args.decoder_layers))
        super().__init__(args, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn)

    def build_decoder_layer(self, args, no_encoder_attn=False):
        i = next(self._next_index)
        if i not in self._moe_indices:
            return super().build_decoder_layer(args, no_encoder_attn)
        cfg = TransformerConfig.from_namespace(args)
        return MoECDecoderLayer(cfg, _build_moe(args, cfg, "decoder", DECODER_LAYER_ID_OFFSET + i), no_encoder_attn)


@register_model("moec_transformer")
class MoECTransformerModel(TransformerModel):
    """Transformer whose chosen FFN blocks are MoEC layers (experts in clusters, cluster-level dropout)."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        add_dataclass_args(parser, MoEPlacement, MoEConfig)

    @classmethod
    def build_model(cls, args, task):
        moec_base_architecture(args)
        validate(args)
        ep = expert_parallel_for(args)  # None on one process (fairseq-generate, tests) or --moe-expert-parallel off
        building = _BUILDING_EXPERT_PARALLEL.set(ep)
        try:
            model = super().build_model(args, task)
        finally:
            _BUILDING_EXPERT_PARALLEL.reset(building)
        if ep is not None:
            prepare_for_expert_parallel(model, ep)
        return model

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        # a checkpoint with all experts loads into an expert-parallel model (each process takes its own), and
        # one shard of an expert-parallel checkpoint is refused with a clear message
        state_dict = local_view(self, state_dict)
        try:
            return super().load_state_dict(state_dict, strict, model_cfg, args)
        except RuntimeError as e:
            # torch's list of keys and shapes. The options were compared when the file was read, so this is most
            # often another dictionary (another data directory)
            if not str(e).startswith("Error(s) in loading state_dict"):
                raise
            raise parameters_do_not_fit(self.state_dict(), state_dict) from e

    @classmethod
    def build_encoder(cls, args, src_dict, embed_tokens):
        return MoECTransformerEncoder(args, src_dict, embed_tokens)

    @classmethod
    def build_decoder(cls, args, tgt_dict, embed_tokens):
        return MoECTransformerDecoder(args, tgt_dict, embed_tokens, no_encoder_attn=args.no_cross_attention)

    def moe_layers(self):
        """(name, MoELayer) for every MoE layer, e.g. ('enc3', ...), ('dec3', ...)."""
        out = []
        for side, stack in (("enc", self.encoder.layers), ("dec", self.decoder.layers)):
            for i, layer in enumerate(stack):
                if isinstance(getattr(layer, "fc1", None), MoEFFNSlot):
                    out.append((f"{side}{i}", layer.fc1.moe))
        return out


def _moec_arch(name, dense_arch, **moe_defaults):
    """Register moec_<name>: the dense preset's sizes plus MoE defaults (user flags win)."""

    @register_model_architecture("moec_transformer", name)
    def arch(args):
        defaults = dict(moe_defaults)
        if getattr(args, "moe_every", None):  # the user chose every-k placement: no preset layer lists
            defaults.pop("moe_encoder_layers", None), defaults.pop("moe_decoder_layers", None)
        fill_defaults(args, MoEPlacement, MoEConfig, **defaults)
        dense_arch(args)

    return arch


moec_base_architecture = _moec_arch(
    "moec_transformer", base_architecture, moe_encoder_layers="3", moe_decoder_layers="3"
)


def _tiny(args):
    args.encoder_embed_dim = getattr(args, "encoder_embed_dim", 64)
    args.encoder_ffn_embed_dim = getattr(args, "encoder_ffn_embed_dim", 128)
    args.encoder_layers = getattr(args, "encoder_layers", 2)
    args.encoder_attention_heads = getattr(args, "encoder_attention_heads", 2)
    args.decoder_layers = getattr(args, "decoder_layers", 2)
    args.decoder_attention_heads = getattr(args, "decoder_attention_heads", 2)
    base_architecture(args)


_moec_arch("moec_transformer_tiny", _tiny, moe_encoder_layers="1", moe_decoder_layers="1")
_moec_arch("moec_transformer_iwslt_de_en", transformer_iwslt_de_en, moe_encoder_layers="3", moe_decoder_layers="3")
_moec_arch("moec_transformer_wmt_en_de", transformer_wmt_en_de, moe_encoder_layers="3", moe_decoder_layers="3")
# The paper's MT setting: transformer-big, MoE at encoder and decoder layer 3, 64 experts in 8 clusters, each
# expert 3 stacked FFN sublayers.
_moec_arch(
    "moec_transformer_wmt_en_de_big",
    transformer_wmt_en_de_big,
    moe_encoder_layers="3",
    moe_decoder_layers="3",
    moe_expert_count=64,
    moe_clusters=8,
    moe_expert_sublayers=3,
)
