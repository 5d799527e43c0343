"""BiFormer (Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention", CVPR 2023).

Parameter names, shapes and order follow the authors' ``models/biformer.py`` so that the released
checkpoints load unchanged. Layout: the per-stage attention options, blocks, the model, then the
``register_model`` entry points (their pretrained configs are in :mod:`._base`).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn as nn
from timm.layers import DropPath
from timm.models import register_model

from .._checks import check_positive_int, check_unsupported
from ..layers import ATTENTION_TYPES, stage_token_mixer
from ..layers.depthwise import DepthwiseConv2d
from ..layers.downsample_conv import DownsampleConv2d
from ..layers.token_mixers import check_attention_type, stage_defaults
from ..ops.depthwise import add_depthwise
from ..ops.linear import onednn_linear, runs_as_written, takes_onednn_path
from ._base import checkpoint_filter_fn, default_cfgs, init_weights  # noqa: F401 (timm's register_model reads default_cfgs)
from ._pyramid import (
    NUM_STAGES,
    PyramidClassifier,
    build_pyramid_model,
    check_stage_list,
    run_blocks,
    stochastic_depth_rates,
)

__all__ = ["BiFormer", "Block", "checkpoint_filter_fn"]


def stage_attention(attn_type: object, attn_kwargs: object) -> tuple[list[str | None], list[dict]]:
    """Per-stage attention types and their options from ``BiFormer``'s ``attn_type`` and ``attn_kwargs``.

    ``attn_type``: None (the reference: ``topks`` decide), one type for every stage, or a list of 4 types.
    ``attn_kwargs``: None, one dict for every stage, or a list of 4 dicts (or None); they update the stage's
    default size option (:func:`~biformer.layers.token_mixers.stage_defaults`).

    Returns:
        4 types (None where ``topks`` decide) and 4 option dicts.
    """
    if attn_type is None:
        if attn_kwargs is not None:
            raise ValueError(f"attn_kwargs: expected None when attn_type is None, got {attn_kwargs!r}")
        return [None] * NUM_STAGES, [{}] * NUM_STAGES
    if isinstance(attn_type, str) and attn_type in ATTENTION_TYPES:
        types = [attn_type] * NUM_STAGES
    elif isinstance(attn_type, (list, tuple)) and len(attn_type) == NUM_STAGES:
        types = [check_attention_type(value, name=f"attn_type[{i}]") for i, value in enumerate(attn_type)]
    else:
        raise ValueError(
            f"attn_type: expected None, one of {ATTENTION_TYPES} or a list of {NUM_STAGES} of them, got {attn_type!r}"
        )
    if attn_kwargs is None or isinstance(attn_kwargs, dict):
        per_stage = [attn_kwargs or {}] * NUM_STAGES
    elif isinstance(attn_kwargs, (list, tuple)) and len(attn_kwargs) == NUM_STAGES and all(
        value is None or isinstance(value, dict) for value in attn_kwargs
    ):
        per_stage = [value or {} for value in attn_kwargs]
    else:
        raise ValueError(
            f"attn_kwargs: expected None, a dict or a list of {NUM_STAGES} dicts (or None), got {attn_kwargs!r}"
        )
    for i, (kind, options) in enumerate(zip(types, per_stage)):
        if kind == "bra" and options:
            raise ValueError(
                f"attn_kwargs: stage {i + 1} uses 'bra', which topks, n_win and region_sizes configure; "
                f"expected no options for it, got {options!r}"
            )
    return types, [{**stage_defaults(kind, i), **options} for i, (kind, options) in enumerate(zip(types, per_stage))]


# The token mixer of one block: decided and built in one place (``biformer.layers.token_mixers``).
make_attention = stage_token_mixer


class Block(nn.Module):
    """One BiFormer block; NCHW in and out, NHWC inside.

    ``x + pos_embed(x)``, then ``x + drop_path(attn(norm1(x)))`` and ``x + drop_path(mlp(norm2(x)))``
    (or the post-norm variant when ``pre_norm=False``), with optional layer scale. ``attn`` is chosen by
    :func:`~biformer.layers.choose_token_mixer` (``topk``, or ``attn_type`` with ``attn_kwargs`` and ``shift``).
    ``attn_options`` is the former name of ``attn_kwargs``: still accepted, with a ``DeprecationWarning``.
    """

    def __init__(
        self,
        dim: int,
        drop_path: float = 0.0,
        layer_scale_init_value: float = -1,
        num_heads: int = 8,
        n_win: int = 7,
        qk_dim: int | None = None,
        qk_scale: float | None = None,
        topk: int = 4,
        mlp_ratio: float = 4,
        side_dwconv: int = 5,
        before_attn_dwconv: int = 3,
        pre_norm: bool = True,
        auto_pad: bool = False,
        backend: str | None = None,
        region_size: int | None = None,
        attn_type: str | None = None,
        attn_kwargs: dict | None = None,
        shift: bool = False,
        *,
        attn_options: dict | None = None,
    ) -> None:
        super().__init__()
        if attn_options is not None:
            if attn_kwargs is not None:
                raise ValueError("attn_options: the former name of attn_kwargs; expected only attn_kwargs, got both")
            warnings.warn("Block(attn_options=...) is now attn_kwargs=... (the name BiFormer takes)",
                          DeprecationWarning, stacklevel=2)
            attn_kwargs = attn_options
        if layer_scale_init_value > 0:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
        else:
            self.gamma1 = self.gamma2 = None
        if before_attn_dwconv > 0:
            # The reference hard-codes padding=1 (only right for kernel 3); k // 2 keeps the size for any k.
            self.pos_embed = DepthwiseConv2d(dim, before_attn_dwconv)
        else:
            self.pos_embed = None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = stage_token_mixer(
            dim, topk, attn_type, num_heads=num_heads, n_win=n_win, qk_dim=qk_dim, qk_scale=qk_scale,
            side_dwconv=side_dwconv, auto_pad=auto_pad, backend=backend, region_size=region_size,
            attn_kwargs=attn_kwargs, shift=shift,
        )
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        # Indices 1 (mlp_dwconv slot) and 2 (GELU) hold no parameters: keys are mlp.0 and mlp.3.
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.Identity(), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.pre_norm = pre_norm

    def _mlp(self, x: torch.Tensor) -> torch.Tensor:
        """``self.mlp(x)``; in CPU inference fc1 + GELU and fc2 as oneDNN GEMMs (:mod:`biformer.ops.linear`)."""
        mlp = self.mlp
        if type(mlp) is not nn.Sequential or len(mlp) != 4:  # replaced by the user: its own call
            return mlp(x)
        fc1, middle, activation, fc2 = mlp
        if (
            type(middle) is nn.Identity and type(activation) is nn.GELU and activation.approximate == "none"
            and all(runs_as_written(m) for m in (mlp, middle, activation)) and takes_onednn_path(x, fc1, fc2)
        ):
            return onednn_linear(onednn_linear(x, fc1, "gelu"), fc2)  # checked once above
        return mlp(x)

    def _scaled(self, x: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
        return self.drop_path(x if gamma is None else gamma * x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W)."""
        if self.pos_embed is not None:
            x = add_depthwise(x, self.pos_embed)  # x + pos_embed(x); one fused pass in CPU inference
        x = x.permute(0, 2, 3, 1)  # (N, H, W, C)
        if self.pre_norm:
            x = x + self._scaled(self.attn(self.norm1(x)), self.gamma1)
            x = x + self._scaled(self._mlp(self.norm2(x)), self.gamma2)
        else:
            x = self.norm1(x + self._scaled(self.attn(x), self.gamma1))
            x = self.norm2(x + self._scaled(self._mlp(x), self.gamma2))
        return x.permute(0, 3, 1, 2)  # (N, C, H, W)


class BiFormerStage(nn.Sequential):
    """A stack of blocks (keys ``stages.i.j``) with optional gradient checkpointing."""

    grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(self, x, self.grad_checkpointing)


class BiFormer(PyramidClassifier):
    """BiFormer: conv stem, four stages of BRA blocks (plain attention in the last), BatchNorm, linear head.

    Keyword arguments are the reference's (a fixture's ``constructor_kwargs`` build the same network); the
    defaults are biformer_tiny's (the reference's own defaults did not build). Options no released model uses
    raise ``NotImplementedError`` naming the option; the reference's arguments that only those options read
    (``kv_per_wins``, ``kv_downsample_kernels``, ``kv_downsample_ratios``, ``pe_stages``) are accepted and unused.

    Args:
        depth: blocks per stage.
        in_chans: channels of the input images.
        num_classes: classes of the ``head`` Linear (0: no head, pooled features are returned).
        embed_dim: channels per stage.
        head_dim: channels per BRA head: stage ``i`` has ``qk_dims[i] // head_dim`` heads.
        qk_scale: BRA's attention and routing scale (default ``qk_dim ** -0.5``).
        representation_size: only None (the reference's pre-logits layer is not implemented).
        drop_path_rate: stochastic depth, rising linearly from 0 to this over all blocks.
        drop_rate: dropout before the head.
        use_checkpoint_stages: stages whose blocks are re-computed in backward (gradient checkpointing).
        n_win: regions per side in every BRA.
        kv_downsample_mode: only ``"identity"``.
        topks: per stage, BRA's top-k (> 0), or ``-2`` (8-head attention with LePE, the released last stage) or
            ``-1`` (8-head attention); see :func:`~biformer.layers.choose_token_mixer`.
        side_dwconv: kernel of BRA's local-context conv and of the LePE (0 disables them).
        layer_scale_init_value: > 0: learnable per-channel scales of the two branches, starting at this value.
        qk_dims: per stage, channels of q and k in BRA (None: the stage's ``embed_dim``).
        param_routing: only False.
        diff_routing: only False.
        soft_routing: only False.
        pre_norm: norm before attention and MLP (False: the post-norm variant).
        pe: only None; ``pe_stages`` is unused.
        before_attn_dwconv: kernel of the conditional position encoding (depth-wise conv; 0 disables it).
        auto_pad: BRA pads each map to a multiple of ``n_win`` so the network takes any H and W (the
            reference's detection/segmentation semantics); False: the stage maps must be multiples of
            ``n_win`` (224 px with n_win 7). The named variants use True, which changes nothing where no
            padding is needed.
        mlp_ratios: per stage, MLP hidden width over ``embed_dim``.
        param_attention: only ``"qkvo"``.
        mlp_dwconv: only False.
        backend: attention backend of every BRA (see :func:`biformer.ops.available_backends`); None: the default.
        region_sizes: per stage, None or a region side in tokens: regions of fixed size instead of ``n_win``
            per side (see :class:`~biformer.layers.BiLevelRoutingAttention`; off by default for checkpoint
            parity).
        attn_type: swaps the attention and nothing else (the paper's comparison): None (default, the
            reference: ``topks`` decide) or ``"bra"`` (the same), or one of
            :data:`~biformer.layers.ATTENTION_TYPES` for every stage, or a list of 4. ``"shifted_window"``
            shifts the windows by ``window // 2`` in every second block of a stage (Swin).
        attn_kwargs: the type's options, a dict for every stage or a list of 4 (dicts or None), e.g.
            ``{"window": 4}``; each type's size option has a per-stage default that gives a query about as
            many keys as BRA in biformer_tiny at 224 px (:data:`~biformer.layers.token_mixers.STAGE_SIZES`).
            Only with an ``attn_type`` other than ``"bra"``.
        global_pool: timm's pooling types, ``""`` for none (see
            :meth:`~biformer.models._pyramid.PyramidClassifier.reset_classifier`).
        device: where the parameters are made (as timm >= 1.0.21 models take it).
        dtype: the floating-point type of the parameters.

    Shapes: (N, in_chans, H, W) -> logits (N, num_classes).
    """

    channels_last_memory = True

    def __init__(
        self,
        depth: list[int] | tuple[int, ...] = (2, 2, 8, 2),
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: list[int] | tuple[int, ...] = (64, 128, 256, 512),
        head_dim: int = 32,
        qk_scale: float | None = None,
        representation_size: int | None = None,
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        use_checkpoint_stages: list[int] | tuple[int, ...] = (),
        n_win: int = 7,
        kv_downsample_mode: str = "identity",
        kv_per_wins: list[int] | tuple[int, ...] = (-1, -1, -1, -1),
        topks: list[int] | tuple[int, ...] = (1, 4, 16, -2),
        side_dwconv: int = 5,
        layer_scale_init_value: float = -1,
        qk_dims: list[int | None] | tuple[int | None, ...] | None = None,
        param_routing: bool = False,
        diff_routing: bool = False,
        soft_routing: bool = False,
        pre_norm: bool = True,
        pe: str | None = None,
        pe_stages: list[int] | tuple[int, ...] = (0,),
        before_attn_dwconv: int = 3,
        auto_pad: bool = False,
        kv_downsample_kernels: list[int] | tuple[int, ...] = (4, 2, 1, 1),
        kv_downsample_ratios: list[int] | tuple[int, ...] = (4, 2, 1, 1),
        mlp_ratios: list[float] | tuple[float, ...] = (3, 3, 3, 3),
        param_attention: str = "qkvo",
        mlp_dwconv: bool = False,
        backend: str | None = None,
        region_sizes: list[int | None] | tuple[int | None, ...] | None = None,
        attn_type: str | list[str] | tuple[str, ...] | None = None,
        attn_kwargs: dict | list[dict | None] | tuple[dict | None, ...] | None = None,
        global_pool: str = "avg",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        del kv_per_wins, kv_downsample_kernels, kv_downsample_ratios, pe_stages  # unused in identity mode / pe=None
        for name, value, supported in (
            ("kv_downsample_mode", kv_downsample_mode, "identity"),
            ("param_attention", param_attention, "qkvo"),
            ("param_routing", param_routing, False),
            ("diff_routing", diff_routing, False),
            ("soft_routing", soft_routing, False),
            ("pe", pe, None),
            ("mlp_dwconv", mlp_dwconv, False),
        ):
            check_unsupported(name, value, supported)
        if representation_size:
            check_unsupported("representation_size", representation_size, None)
        depth = check_stage_list(depth, "depth")
        embed_dim = check_stage_list(embed_dim, "embed_dim")
        topks = check_stage_list(topks, "topks")
        mlp_ratios = check_stage_list(mlp_ratios, "mlp_ratios")
        region_sizes = check_stage_list(region_sizes or [None] * 4, "region_sizes")
        attn_types, stage_attn_kwargs = stage_attention(attn_type, attn_kwargs)
        qk_dims = [q or d for q, d in zip(check_stage_list(qk_dims or [None] * 4, "qk_dims"), embed_dim)]
        self.in_chans = check_positive_int(in_chans, name="in_chans")
        head_dim = check_positive_int(head_dim, name="head_dim")
        self.embed_dim = embed_dim

        stem = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim[0] // 2, kernel_size=3, stride=2, padding=1),
            nn.BatchNorm2d(embed_dim[0] // 2),
            nn.GELU(),
            nn.Conv2d(embed_dim[0] // 2, embed_dim[0], kernel_size=3, stride=2, padding=1),
            nn.BatchNorm2d(embed_dim[0]),
        )
        self.downsample_layers = nn.ModuleList([stem])
        for i in range(3):
            self.downsample_layers.append(
                nn.Sequential(
                    DownsampleConv2d(embed_dim[i], embed_dim[i + 1], kernel_size=3, stride=2, padding=1),
                    nn.BatchNorm2d(embed_dim[i + 1]),
                )
            )

        rates = stochastic_depth_rates(depth, drop_path_rate)
        self.stages = nn.ModuleList()
        for i in range(4):
            stage = BiFormerStage(
                *[
                    Block(
                        dim=embed_dim[i], drop_path=rates[i][j], layer_scale_init_value=layer_scale_init_value,
                        num_heads=qk_dims[i] // head_dim, n_win=n_win, qk_dim=qk_dims[i], qk_scale=qk_scale,
                        topk=topks[i], mlp_ratio=mlp_ratios[i], side_dwconv=side_dwconv,
                        before_attn_dwconv=before_attn_dwconv, pre_norm=pre_norm, auto_pad=auto_pad,
                        backend=backend, region_size=region_sizes[i], attn_type=attn_types[i],
                        attn_kwargs=stage_attn_kwargs[i], shift=attn_types[i] == "shifted_window" and j % 2 == 1,
                    )
                    for j in range(depth[i])
                ]
            )
            stage.grad_checkpointing = i in use_checkpoint_stages
            self.stages.append(stage)

        self.norm = nn.BatchNorm2d(embed_dim[-1])
        self._init_feature_info()
        self._init_head(num_classes, global_pool, drop_rate)
        self.apply(init_weights)
        self._place(device, dtype)


def _create_biformer(variant: str, pretrained: bool, model_args: dict, **kwargs: object) -> BiFormer:
    """Build ``variant``: ``BiFormer``'s defaults (those of every variant), its ``model_args``, then the caller's
    ``kwargs``. The named variants pad (``auto_pad=True``; nothing changes where no padding is needed)."""
    architecture = {"auto_pad": True, **model_args, **kwargs}
    return build_pyramid_model(BiFormer, variant, pretrained, checkpoint_filter_fn, kwargs, **architecture)


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs: object) -> BiFormer:
    """BiFormer-T: 13.1 M parameters, 2.2 GMACs at 224 px, 81.4% ImageNet top-1."""
    model_args = dict(depth=[2, 2, 8, 2], embed_dim=[64, 128, 256, 512], qk_dims=[64, 128, 256, 512])
    return _create_biformer("biformer_tiny", pretrained, model_args, **kwargs)


@register_model
def biformer_small(pretrained: bool = False, **kwargs: object) -> BiFormer:
    """BiFormer-S: 25.5 M parameters, 4.5 GMACs at 224 px, 83.8% ImageNet top-1."""
    model_args = dict(depth=[4, 4, 18, 4], embed_dim=[64, 128, 256, 512], qk_dims=[64, 128, 256, 512])
    return _create_biformer("biformer_small", pretrained, model_args, **kwargs)


@register_model
def biformer_base(pretrained: bool = False, **kwargs: object) -> BiFormer:
    """BiFormer-B: 56.8 M parameters, 9.8 GMACs at 224 px, 84.3% ImageNet top-1."""
    model_args = dict(depth=[4, 4, 18, 4], embed_dim=[96, 192, 384, 768], qk_dims=[96, 192, 384, 768])
    return _create_biformer("biformer_base", pretrained, model_args, **kwargs)


# --- biformer_nano ---------------------------------------------------------------------------------
# ``biformer_nano``: a small BiFormer for quick experiments and the quick start, registered with timm.
#
# Same layout as BiFormer-T (conv stem, BRA in stages 1-3, plain attention with LePE in stage 4) with one or
# two blocks per stage, half the width and 16-channel heads: 1.71 M parameters with a 1000-way head, 1.46 M
# with 10 classes.
# For 224 px images its defaults are BiFormer-T's (``n_win`` 7, top-k 1, 4, 16); for small images pass fewer
# regions, e.g. ``n_win=2, topks=[2, 2, 4, -2]`` at 32 px (stage maps 8, 4, 2, 1 pixels per side).

@register_model
def biformer_nano(pretrained: bool = False, **kwargs: object) -> BiFormer:
    """BiFormer-Nano: 1.71 M parameters; depth 1, 1, 2, 1; widths 32-256 (no released weights)."""
    # qk_dims not set: they follow embed_dim, also when the caller changes embed_dim
    model_args = dict(depth=[1, 1, 2, 1], embed_dim=[32, 64, 128, 256], head_dim=16)
    return _create_biformer("biformer_nano", pretrained, model_args, **kwargs)
