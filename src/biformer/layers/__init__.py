"""Reusable layers: one concept per file."""

from .attention_lepe import AttentionLePE, AttentionLePENCHW
from .axial_attention import AxialStripeAttention
from .bra import BiLevelRoutingAttention, QKVLinear
from .bra_nchw import BiLevelRoutingAttentionNCHW
from .deformable_attention import DeformableAttention
from .dilated_attention import DilatedAttention
from .projected_attention import GlobalAttention, ProjectedAttention
from .token_mixers import ATTENTION_TYPES, build_token_mixer
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
    "WindowAttention",
    "build_token_mixer",
]
