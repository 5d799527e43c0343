"""The part every comparison token mixer shares with BRA: projections, local context and grouped attention.

BiFormer's paper compares bi-level routing with other sparse patterns (global, local windows, axial
stripes, dilated windows, deformable points). To make that a comparison of *patterns* only, every
alternative here keeps BRA's parameters exactly: ``qkv.qkv`` (one Linear to [q | k | v] with ``qk_dim``
channels for q and k), ``lepe`` (the depth-wise conv on V, BRA's local context enhancement) and ``wo``
(the output Linear), created in BRA's order, with BRA's scale ``qk_dim ** -0.5``. A subclass only says
which keys each query sees (:meth:`ProjectedAttention._attend`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_feature_map, check_head_split, check_positive_int
from .lepe import make_lepe
from .qkv import QKVLinear


def attend_in_groups(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    num_heads: int,
    scale: float,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-head attention inside independent groups of tokens (windows, stripes, dilated grids).

    Heads are contiguous channel chunks of q, k and v (as in BRA).

    Args:
        query: (N, G, L, qk_dim), G groups of L queries.
        key: (N, G, S, qk_dim).
        value: (N, G, S, C).
        num_heads: heads; ``qk_dim`` and ``C`` must be divisible by it.
        scale: factor on the logits.
        labels: None, or int (G, L) labels of the tokens of each group (then S == L): a query attends only
            the keys with its own label. Padding gets a label of its own, so it is never attended by real
            tokens, while every query still sees at least itself (no empty softmax).

    Returns:
        (N, G, L, C).
    """
    batch, groups, length, qk_dim = query.shape
    keys, channels = key.shape[2], value.shape[-1]

    def heads(x: torch.Tensor) -> torch.Tensor:  # (N, G, T, c) -> (N*G, heads, T, c / heads)
        return x.reshape(batch * groups, x.shape[2], num_heads, x.shape[3] // num_heads).transpose(1, 2)

    mask = None
    if labels is not None:
        mask = (labels[:, :, None] == labels[:, None, :]).unsqueeze(1)  # (G, 1, L, L)
        mask = mask.expand(batch, groups, 1, length, keys).reshape(batch * groups, 1, length, keys)
    out = F.scaled_dot_product_attention(heads(query), heads(key), heads(value), attn_mask=mask, scale=scale)
    return out.transpose(1, 2).reshape(batch, groups, length, channels)  # (N, G, L, C)


def padding_labels(
    height: int, width: int, padded_height: int, padded_width: int, device: torch.device
) -> torch.Tensor:
    """An int (1, padded_height, padded_width, 1) map: 0 on the real tokens, -1 on the bottom/right padding."""
    labels = torch.full((1, padded_height, padded_width, 1), -1, dtype=torch.long, device=device)
    labels[:, :height, :width] = 0
    return labels


class ProjectedAttention(nn.Module):
    """Base of the comparison token mixers: BRA's projections and LCE around a subclass's token pattern.

    ``forward``: q, k, v = ``qkv(x)``; ``out = _attend(q | k | v)``, plus ``lepe(v)`` (the depth-wise conv
    on V laid out as an image, computed on the unpadded map), then ``wo``.

    Args:
        dim: channels of input and output.
        num_heads: heads (``dim`` and ``qk_dim`` must be divisible by it).
        qk_dim: channels of q and k (default ``dim``).
        qk_scale: attention scale (default ``qk_dim ** -0.5``, as BRA).
        side_dwconv: kernel of the local-context conv on V (0 disables it).

    Shapes: (N, H, W, dim) -> (N, H, W, dim) for any H, W >= 1.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qk_dim: int | None = None,
        qk_scale: float | None = None,
        side_dwconv: int = 5,
    ) -> None:
        super().__init__()
        self.dim = check_positive_int(dim, name="dim")
        self.num_heads = check_positive_int(num_heads, name="num_heads")
        self.qk_dim = check_positive_int(qk_dim or dim, name="qk_dim")
        check_head_split(self.dim, self.qk_dim, self.num_heads)
        if qk_scale is not None and not qk_scale > 0:
            raise ValueError(f"qk_scale: expected None or a positive number, got {qk_scale!r}")
        self.scale = qk_scale or self.qk_dim**-0.5
        # Parameter creation order fixes the state_dict order: lepe, qkv, wo (as BRA).
        self.lepe = make_lepe(dim, side_dwconv)
        self.qkv = QKVLinear(dim, self.qk_dim)
        self.wo = nn.Linear(dim, dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, qk_dim={self.qk_dim}, num_heads={self.num_heads}"

    def split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(..., 2 * qk_dim + C) -> q (..., qk_dim), k (..., qk_dim), v (..., C)."""
        return qkv.split([self.qk_dim, self.qk_dim, self.dim], dim=-1)

    def attend_groups(self, qkv_groups: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Attention inside groups: qkv (N, G, L, 2 * qk_dim + C), labels None or (G, L) -> (N, G, L, C)."""
        query, key, value = self.split_qkv(qkv_groups)
        return attend_in_groups(query, key, value, num_heads=self.num_heads, scale=self.scale, labels=labels)

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """The token pattern: (N, H, W, 2 * qk_dim + C) -> attention output (N, H, W, C)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) -> (N, H, W, C)."""
        check_feature_map(x, name=f"{type(self).__name__} input", layout="NHWC", channels=self.dim)
        qkv = self.qkv(x)  # (N, H, W, 2*qk_dim + C)
        out = self._attend(qkv)  # (N, H, W, C)
        if self.lepe is not None:
            value_image = qkv[..., 2 * self.qk_dim :].permute(0, 3, 1, 2)  # (N, C, H, W)
            out = out + self.lepe(value_image).permute(0, 2, 3, 1)
        return self.wo(out)


class GlobalAttention(ProjectedAttention):
    """Global multi-head attention (Vaswani et al., 2017; ViT, Dosovitskiy et al., ICLR 2021) with BRA's
    projections and LCE: every query attends every token of the map. Cost per query: H * W keys.

    This is BRA with ``topk = n_win ** 2`` (every region routed). The released models' last stage uses the
    reference :class:`~biformer.layers.AttentionLePE` instead (no q/k/v bias, LePE on the input, 8 heads).

    Shapes: (N, H, W, dim) -> (N, H, W, dim).
    """

    def _attend(self, qkv: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = qkv.shape
        groups = qkv.reshape(batch, 1, height * width, channels)  # (N, 1, H*W, 2*qk_dim + C)
        return self.attend_groups(groups).reshape(batch, height, width, self.dim)
