"""Reusable layers: one concept per file."""

from .attention_lepe import AttentionLePE, AttentionLePENCHW
from .axial_attention import AxialStripeAttention
from .bra import BiLevelRoutingAttention
from .bra_nchw import BiLevelRoutingAttentionNCHW
from .deformable_attention import DeformableAttention
from .dilated_attention import DilatedAttention
from .projected_attention import GlobalAttention, ProjectedAttention
from .qkv import QKVLinear
from .token_mixers import ATTENTION_TYPES, TOKEN_MIXERS, build_token_mixer, choose_token_mixer, stage_token_mixer
from .window_attention import WindowAttention

__all__ = [
    "ATTENTION_TYPES",
    "AttentionLePE",
    "AttentionLePENCHW",
    "AxialStripeAttention",
    "BiLevelRoutingAttention",
    "BiLevelRoutingAttentionNCHW",
    "DeformableAttention",
    "DilatedAttention",
    "GlobalAttention",
    "ProjectedAttention",
    "QKVLinear",
    "TOKEN_MIXERS",
    "WindowAttention",
    "build_token_mixer",
    "choose_token_mixer",
    "stage_token_mixer",
]
