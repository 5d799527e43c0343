"""The joint q | k | v projection of Bi-Level Routing Attention (the reference's ``qkv.qkv`` parameters)."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.linear import linear


class QKVLinear(nn.Module):
    """One Linear producing [q | k | v] channels: ``qk_dim`` for q, ``qk_dim`` for k, ``dim`` for v.

    Shapes: (..., dim) -> (..., 2 * qk_dim + dim).
    """

    def __init__(self, dim: int, qk_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.dim = dim
        self.qk_dim = qk_dim
        self.qkv = nn.Linear(dim, 2 * qk_dim + dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., dim) -> (..., 2 * qk_dim + dim)."""
        return linear(x, self.qkv)  # oneDNN's GEMM in CPU inference, fp32 or bf16 autocast (biformer.ops.linear)
