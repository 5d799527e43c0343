"""Plain multi-head self-attention with a LePE conv: the last stage of every released BiFormer."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_feature_map, check_head_split, check_positive_int
from ..ops.attention_form import explicit_attention_is_faster
from ..ops.depthwise import depthwise_nhwc
from ..ops.linear import linear
from .lepe import make_lepe


def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """(N, heads, L, d) x3 -> (N, heads, L, d).

    On CPU in bf16 (autocast) with a gradient, the explicit form ``softmax((q @ k^T) * scale) @ v`` (the authors'
    own): SDPA's bf16 backward is slow there (biformer_small's stage 4, batch 8, forward + backward: 1.38x
    faster explicit; the attention alone 3.4x). Everywhere else SDPA: faster in inference (fp32 and bf16), level
    in fp32 training (0.99-1.01x at the stage), and the fused kernels on GPUs.
    """
    if explicit_attention_is_faster(query, key, value):
        scores = torch.matmul(query, key.transpose(-2, -1)) * scale  # (N, heads, L, L)
        return torch.matmul(scores.softmax(dim=-1), value)
    return F.scaled_dot_product_attention(query, key, value, scale=scale)


class _GlobalAttentionLePE(nn.Module):
    """The parameters both layouts share: ``qkv`` and ``proj`` projections (Linear for NHWC, 1x1 conv for NCHW),
    the per-head scale ``(dim / num_heads) ** -0.5`` unless ``qk_scale`` is given, and the LePE conv."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_scale: float | None = None,
        side_dwconv: int = 5,
    ) -> None:
        super().__init__()
        self.dim = check_positive_int(dim, name="dim")
        self.num_heads = check_positive_int(num_heads, name="num_heads")
        check_head_split(dim, None, num_heads)
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = self._projection(dim, 3 * dim, qkv_bias)
        self.proj = self._projection(dim, dim, True)
        self.lepe = make_lepe(dim, side_dwconv)

    @staticmethod
    def _projection(in_channels: int, out_channels: int, bias: bool) -> nn.Module:
        raise NotImplementedError


class AttentionLePE(_GlobalAttentionLePE):
    """Global attention on NHWC maps; LePE (depth-wise conv) on the attention *input* is added.

    Reference ``AttentionLePE``: ``qkv`` Linear without bias, per-head scale ``(dim / num_heads) ** -0.5``,
    ``proj`` Linear. With ``side_dwconv=0`` it is the reference's plain ``Attention``.

    Shapes: (N, H, W, dim) -> (N, H, W, dim).
    """

    @staticmethod
    def _projection(in_channels: int, out_channels: int, bias: bool) -> nn.Module:
        return nn.Linear(in_channels, out_channels, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) -> (N, H, W, C)."""
        check_feature_map(x, name="AttentionLePE input", layout="NHWC", channels=self.dim)
        batch, height, width, channels = x.shape
        head_dim = channels // self.num_heads
        qkv = linear(x, self.qkv).view(batch, height * width, 3, self.num_heads, head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (N, heads, H*W, d)
        out = _attention(query, key, value, self.scale)
        out = out.transpose(1, 2).reshape(batch, height, width, channels)  # (N, H, W, C)
        if self.lepe is not None:
            out = out + depthwise_nhwc(x, self.lepe)  # the fused depth-wise kernel in CPU inference
        return linear(out, self.proj)


class AttentionLePENCHW(_GlobalAttentionLePE):
    """Global attention on NCHW maps with 1x1-conv projections; LePE on V (reference ``nchwAttentionLePE``).

    Shapes: (N, dim, H, W) -> (N, dim, H, W).
    """

    @staticmethod
    def _projection(in_channels: int, out_channels: int, bias: bool) -> nn.Module:
        return nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W)."""
        check_feature_map(x, name="AttentionLePENCHW input", layout="NCHW", channels=self.dim)
        batch, channels, height, width = x.shape
        head_dim = channels // self.num_heads
        query, key, value = self.qkv(x).chunk(3, dim=1)  # 3 x (N, C, H, W)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(batch, self.num_heads, head_dim, height * width).transpose(-1, -2)

        out = _attention(heads(query), heads(key), heads(value), self.scale)  # (N, heads, H*W, d)
        out = out.transpose(-1, -2).reshape(batch, channels, height, width)
        if self.lepe is not None:
            out = out + self.lepe(value)
        return self.proj(out)
