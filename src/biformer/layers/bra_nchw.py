"""The authors' refactored NCHW Bi-Level Routing Attention (``nchwBRA``), used by ``biformer_stl_nchw``."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_feature_map, check_head_split, check_positive_int, check_topk_fits
from ..ops.backends import BackendChoice, resolve_backend, runs_whole_batch
from ..ops.functional import routed_attention
from ..ops.regions import image_to_regions, pad_bottom_right, regions_to_image
from ..ops.routing import route_regions
from .lepe import make_lepe


class BiLevelRoutingAttentionNCHW(BackendChoice, nn.Module):
    """BRA on NCHW maps with the refactored semantics of the reference's ``nchwBRA``.

    Differences from :class:`~biformer.layers.BiLevelRoutingAttention` (kept for checkpoint parity):
    regions have a fixed size ``(H // n_win, W // n_win)`` (at least 1), so the region grid is
    ``ceil(H / region_h)`` x ``ceil(W / region_w)`` and may differ from ``n_win``; region means exclude
    padding; routing logits are unscaled; q/k/v are zero-padded *after* the projection (padded keys are
    not masked, as in the reference); the token-attention scale is ``dim ** -0.5``; LePE is applied to V.
    ``topk`` larger than the region count (tiny maps) is clamped to the region count.

    Shapes: input (N, dim, H, W) -> output (N, dim, H, W); with ``return_routing=True`` also
    int64 (N, grid_h * grid_w, topk).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        n_win: int = 7,
        qk_scale: float | None = None,
        topk: int = 4,
        side_dwconv: int = 3,
        auto_pad: bool = False,
        backend: str | None = None,
    ) -> None:
        super().__init__()
        del auto_pad  # ignored by the reference: this layer always pads
        self.dim = check_positive_int(dim, name="dim")
        self.num_heads = check_positive_int(num_heads, name="num_heads")
        check_head_split(dim, None, num_heads)
        self.n_win = check_positive_int(n_win, name="n_win")
        self.topk = check_positive_int(topk, name="topk")
        check_topk_fits(topk, n_win)
        if qk_scale is not None and not qk_scale > 0:
            raise ValueError(f"qk_scale: expected None or a positive number, got {qk_scale!r}")
        self.scale = qk_scale or dim**-0.5
        self.backend = backend  # checked by BackendChoice
        self.routing_sink: tuple[dict, str] | None = None  # set by biformer.record_routing
        self.lepe = make_lepe(dim, side_dwconv)
        self.qkv_linear = nn.Conv2d(dim, 3 * dim, kernel_size=1)
        self.output_linear = nn.Conv2d(dim, dim, kernel_size=1)

    @property
    def needs_whole_batch(self) -> bool:
        """Whether a call must see the whole batch (a model may not split it into groups of images): its backend
        keeps the authors' whole-batch data flow (``reference``) or its routing is being recorded (per call)."""
        return self.routing_sink is not None or runs_whole_batch(self.backend)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, n_win={self.n_win}, topk={self.topk}"

    def forward(
        self, x: torch.Tensor, return_routing: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(N, C, H, W) -> (N, C, H, W) [, topk_index (N, grid_h * grid_w, topk)]."""
        check_feature_map(x, name="BiLevelRoutingAttentionNCHW input", layout="NCHW", channels=self.dim)
        height, width = x.shape[2], x.shape[3]
        region_h, region_w = max(height // self.n_win, 1), max(width // self.n_win, 1)

        qkv = self.qkv_linear(x)  # (N, 3C, H, W)
        query, key, value = qkv.chunk(3, dim=1)
        pool = dict(kernel_size=(region_h, region_w), ceil_mode=True, count_include_pad=False)
        query_regions = F.avg_pool2d(query.detach(), **pool)  # (N, C, grid_h, grid_w)
        key_regions = F.avg_pool2d(key.detach(), **pool)
        grid_h, grid_w = query_regions.shape[-2:]
        topk = min(self.topk, grid_h * grid_w)
        topk_index = route_regions(
            query_regions.flatten(2).transpose(1, 2), key_regions.flatten(2).transpose(1, 2), topk, 1.0
        )  # (N, grid_h * grid_w, topk)

        qkv_nhwc, _, _ = pad_bottom_right(qkv.permute(0, 2, 3, 1), region_h, region_w)  # (N, H', W', 3C)
        qkv_regions = image_to_regions(qkv_nhwc, grid_h, grid_w)  # (N, R, h*w, 3C)
        backend = resolve_backend(  # once per forward: the op runs the resolved backend as given
            self.backend, num_regions=qkv_regions.shape[1], topk=topk, tokens_per_region=qkv_regions.shape[2],
            device=x.device, needs_grad=torch.is_grad_enabled() and qkv_regions.requires_grad, dtype=qkv.dtype,
            head_dim=self.dim // self.num_heads,
        )
        out = routed_attention(
            qkv_regions[..., : self.dim],
            qkv_regions[..., self.dim :],
            topk_index,
            num_heads=self.num_heads,
            scale=self.scale,
            backend=backend,
            check_index=False,  # from topk: valid by construction
        )  # (N, R, h*w, C)
        out = regions_to_image(out, grid_h, grid_w, region_h, region_w)[:, :height, :width]  # (N, H, W, C)
        out = out.permute(0, 3, 1, 2)  # (N, C, H, W)
        if self.lepe is not None:
            out = out + self.lepe(value)
        out = self.output_linear(out)
        if self.routing_sink is not None:
            records, name = self.routing_sink
            records[name] = topk_index.detach()
        return (out, topk_index) if return_routing else out
