"""Reusable layers: one concept per file."""

from .attention_lepe import AttentionLePE, AttentionLePENCHW
from .bra import BiLevelRoutingAttention, QKVLinear
from .bra_nchw import BiLevelRoutingAttentionNCHW

__all__ = [
    "AttentionLePE",
    "AttentionLePENCHW",
    "BiLevelRoutingAttention",
    "BiLevelRoutingAttentionNCHW",
    "QKVLinear",
]
