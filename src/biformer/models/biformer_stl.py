"""BiFormer in the Swin-T layout (``biformer_stl``, ``biformer_stl_nchw``): the paper's ablation models.

``BiFormerSTL`` follows the authors' ``models/biformer_stl.py`` (NHWC stages, legacy BRA);
``BiFormerSTLNCHW`` follows ``models/biformer_stl_nchw.py`` (NCHW throughout, refactored BRA, 1x1-conv
projections). Both have a patchify stem (4x4 conv), norm-then-conv patch merging, blocks without position
conv, and a final norm + average pool + linear head.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerNorm2d
from timm.models import register_model

from .._checks import check_positive_int
from ..layers import stage_token_mixer
from ..layers.token_mixers import NCHW_GLOBAL_LEPE_KERNEL
from ._base import checkpoint_filter_fn, default_cfgs, init_weights  # noqa: F401 (timm's register_model reads default_cfgs)
from ._pyramid import PyramidClassifier, build_pyramid_model, check_stage_list, run_blocks, stochastic_depth_rates

__all__ = ["BiFormerSTL", "BiFormerSTLNCHW"]

# Kernel of the last stage's LePE in BiFormerSTLNCHW (the authors' nchwAttentionLePE default, never overridden).
LAST_STAGE_LEPE_KERNEL = NCHW_GLOBAL_LEPE_KERNEL

_NORM_LAYERS: dict[str, Callable[[int], nn.Module]] = {"BatchNorm2d": nn.BatchNorm2d, "LayerNorm2d": LayerNorm2d}


def resolve_norm_layer(norm_layer: object) -> Callable[[int], nn.Module]:
    """A norm-layer class from a class or a name (``"torch.nn.BatchNorm2d"``, ``"LayerNorm2d"``, ...).

    Names are looked up in a fixed table (nothing is imported from the string).
    """
    if isinstance(norm_layer, str):
        name = norm_layer.rsplit(".", 1)[-1]
        if name not in _NORM_LAYERS:
            raise ValueError(f"norm_layer: expected one of {sorted(_NORM_LAYERS)} or a class, got {norm_layer!r}")
        return _NORM_LAYERS[name]
    if callable(norm_layer):
        return norm_layer
    raise ValueError(f"norm_layer: expected a norm-layer class or its name, got {norm_layer!r}")


class STLBlockNHWC(nn.Module):
    """``x + attn(norm1(x))`` then ``x + mlp(norm2(x))`` on NHWC maps (keys ``mlp.0``, ``mlp.2``)."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = attn
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, H, W, C) -> (N, H, W, C)."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class STLBlockNCHW(nn.Module):
    """The NCHW block: LayerNorm2d and a 1x1-conv MLP (keys ``mlp.0``, ``mlp.2``)."""

    def __init__(self, dim: int, attn: nn.Module, mlp_ratio: float, drop_path: float) -> None:
        super().__init__()
        hidden = int(mlp_ratio * dim)
        self.norm1 = LayerNorm2d(dim, eps=1e-6)
        self.attn = attn
        self.norm2 = LayerNorm2d(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Conv2d(dim, hidden, 1), nn.GELU(), nn.Conv2d(hidden, dim, 1))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W)."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class STLStage(nn.Module):
    """A stack of blocks (keys ``stages.i.blocks.j``); NCHW in and out, ``channels_last`` blocks inside."""

    grad_checkpointing = False

    def __init__(self, blocks: list[nn.Module], channels_last: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W)."""
        if self.channels_last:
            x = x.permute(0, 2, 3, 1)  # (N, H, W, C)
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
        return x.permute(0, 3, 1, 2) if self.channels_last else x


class _STLBase(PyramidClassifier):
    """Shared constructor of the two Swin-layout models (the arguments are listed in their docstrings).

    ``qk_scale`` is kept in the signature (the authors' constructors take it) but, as in their code, has no
    use: only None is accepted; any other value is refused in one line rather than silently ignored.
    """

    channels_last: bool
    layout: str  # of the blocks' token mixers (biformer.layers.choose_token_mixer)
    min_input_size = 32  # the 4x4 patchify stem and three 2x2 mergings need at least 32 px

    def __init__(
        self,
        in_chans: int = 3,
        num_classes: int = 1000,
        depth: list[int] | tuple[int, ...] = (2, 2, 6, 2),
        embed_dim: list[int] | tuple[int, ...] = (96, 192, 384, 768),
        head_dim: int = 32,
        qk_scale: float | None = None,
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        use_checkpoint_stages: list[int] | tuple[int, ...] = (),
        mlp_ratios: list[float] | tuple[float, ...] = (4, 4, 4, 4),
        norm_layer: object = "LayerNorm2d",
        pre_head_norm_layer: object = None,
        n_wins: int | list[int] | tuple[int, ...] = (7, 7, 7, 7),
        topks: int | list[int] | tuple[int, ...] = (1, 4, 16, -2),
        side_dwconv: int = 5,
        auto_pad: bool = False,
        backend: str | None = None,
        global_pool: str = "avg",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if qk_scale is not None:
            # The authors' BiFormerSTL / nchwBiFormerSTL take qk_scale but never pass it to their layers.
            raise ValueError(
                f"qk_scale: the Swin-layout models do not use it (the authors' layers keep their default scale); "
                f"expected None, got {qk_scale!r}"
            )
        depth = check_stage_list(depth, "depth")
        embed_dim = check_stage_list(embed_dim, "embed_dim")
        mlp_ratios = check_stage_list(mlp_ratios, "mlp_ratios")
        n_wins = check_stage_list([n_wins] * 4 if isinstance(n_wins, int) else n_wins, "n_wins")
        topks = check_stage_list([topks] * 4 if isinstance(topks, int) else topks, "topks")
        norm = resolve_norm_layer(norm_layer)
        self.in_chans = check_positive_int(in_chans, name="in_chans")
        head_dim = check_positive_int(head_dim, name="head_dim")
        self.embed_dim = embed_dim

        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_chans, embed_dim[0], kernel_size=4, stride=4), norm(embed_dim[0]))]
        )
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(norm(embed_dim[i]), nn.Conv2d(embed_dim[i], embed_dim[i + 1], kernel_size=2, stride=2))
            )
        rates = stochastic_depth_rates(depth, drop_path_rate)
        self.stages = nn.ModuleList()
        for i in range(4):
            blocks = [
                self._make_block(
                    embed_dim[i], stage_token_mixer(
                        embed_dim[i], topks[i], layout=self.layout, num_heads=embed_dim[i] // head_dim,
                        n_win=n_wins[i], side_dwconv=side_dwconv, auto_pad=auto_pad, backend=backend,
                    ), mlp_ratio=mlp_ratios[i], drop_path=rates[i][j],
                )
                for j in range(depth[i])
            ]
            stage = STLStage(blocks, channels_last=self.channels_last)
            stage.grad_checkpointing = i in use_checkpoint_stages
            self.stages.append(stage)
        self.norm = resolve_norm_layer(pre_head_norm_layer or norm)(embed_dim[-1])
        self._init_feature_info()
        self._init_head(num_classes, global_pool, drop_rate)
        self.apply(init_weights)
        self._place(device, dtype)

    def _make_block(self, dim: int, attn: nn.Module, *, mlp_ratio: float, drop_path: float) -> nn.Module:
        raise NotImplementedError


class BiFormerSTL(_STLBase):
    """Swin-T layout with the legacy NHWC BRA (reference ``BiFormerSTL``).

    ``topks``: > 0 BRA, -1 plain attention, -2 attention with LePE on its input (8 heads).
    ``auto_pad`` (an addition) pads BRA maps to multiples of ``n_win`` so any input size >= 32 px works.

    Args:
        in_chans: channels of the input images.
        num_classes: classes of the ``head`` Linear (0: no head, pooled features are returned).
        depth: blocks per stage.
        embed_dim: channels per stage.
        head_dim: channels per BRA head (stage ``i`` has ``embed_dim[i] // head_dim`` heads).
        qk_scale: only None (the authors' layers keep their default scale).
        drop_path_rate: stochastic depth, rising linearly from 0 to this over all blocks.
        drop_rate: dropout before the head.
        use_checkpoint_stages: stages whose blocks are re-computed in backward (gradient checkpointing).
        mlp_ratios: per stage, MLP hidden width over ``embed_dim``.
        norm_layer: norm of the stem and of the patch mergings: a class or its name (``"BatchNorm2d"``,
            ``"LayerNorm2d"``, ``"torch.nn.BatchNorm2d"``; looked up in a fixed table).
        pre_head_norm_layer: norm before the head (None: ``norm_layer``).
        n_wins: regions per side of each stage's BRA (one int for every stage, or a list of 4).
        topks: per stage, BRA's top-k (> 0) or -1 / -2 for 8-head global attention (one int or a list of 4);
            see :func:`~biformer.layers.choose_token_mixer`.
        side_dwconv: kernel of BRA's local-context conv and of the -2 attention's LePE (0 disables them).
        auto_pad: pad each BRA map to a multiple of ``n_win`` (then any input size >= 32 px works).
        backend: attention backend of every BRA (see :func:`biformer.ops.available_backends`); None: the default.
        global_pool: timm's pooling types, ``""`` for none.
        device: where the parameters are made.
        dtype: the floating-point type of the parameters.

    Shapes: (N, in_chans, H, W) -> (N, num_classes).
    """

    channels_last = True
    channels_last_memory = True  # NHWC stages: their permutes become free views
    layout = "NHWC"

    def _make_block(self, dim: int, attn: nn.Module, *, mlp_ratio: float, drop_path: float) -> nn.Module:
        return STLBlockNHWC(dim, attn, mlp_ratio, drop_path)


class BiFormerSTLNCHW(_STLBase):
    """Swin-T layout, all NCHW, with the refactored BRA (reference ``nchwBiFormerSTL``).

    ``topks``: > 0 BRA; -1 (or -2) attention with LePE on V (8 heads). Any input size >= 32 px works.
    ``side_dwconv`` sets the BRA stages' local-context kernel only: the plain-attention stage's LePE is always
    5x5, as in the authors' code (so their weights load whatever ``side_dwconv`` is).

    Args:
        in_chans: as :class:`BiFormerSTL`.
        num_classes: as :class:`BiFormerSTL`.
        depth: as :class:`BiFormerSTL`.
        embed_dim: as :class:`BiFormerSTL`.
        head_dim: as :class:`BiFormerSTL`.
        qk_scale: as :class:`BiFormerSTL`.
        drop_path_rate: as :class:`BiFormerSTL`.
        drop_rate: as :class:`BiFormerSTL`.
        use_checkpoint_stages: as :class:`BiFormerSTL`.
        mlp_ratios: as :class:`BiFormerSTL`.
        norm_layer: as :class:`BiFormerSTL`.
        pre_head_norm_layer: as :class:`BiFormerSTL`.
        n_wins: as :class:`BiFormerSTL`.
        backend: as :class:`BiFormerSTL`.
        global_pool: as :class:`BiFormerSTL`.
        device: as :class:`BiFormerSTL`.
        dtype: as :class:`BiFormerSTL`.
        topks: per stage, BRA's top-k (> 0) or -1 (or -2) for 8-head global attention with a 5x5 LePE on V.
        side_dwconv: kernel of the BRA stages' local-context conv (0 disables it).
        auto_pad: accepted and unused: this BRA always pads, after the projection (the authors' semantics).

    Shapes: (N, in_chans, H, W) -> (N, num_classes).
    """

    channels_last = False
    layout = "NCHW"

    def _make_block(self, dim: int, attn: nn.Module, *, mlp_ratio: float, drop_path: float) -> nn.Module:
        return STLBlockNCHW(dim, attn, mlp_ratio, drop_path)


@register_model
def biformer_stl(pretrained: bool = False, **kwargs: object) -> BiFormerSTL:
    """BiFormer-STL: Swin-T layout with BRA, 28.4 M parameters, 4.6 GMACs, 82.7% ImageNet top-1."""
    model_args = dict(depth=[2, 2, 6, 2], embed_dim=[96, 192, 384, 768], norm_layer="BatchNorm2d",
                      topks=[1, 4, 16, -2], auto_pad=True)
    return build_pyramid_model(BiFormerSTL, "biformer_stl", pretrained, checkpoint_filter_fn, kwargs,
                               **dict(model_args, **kwargs))


@register_model
def biformer_stl_nchw(pretrained: bool = False, **kwargs: object) -> BiFormerSTLNCHW:
    """BiFormer-STL with the authors' refactored NCHW BRA, 28.4 M parameters."""
    model_args = dict(depth=[2, 2, 6, 2], embed_dim=[96, 192, 384, 768], norm_layer="BatchNorm2d",
                      topks=[1, 4, 16, -1])
    return build_pyramid_model(BiFormerSTLNCHW, "biformer_stl_nchw", pretrained, checkpoint_filter_fn, kwargs,
                               **dict(model_args, **kwargs))
