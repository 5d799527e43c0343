"""BiFormer (Zhu et al., "BiFormer: Vision Transformer with Bi-Level Routing Attention", CVPR 2023).

Parameter names, shapes and order follow the authors' ``models/biformer.py`` so that the released
checkpoints load unchanged. Layout: blocks, then the model, then ``checkpoint_filter_fn``, then the
pretrained configs and the ``register_model`` entry points.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath
from timm.models import generate_default_cfgs, register_model

from .._checks import check_positive_int
from ..layers import ATTENTION_TYPES, AttentionLePE, BiLevelRoutingAttention, build_token_mixer
from ..layers.bra import check_unsupported
from ..layers.token_mixers import check_attention_type, stage_defaults
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


def make_attention(
    dim: int,
    topk: int,
    *,
    num_heads: int,
    n_win: int,
    qk_dim: int | None,
    qk_scale: float | None,
    side_dwconv: int,
    auto_pad: bool,
    backend: str | None,
    region_size: int | None = None,
    attn_type: str | None = None,
    attn_options: dict | None = None,
    shift: bool = False,
) -> nn.Module:
    """The token mixer of one block.

    ``attn_type`` None or ``"bra"``: chosen by ``topk`` as in the reference: ``topk > 0``: BRA with that top-k;
    ``-1``: plain 8-head attention; ``-2``: 8-head attention with LePE. Another type: built by
    :func:`~biformer.layers.build_token_mixer` with ``attn_options`` (its size option and the like) and
    ``shift`` (window types).
    """
    if attn_type not in (None, "bra"):
        return build_token_mixer(
            attn_type, dim, num_heads=num_heads, qk_dim=qk_dim, qk_scale=qk_scale, side_dwconv=side_dwconv,
            shift=shift if attn_type in ("window", "shifted_window") else None, **(attn_options or {}),
        )
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise ValueError(f"topks: expected integers (> 0 for BRA, -1 or -2 for global attention), got {topk!r}")
    if topk > 0:
        return BiLevelRoutingAttention(
            dim, num_heads=num_heads, n_win=n_win, qk_dim=qk_dim, qk_scale=qk_scale, topk=topk,
            side_dwconv=side_dwconv, auto_pad=auto_pad, backend=backend, region_size=region_size,
        )
    if topk in (-1, -2):
        # The reference builds these with their default 8 heads, whatever head_dim says.
        return AttentionLePE(dim, num_heads=8, side_dwconv=side_dwconv if topk == -2 else 0)
    raise NotImplementedError(f"topks value {topk} is not implemented (released models use > 0, -1 or -2)")


class Block(nn.Module):
    """One BiFormer block; NCHW in and out, NHWC inside.

    ``x + pos_embed(x)``, then ``x + drop_path(attn(norm1(x)))`` and ``x + drop_path(mlp(norm2(x)))``
    (or the post-norm variant when ``pre_norm=False``), with optional layer scale. ``attn`` is chosen by
    :func:`make_attention` (``topk``, or ``attn_type`` with ``attn_options`` and ``shift``).
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
        attn_options: dict | None = None,
        shift: bool = False,
    ) -> None:
        super().__init__()
        if layer_scale_init_value > 0:
            self.gamma1 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
            self.gamma2 = nn.Parameter(torch.full((dim,), float(layer_scale_init_value)))
        else:
            self.gamma1 = self.gamma2 = None
        if before_attn_dwconv > 0:
            # The reference hard-codes padding=1 (only right for kernel 3); k // 2 keeps the size for any k.
            self.pos_embed = nn.Conv2d(
                dim, dim, kernel_size=before_attn_dwconv, padding=before_attn_dwconv // 2, groups=dim
            )
        else:
            self.pos_embed = None
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = make_attention(
            dim, topk, num_heads=num_heads, n_win=n_win, qk_dim=qk_dim, qk_scale=qk_scale,
            side_dwconv=side_dwconv, auto_pad=auto_pad, backend=backend, region_size=region_size,
            attn_type=attn_type, attn_options=attn_options, shift=shift,
        )
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(mlp_ratio * dim)
        # Indices 1 (mlp_dwconv slot) and 2 (GELU) hold no parameters: keys are mlp.0 and mlp.3.
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.Identity(), nn.GELU(), nn.Linear(hidden, dim))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.pre_norm = pre_norm

    def _scaled(self, x: torch.Tensor, gamma: torch.Tensor | None) -> torch.Tensor:
        return self.drop_path(x if gamma is None else gamma * x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H, W)."""
        if self.pos_embed is not None:
            x = x + self.pos_embed(x)
        x = x.permute(0, 2, 3, 1)  # (N, H, W, C)
        if self.pre_norm:
            x = x + self._scaled(self.attn(self.norm1(x)), self.gamma1)
            x = x + self._scaled(self.mlp(self.norm2(x)), self.gamma2)
        else:
            x = self.norm1(x + self._scaled(self.attn(x), self.gamma1))
            x = self.norm2(x + self._scaled(self.mlp(x), self.gamma2))
        return x.permute(0, 3, 1, 2)  # (N, C, H, W)


class BiFormerStage(nn.Sequential):
    """A stack of blocks (keys ``stages.i.j``) with optional gradient checkpointing."""

    grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(self, x, self.grad_checkpointing)


class BiFormer(PyramidClassifier):
    """BiFormer: conv stem, four stages of BRA blocks (plain attention in the last), BatchNorm, linear head.

    Keyword arguments are the reference's (a fixture's ``constructor_kwargs`` build the same network);
    the defaults are biformer_tiny's (the reference's own defaults did not build). Options no released
    model uses raise ``NotImplementedError`` naming the option. Additions: ``backend`` (attention backend
    of every BRA, see :func:`biformer.ops.available_backends`) and ``region_sizes`` (per stage, None or a
    region side in tokens: regions of fixed size instead of ``n_win`` per side, see
    :class:`~biformer.layers.BiLevelRoutingAttention`; off by default for checkpoint parity).

    ``attn_type`` swaps the attention and nothing else (for the paper's comparison): None (default, the
    reference: ``topks`` decide) or ``"bra"`` (the same), or one of :data:`~biformer.layers.ATTENTION_TYPES`
    for every stage, or a list of 4. ``"shifted_window"`` shifts the windows by ``window // 2`` in every
    second block of a stage (Swin). ``attn_kwargs`` (a dict for every stage, or a list of 4) sets the type's
    options, e.g. ``{"window": 4}``; each type's size option has a per-stage default that gives a query about
    as many keys as BRA in biformer_tiny at 224 px
    (:data:`~biformer.layers.token_mixers.STAGE_SIZES`).

    ``auto_pad=True`` lets the network take any H and W (BRA pads each map to a multiple of ``n_win``, the
    reference's detection/segmentation semantics); with ``auto_pad=False`` the stage maps must be
    multiples of ``n_win`` (224 px with n_win 7). The named variants use ``auto_pad=True``, which changes
    nothing for sizes where no padding is needed.

    timm options: ``global_pool`` (timm's pooling types, ``""`` for none; see
    :meth:`~biformer.models._pyramid.PyramidClassifier.reset_classifier`), ``device`` and ``dtype`` (where and
    in which floating-point type the parameters are made, as timm >= 1.0.21 models take them).

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
        attn_types, attn_options = stage_attention(attn_type, attn_kwargs)
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
                    nn.Conv2d(embed_dim[i], embed_dim[i + 1], kernel_size=3, stride=2, padding=1),
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
                        attn_options=attn_options[i], shift=attn_types[i] == "shifted_window" and j % 2 == 1,
                    )
                    for j in range(depth[i])
                ]
            )
            stage.grad_checkpointing = i in use_checkpoint_stages
            self.stages.append(stage)

        self.norm = nn.BatchNorm2d(embed_dim[-1])
        self._init_feature_info()
        self._init_head(num_classes, global_pool, drop_rate)
        self.apply(_init_weights)
        self._place(device, dtype)


def _init_weights(module: nn.Module) -> None:
    """The reference's init: truncated normal (std 0.02) Linear weights, zero biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """Accept the authors' checkpoint format and ours.

    Unwraps ``{"model": ...}`` / ``{"state_dict": ...}``, strips DistributedDataParallel ``module.``
    prefixes and drops non-tensor entries. Head adaptation for another ``num_classes`` is done by timm
    (the ``classifier`` entry of the pretrained config).
    """
    from ..checkpoint import unwrap_state_dict

    return unwrap_state_dict(state_dict)


def _cfg(url: str = "", **kwargs: object) -> dict:
    return {
        "url": url,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "downsample_layers.0.0",
        "classifier": "head",
        "license": "mit",
        "paper_ids": "arXiv:2303.08810",
        "paper_name": "BiFormer: Vision Transformer with Bi-Level Routing Attention",
        "origin_url": "https://github.com/rayleizhu/BiFormer",
        **kwargs,
    }


# The authors' published links (OneDrive shares; broken at the time of writing). Use a local file with
# ``pretrained_cfg_overlay=dict(file=PATH)``.
default_cfgs = generate_default_cfgs(
    {
        "biformer_tiny.in1k": _cfg(
            url="https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHEOoGkgwgQzEDlM/root/content"
        ),
        "biformer_small.in1k": _cfg(
            url="https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHDyM-x9KWRBZ832/root/content"
        ),
        "biformer_base.in1k": _cfg(
            url="https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHI_XPhoadjaNxtO/root/content"
        ),
        "biformer_nano.untrained": _cfg(url=""),  # ours, defined at the end of this file; no released weights
    }
)

_VARIANTS = {
    "biformer_tiny": dict(depth=[2, 2, 8, 2], embed_dim=[64, 128, 256, 512]),
    "biformer_small": dict(depth=[4, 4, 18, 4], embed_dim=[64, 128, 256, 512]),
    "biformer_base": dict(depth=[4, 4, 18, 4], embed_dim=[96, 192, 384, 768]),
}


def _create_biformer(variant: str, pretrained: bool = False, **kwargs: object) -> BiFormer:
    arch = dict(_VARIANTS[variant])
    arch.update(
        qk_dims=arch["embed_dim"], mlp_ratios=[3, 3, 3, 3], n_win=7, kv_downsample_mode="identity",
        topks=[1, 4, 16, -2], side_dwconv=5, before_attn_dwconv=3, head_dim=32, auto_pad=True,
    )
    arch.update(kwargs)
    return build_pyramid_model(BiFormer, variant, pretrained, checkpoint_filter_fn, kwargs, **arch)


@register_model
def biformer_tiny(pretrained: bool = False, **kwargs: object) -> BiFormer:
    """BiFormer-T: 13.1 M parameters, 2.2 GMACs at 224 px, 81.4% ImageNet top-1."""
    return _create_biformer("biformer_tiny", pretrained, **kwargs)


@register_model
def biformer_small(pretrained: bool = False, **kwargs: object) -> BiFormer:
    """BiFormer-S: 25.5 M parameters, 4.5 GMACs at 224 px, 83.8% ImageNet top-1."""
    return _create_biformer("biformer_small", pretrained, **kwargs)


@register_model
def biformer_base(pretrained: bool = False, **kwargs: object) -> BiFormer:
    """BiFormer-B: 56.8 M parameters, 9.8 GMACs at 224 px, 84.3% ImageNet top-1."""
    return _create_biformer("biformer_base", pretrained, **kwargs)


# --- biformer_nano ---------------------------------------------------------------------------------
# ``biformer_nano``: a small BiFormer for quick experiments and the quick start, registered with timm.
#
# Same layout as BiFormer-T (conv stem, BRA in stages 1-3, plain attention with LePE in stage 4) with one or
# two blocks per stage, half the width and 16-channel heads: 1.71 M parameters with a 1000-way head, 1.46 M
# with 10 classes.
# For 224 px images its defaults are BiFormer-T's (``n_win`` 7, top-k 1, 4, 16); for small images pass fewer
# regions, e.g. ``n_win=2, topks=[2, 2, 4, -2]`` at 32 px (stage maps 8, 4, 2, 1 pixels per side).

NANO_ARCHITECTURE = dict(
    depth=[1, 1, 2, 1], embed_dim=[32, 64, 128, 256], qk_dims=[32, 64, 128, 256], head_dim=16,
    mlp_ratios=[3, 3, 3, 3], n_win=7, topks=[1, 4, 16, -2], side_dwconv=5, before_attn_dwconv=3, auto_pad=True,
)

@register_model
def biformer_nano(pretrained: bool = False, **kwargs: object) -> BiFormer:
    """BiFormer-Nano: 1.71 M parameters; depth 1, 1, 2, 1; widths 32-256 (no released weights)."""
    architecture = {**NANO_ARCHITECTURE, **kwargs}
    if "embed_dim" in kwargs and "qk_dims" not in kwargs:
        architecture["qk_dims"] = architecture["embed_dim"]
    return build_pyramid_model(BiFormer, "biformer_nano", pretrained, checkpoint_filter_fn, kwargs, **architecture)
