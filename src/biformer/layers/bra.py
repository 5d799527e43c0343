"""Bi-Level Routing Attention (BRA), NHWC, parameter-compatible with the reference ``BiLevelRoutingAttention``."""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .._checks import check_feature_map, check_head_split, check_positive_int, check_topk_fits, check_unsupported
from ..ops.backends import REGION_LAYOUT, Backend, BackendChoice, resolve_backend, runs_whole_batch
from ..ops.depthwise import depthwise_nhwc
from ..ops.functional import routed_attention, routed_attention_heads
from ..ops.linear import linear
from ..ops.qkv_heads import qkv_to_heads
from ..ops.regions import (
    head_region_means,
    head_regions_to_image,
    image_to_regions,
    is_symbolic,
    pad_bottom_right,
    regions_to_image,
)
from ..ops.routing import route_projection, route_regions
from .lepe import make_lepe
from .qkv import QKVLinear


class BiLevelRoutingAttention(BackendChoice, nn.Module):
    """Bi-Level Routing Attention on NHWC maps (Zhu et al., CVPR 2023).

    The map is split into ``n_win`` x ``n_win`` regions. Each query region picks the ``topk`` key regions
    whose mean key best matches its mean query; its tokens then attend to the tokens of those regions.
    A depth-wise conv on V (local context enhancement) is added before the output projection.

    Args:
        dim: channels of input and output.
        num_heads: attention heads (``dim`` and ``qk_dim`` must be divisible by it).
        n_win: regions per side.
        qk_dim: channels of q and k (default ``dim``).
        qk_scale: attention and routing scale (default ``qk_dim ** -0.5``, the full qk_dim as in the
            reference, not the per-head dim).
        topk: routed regions per query region, 1 <= topk <= n_win ** 2.
        side_dwconv: kernel of the local-context conv (0 disables it).
        auto_pad: zero-pad the input at the bottom/right to multiples of ``n_win`` before the projection
            (the reference's semantics) and crop the output; otherwise H and W must be multiples of n_win.
        backend: attention backend (see :func:`biformer.ops.available_backends`), None for the default.
        region_size: if set, regions of ``region_size`` x ``region_size`` tokens instead of ``n_win`` regions
            per side: the grid follows the input (``ceil(H / region_size)`` x ``ceil(W / region_size)``), so
            the cost per query stays constant as images grow. The map is padded as with ``auto_pad``;
            ``topk`` is clamped to the number of regions. Off by default (checkpoint parity).

    The reference's remaining keyword arguments (``kv_downsample_mode`` ...) are accepted with the values
    the released models use; other values raise ``NotImplementedError``.

    Shapes: input (N, H, W, dim) -> output (N, H, W, dim); with ``return_routing=True`` also the routed
    region indices, int64 (N, n_win ** 2, topk), region id = grid_row * n_win + grid_col.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        n_win: int = 7,
        qk_dim: int | None = None,
        qk_scale: float | None = None,
        topk: int = 4,
        side_dwconv: int = 3,
        auto_pad: bool = False,
        backend: str | None = None,
        region_size: int | None = None,
        *,
        kv_per_win: int = 4,
        kv_downsample_ratio: int = 4,
        kv_downsample_kernel: int | None = None,
        kv_downsample_mode: str = "identity",
        param_attention: str = "qkvo",
        param_routing: bool = False,
        diff_routing: bool = False,
        soft_routing: bool = False,
    ) -> None:
        super().__init__()
        del kv_per_win, kv_downsample_ratio, kv_downsample_kernel  # only used by kv downsampling modes
        check_unsupported("kv_downsample_mode", kv_downsample_mode, "identity")
        check_unsupported("param_attention", param_attention, "qkvo")
        check_unsupported("param_routing", param_routing, False)
        check_unsupported("diff_routing", diff_routing, False)
        check_unsupported("soft_routing", soft_routing, False)
        self.dim = check_positive_int(dim, name="dim")
        self.num_heads = check_positive_int(num_heads, name="num_heads")
        self.n_win = check_positive_int(n_win, name="n_win")
        self.qk_dim = check_positive_int(dim if qk_dim is None else qk_dim, name="qk_dim")
        check_head_split(self.dim, self.qk_dim, self.num_heads)
        self.topk = check_positive_int(topk, name="topk")
        self.region_size = None if region_size is None else check_positive_int(region_size, name="region_size")
        if region_size is None:
            check_topk_fits(topk, n_win)
        finite = isinstance(qk_scale, (int, float)) and not isinstance(qk_scale, bool) and math.isfinite(qk_scale)
        if qk_scale is not None and not (finite and qk_scale > 0):
            raise ValueError(f"qk_scale: expected None or a positive finite number, got {qk_scale!r}")
        self.scale = qk_scale or self.qk_dim**-0.5
        self.auto_pad = bool(auto_pad)
        self.backend = backend  # checked by BackendChoice
        self.routing_sink: tuple[dict, str] | None = None  # set by biformer.record_routing
        # Parameter creation order fixes the state_dict order: lepe, qkv, wo (as the reference).
        self.lepe = make_lepe(dim, side_dwconv)
        self.qkv = QKVLinear(dim, self.qk_dim)
        self.wo = nn.Linear(dim, dim)

    @property
    def needs_whole_batch(self) -> bool:
        """Whether a call must see the whole batch (a model may not split it into groups of images): its backend
        keeps the authors' whole-batch data flow (``reference``) or its routing is being recorded (per call)."""
        return self.routing_sink is not None or runs_whole_batch(self.backend)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, qk_dim={self.qk_dim}, num_heads={self.num_heads}, n_win={self.n_win}, "
            f"topk={self.topk}, auto_pad={self.auto_pad}, backend={self.backend}"
            + (f", region_size={self.region_size}" if self.region_size else "")
        )

    def _check_size(self, height: int, width: int) -> None:
        if height % self.n_win or width % self.n_win:
            raise ValueError(
                f"BiLevelRoutingAttention input: H and W must be multiples of n_win={self.n_win} "
                f"when auto_pad=False, got H={height}, W={width}; pass auto_pad=True to pad"
            )

    def _pad_to_grid(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Pad (or check) the NHWC map for the region grid; returns the map and the grid size."""
        if self.region_size is not None:
            x, _, _ = pad_bottom_right(x, self.region_size, self.region_size)
            return x, x.shape[1] // self.region_size, x.shape[2] // self.region_size
        if self.auto_pad:
            x, _, _ = pad_bottom_right(x, self.n_win, self.n_win)
        else:
            self._check_size(x.shape[1], x.shape[2])
        return x, self.n_win, self.n_win

    def _grid_topk(self, grid_h: int, grid_w: int) -> int:
        # A symbolic grid (fixed region_size, exported with dynamic H and W) keeps topk the constant self.topk:
        # the graph then needs at least topk regions (its TopK raises otherwise), never a size-dependent k.
        symbolic_grid = isinstance(grid_h, torch.SymInt) or isinstance(grid_w, torch.SymInt)
        return self.topk if symbolic_grid else min(self.topk, grid_h * grid_w)

    def _resolve(self, x: torch.Tensor, dtype: torch.dtype, grid_h: int, grid_w: int, topk: int) -> Backend:
        """The backend of a forward on the padded map ``x`` whose projection has ``dtype``."""
        region_h, region_w = x.shape[1] // grid_h, x.shape[2] // grid_w
        return resolve_backend(
            self.backend, num_regions=grid_h * grid_w, topk=topk, tokens_per_region=region_h * region_w,
            device=x.device, needs_grad=torch.is_grad_enabled() and (x.requires_grad or self.wo.weight.requires_grad),
            dtype=dtype, head_dim=max(self.qk_dim, self.dim) // self.num_heads,
        )

    def backend_for(self, x: torch.Tensor) -> str:
        """The name of the backend a forward on ``x`` (N, H, W, dim) runs here and now: the layer's ``backend``,
        or what ``auto`` picks for this map size, device, dtype (autocast included) and gradient mode.

        Computes only the projection of one token (for its dtype), not the attention.
        """
        check_feature_map(x, name="BiLevelRoutingAttention input", layout="NHWC", channels=self.dim)
        x, grid_h, grid_w = self._pad_to_grid(x)
        dtype = self.qkv(x[:1, :1, :1]).dtype
        return self._resolve(x, dtype, grid_h, grid_w, self._grid_topk(grid_h, grid_w)).name

    def forward(
        self, x: torch.Tensor, return_routing: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(N, H, W, C) -> (N, H, W, C) [, topk_index (N, grid_h * grid_w, topk)]; the grid is n_win x n_win
        unless ``region_size`` is set."""
        check_feature_map(x, name="BiLevelRoutingAttention input", layout="NHWC", channels=self.dim)
        height, width = x.shape[1], x.shape[2]
        x, grid_h, grid_w = self._pad_to_grid(x)
        topk = self._grid_topk(grid_h, grid_w)
        qkv = self.qkv(x)  # (N, H, W, 2*qk_dim + C)
        backend = self._resolve(x, qkv.dtype, grid_h, grid_w, topk)  # once per forward, handed down as resolved
        if backend.image_function is not None and backend.runs_on(qkv):
            attend = self._attend_image_layout
        elif backend.layout == REGION_LAYOUT:
            attend = self._attend_region_layout
        else:
            attend = self._attend_head_layout
        out, topk_index = attend(qkv, grid_h, grid_w, topk, backend)  # (N, H, W, C) attention + LCE
        out = linear(out, self.wo)
        if is_symbolic(height, width):
            # Crop with a copy (index_select): a slice would make the graph assume there was padding.
            out = out.index_select(1, torch.arange(height, device=out.device))
            out = out.index_select(2, torch.arange(width, device=out.device))
        elif out.shape[1] != height or out.shape[2] != width:
            out = out[:, :height, :width, :].contiguous()
        if self.routing_sink is not None:
            records, name = self.routing_sink
            records[name] = topk_index.detach()
        return (out, topk_index) if return_routing else out

    def _local_context(self, value: torch.Tensor) -> torch.Tensor | None:
        """The LCE conv on V laid out as an image: (N, H, W, C) (a channel slice of the projection is fine) ->
        contiguous (N, H, W, C); in CPU inference one pass of the fused depth-wise kernel
        (:func:`~biformer.ops.depthwise.depthwise_nhwc`)."""
        if self.lepe is None:
            return None
        return depthwise_nhwc(value, self.lepe)

    def _attend_region_layout(
        self, qkv: torch.Tensor, grid_h: int, grid_w: int, topk: int, backend: Backend
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's data flow (regions of tokens, channels last): used by the ``reference`` backend."""
        region_h, region_w = qkv.shape[1] // grid_h, qkv.shape[2] // grid_w
        qkv_regions = image_to_regions(qkv, grid_h, grid_w)  # (N, S*S, h*w, 2*qk_dim + C)
        query = qkv_regions[..., : self.qk_dim]  # (N, S*S, h*w, qk_dim)
        key_value = qkv_regions[..., self.qk_dim :]  # (N, S*S, h*w, qk_dim + C)
        topk_index = route_regions(
            query.mean(dim=2), key_value[..., : self.qk_dim].mean(dim=2), topk, self.scale
        )  # (N, S*S, topk)
        out = routed_attention(
            query, key_value, topk_index, num_heads=self.num_heads, scale=self.scale, backend=backend,
            check_index=False,
        )  # (N, S*S, h*w, C)
        out = regions_to_image(out, grid_h, grid_w, region_h, region_w)  # (N, H, W, C)
        local_context = self._local_context(qkv[..., 2 * self.qk_dim :])
        return (out if local_context is None else out + local_context), topk_index

    def _attend_image_layout(
        self, qkv: torch.Tensor, grid_h: int, grid_w: int, topk: int, backend: Backend
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The fused data flow (``cpu_fused``): the routing from one pass over the projection's q and k, then
        the backend's ``image_function`` reads q, k, v where they lie and writes the attention output plus the LCE
        of V in image order (no head-major copy)."""
        topk_index = route_projection(qkv, grid_h, grid_w, self.qk_dim, topk, self.scale)  # (N, R, topk)
        geometry = dict(grid_h=grid_h, grid_w=grid_w, num_heads=self.num_heads, qk_dim=self.qk_dim, scale=self.scale)
        if backend.fuses_local_conv is not None and backend.fuses_local_conv(self.lepe):
            out = backend.image_function(qkv, topk_index, None, local_conv=self.lepe, **geometry)  # (N, H, W, C)
        else:
            out = backend.image_function(qkv, topk_index, self._local_context(qkv[..., 2 * self.qk_dim :]), **geometry)
        return out, topk_index

    def _attend_head_layout(
        self, qkv: torch.Tensor, grid_h: int, grid_w: int, topk: int, backend: Backend
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The fast data flow: one copy of q, k, v into head-major regions
        (:func:`~biformer.ops.qkv_heads.qkv_to_heads`), the output added to the LCE map in the same pass that
        puts it back in image order."""
        region_h, region_w = qkv.shape[1] // grid_h, qkv.shape[2] // grid_w
        query, key, value, value_image = qkv_to_heads(
            qkv, grid_h, grid_w, self.num_heads, self.qk_dim, with_image_value=self.lepe is not None
        )  # (heads, N, R, L, d) x3, V as (N, H, W, C) for the LCE conv
        topk_index = route_regions(head_region_means(query), head_region_means(key), topk, self.scale)  # (N, R, topk)
        out = routed_attention_heads(query, key, value, topk_index, scale=self.scale, backend=backend,
                                     check_index=False)  # from topk: valid by construction
        local_context = None if value_image is None else self._local_context(value_image)
        out = head_regions_to_image(out, grid_h, grid_w, region_h, region_w, add_to=local_context)  # (N, H, W, C)
        return out, topk_index
