"""Which token mixer a block gets, decided in one place, and how it is built.

:func:`choose_token_mixer` turns a stage's ``topk`` (with the authors' sentinels :data:`PLAIN_ATTENTION_TOPK`
-1 and :data:`ATTENTION_LEPE_TOPK` -2) and ``attn_type`` into a mixer name of :data:`TOKEN_MIXERS` and its
keyword arguments; :func:`stage_token_mixer` builds it. ``BiFormer``, the Swin-layout models and (through
``BiFormer``) the dense backbone all use them.

:func:`build_token_mixer` is the entry point for every attention type the BiFormer paper compares
(:data:`ATTENTION_TYPES`). All types take and return NHWC maps of any size, and all but ``"bra"`` are
subclasses of :class:`~biformer.layers.ProjectedAttention`: the same parameters as BRA (``qkv.qkv``,
``lepe``, ``wo``), so two networks that differ in the type differ only in which keys each query attends.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch.nn as nn

from .attention_lepe import AttentionLePE, AttentionLePENCHW
from .axial_attention import AxialStripeAttention
from .bra import BiLevelRoutingAttention
from .bra_nchw import BiLevelRoutingAttentionNCHW
from .deformable_attention import DeformableAttention
from .dilated_attention import DilatedAttention
from .projected_attention import GlobalAttention
from .window_attention import WindowAttention

ATTENTION_TYPES = ("bra", "global", "window", "shifted_window", "axial", "dilated", "deformable")

# The keyword options of each type besides the common ones (dim, num_heads, qk_dim, qk_scale, side_dwconv).
TYPE_OPTIONS: dict[str, tuple[str, ...]] = {
    "bra": ("topk", "n_win", "auto_pad", "backend", "region_size"),
    "global": (),
    "window": ("window",),
    "shifted_window": ("window",),
    "axial": ("stripe_width",),
    "dilated": ("grid",),
    "deformable": ("points", "offset_groups", "offset_range"),
}

# The option that sets how many keys a query sees, and its default per stage of a BiFormer. Chosen so that at
# 224 px (stage maps 56, 28, 14, 7) a query sees about as many keys as in biformer_tiny, where BRA gives every
# query 64 keys in stages 1-3 (topk 1, 4, 16 regions of 64, 16, 4 tokens) and stage 4 is global (49 keys):
#   window 8, 8, 7, 7: 64, 64, 49, 49 keys (7 in stage 3 because 8 would pad 14 to 16; stage 4: the whole map);
#   stripe_width 1, 2, 7, 7: 56, 56, 98, 49 keys (CSWin-T's widths; stripes must divide 14 to avoid padding);
#   grid 8, 7, 7, 7: 64, 49, 49, 49 keys (8 divides 56 but not 28 or 14);
#   points 8, 8, 8, 7: 64, 64, 64, 49 keys (7 in stage 4: the lattice is then the token centres).
SIZE_OPTION = {"window": "window", "shifted_window": "window", "axial": "stripe_width", "dilated": "grid",
               "deformable": "points"}
STAGE_SIZES = {
    "window": (8, 8, 7, 7),
    "shifted_window": (8, 8, 7, 7),
    "axial": (1, 2, 7, 7),
    "dilated": (8, 7, 7, 7),
    "deformable": (8, 8, 8, 7),
}


def check_attention_type(attn_type: object, *, name: str = "attn_type") -> str:
    """Return ``attn_type`` if it is one of :data:`ATTENTION_TYPES`, else raise a ``ValueError`` naming ``name``."""
    if not isinstance(attn_type, str) or attn_type not in ATTENTION_TYPES:
        raise ValueError(f"{name}: expected one of {ATTENTION_TYPES}, got {attn_type!r}")
    return attn_type


def stage_defaults(attn_type: str, stage: int) -> dict[str, int]:
    """The size option of ``attn_type`` in BiFormer stage ``stage`` (0-3) by default, e.g. ``{"window": 8}``;
    empty for ``"bra"`` and ``"global"`` (see :data:`STAGE_SIZES` for the reasoning)."""
    check_attention_type(attn_type)
    if attn_type not in SIZE_OPTION:
        return {}
    return {SIZE_OPTION[attn_type]: STAGE_SIZES[attn_type][stage]}


def build_token_mixer(
    attn_type: str,
    dim: int,
    *,
    num_heads: int,
    qk_dim: int | None = None,
    qk_scale: float | None = None,
    side_dwconv: int = 5,
    shift: bool | None = None,
    **options: Any,
) -> nn.Module:
    """Build the token mixer ``attn_type``: an ``nn.Module`` mapping (N, H, W, dim) -> (N, H, W, dim), any H, W.

    Types and their ``options`` (defaults in brackets):

    - ``"bra"``: :class:`~biformer.layers.BiLevelRoutingAttention`; ``topk`` [4], ``n_win`` [7],
      ``auto_pad`` [True, so that any size works], ``backend``, ``region_size``.
    - ``"global"``: :class:`~biformer.layers.GlobalAttention`; no options.
    - ``"window"`` / ``"shifted_window"``: :class:`~biformer.layers.WindowAttention`; ``window`` [7].
    - ``"axial"``: :class:`~biformer.layers.AxialStripeAttention`; ``stripe_width`` [1].
    - ``"dilated"``: :class:`~biformer.layers.DilatedAttention`; ``grid`` [7].
    - ``"deformable"``: :class:`~biformer.layers.DeformableAttention`; ``points`` [8], ``offset_groups`` [1],
      ``offset_range`` [2.0].

    Args:
        attn_type: one of :data:`ATTENTION_TYPES`.
        dim: channels of input and output.
        num_heads: attention heads.
        qk_dim: channels of q and k (default ``dim``).
        qk_scale: attention scale (default ``qk_dim ** -0.5``).
        side_dwconv: kernel of the local-context conv on V (0 disables it).
        shift: window types only: move the window grid by ``window // 2`` (Swin). None: shifted for
            ``"shifted_window"``, not for ``"window"`` (a BiFormer stage passes True/False to alternate).
        options: the type's options listed above.

    Raises:
        ValueError: unknown ``attn_type``, an option the type does not take, or a bad value (the message
            names the argument, what was expected and what came).
    """
    check_attention_type(attn_type)
    unknown = sorted(set(options) - set(TYPE_OPTIONS[attn_type]))
    if unknown:
        raise ValueError(
            f"{unknown[0]}: not an option of attn_type {attn_type!r}; expected one of "
            f"{TYPE_OPTIONS[attn_type] or '(none)'}, got {unknown}"
        )
    if shift is not None and not isinstance(shift, bool):
        raise ValueError(f"shift: expected None, True or False, got {shift!r}")
    if shift and attn_type not in ("window", "shifted_window"):
        raise ValueError(f"shift: only window attention shifts; expected None or False for {attn_type!r}, got True")
    common = dict(num_heads=num_heads, qk_dim=qk_dim, qk_scale=qk_scale, side_dwconv=side_dwconv)
    if attn_type == "bra":
        return BiLevelRoutingAttention(dim, **common, **{"auto_pad": True, **options})
    if attn_type == "global":
        return GlobalAttention(dim, **common)
    if attn_type in ("window", "shifted_window"):
        window = options.get("window", 7)
        shifted = attn_type == "shifted_window" if shift is None else shift
        # A bad window is reported by WindowAttention; only compute the shift for a valid one.
        offset = window // 2 if shifted and isinstance(window, int) and not isinstance(window, bool) else 0
        return WindowAttention(dim, **common, window=window, shift=offset)
    if attn_type == "axial":
        return AxialStripeAttention(dim, **common, **options)
    if attn_type == "dilated":
        return DilatedAttention(dim, **common, **options)
    return DeformableAttention(dim, **common, **options)


# --- the authors' topks sentinels --------------------------------------------------------------------------
# A stage's ``topk`` in the authors' models: > 0 is BRA with that top-k; these two mean global attention.
PLAIN_ATTENTION_TOPK = -1  # the reference's ``Attention`` (NHWC); in the NCHW models the same as -2
ATTENTION_LEPE_TOPK = -2  # the reference's ``AttentionLePE``: the last stage of every released model
# The authors build their global attention with its default 8 heads, whatever ``head_dim`` says.
GLOBAL_ATTENTION_HEADS = 8
# Kernel of the global attention's LePE in the NCHW models (the authors' nchwAttentionLePE default, never
# overridden: their weights load whatever ``side_dwconv`` is).
NCHW_GLOBAL_LEPE_KERNEL = 5
LAYOUTS = ("NHWC", "NCHW")

# Every mixer a block can get, by name: a callable (dim, **kwargs) -> nn.Module. The NHWC mixers take and
# return (N, H, W, dim) maps, the ``_nchw`` ones (N, dim, H, W).
TOKEN_MIXERS: dict[str, Callable[..., nn.Module]] = {
    "bra": BiLevelRoutingAttention,
    "bra_nchw": BiLevelRoutingAttentionNCHW,
    "attention": AttentionLePE,  # built with side_dwconv=0: no LePE
    "attention_lepe": AttentionLePE,
    "attention_lepe_nchw": AttentionLePENCHW,
    **{kind: partial(build_token_mixer, kind) for kind in ATTENTION_TYPES if kind != "bra"},
}


def choose_token_mixer(
    topk: object,
    attn_type: str | None = None,
    *,
    num_heads: int,
    layout: str = "NHWC",
    n_win: int = 7,
    qk_dim: int | None = None,
    qk_scale: float | None = None,
    side_dwconv: int = 5,
    auto_pad: bool = False,
    backend: str | None = None,
    region_size: int | None = None,
    attn_kwargs: Mapping[str, Any] | None = None,
    shift: bool = False,
) -> tuple[str, dict[str, Any]]:
    """The token mixer of one block: a name of :data:`TOKEN_MIXERS` and the keyword arguments to build it with.

    The rule, as the authors' code decides it:

    - ``attn_type`` None or ``"bra"``: ``topk`` decides. ``topk > 0``: ``"bra"`` (NHWC) or ``"bra_nchw"``
      with that top-k and the stage options. ``-1``: ``"attention"`` (8 heads, no LePE) in NHWC,
      ``"attention_lepe_nchw"`` (8 heads, 5x5 LePE on V) in NCHW. ``-2``: ``"attention_lepe"`` (8 heads, LePE
      of ``side_dwconv`` on the input) in NHWC, ``"attention_lepe_nchw"`` in NCHW.
    - another of :data:`ATTENTION_TYPES` (NHWC only): that type, built by :func:`build_token_mixer` with
      ``num_heads``, ``qk_dim``, ``qk_scale``, ``side_dwconv``, ``attn_kwargs`` and (window types) ``shift``;
      ``topk`` is not used.

    Args:
        topk: the stage's entry of ``topks``.
        attn_type: None, or one of :data:`ATTENTION_TYPES`.
        num_heads: heads of BRA and of the comparison types (global attention always has 8).
        layout: ``"NHWC"`` (``BiFormer``, ``BiFormerSTL``) or ``"NCHW"`` (``BiFormerSTLNCHW``: the authors'
            refactored layers, which take no ``qk_dim`` nor ``region_size``).
        n_win: BRA's ``n_win`` (:class:`~biformer.layers.BiLevelRoutingAttention`).
        qk_dim: BRA's ``qk_dim`` (:class:`~biformer.layers.BiLevelRoutingAttention`).
        qk_scale: BRA's ``qk_scale`` (:class:`~biformer.layers.BiLevelRoutingAttention`).
        side_dwconv: BRA's ``side_dwconv`` (:class:`~biformer.layers.BiLevelRoutingAttention`).
        auto_pad: BRA's ``auto_pad`` (:class:`~biformer.layers.BiLevelRoutingAttention`).
        backend: BRA's ``backend`` (:class:`~biformer.layers.BiLevelRoutingAttention`).
        region_size: BRA's ``region_size`` (:class:`~biformer.layers.BiLevelRoutingAttention`).
        attn_kwargs: options of a comparison type (its size option and the like).
        shift: window types only: shift this block's windows (Swin's alternation).

    Raises:
        ValueError: ``topk`` not an integer, an unknown ``attn_type`` or ``layout``, or an option the NCHW
            layers do not take.
        NotImplementedError: a ``topk`` of 0 or below -2 (no released model uses one).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    if attn_type not in (None, "bra"):
        check_attention_type(attn_type)
        if layout != "NHWC":
            raise ValueError(f"attn_type: the NCHW models have only BRA and global attention; expected None, "
                             f"got {attn_type!r}")
        window = attn_type in ("window", "shifted_window")
        return attn_type, dict(num_heads=num_heads, qk_dim=qk_dim, qk_scale=qk_scale, side_dwconv=side_dwconv,
                               shift=shift if window else None, **(attn_kwargs or {}))
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise ValueError(f"topks: expected integers (> 0 for BRA, -1 or -2 for global attention), got {topk!r}")
    if topk > 0:
        if layout == "NCHW":
            for name, value in (("qk_dim", qk_dim), ("region_size", region_size)):
                if value is not None:
                    raise ValueError(f"{name}: the NCHW BRA does not take it; expected None, got {value!r}")
            return "bra_nchw", dict(num_heads=num_heads, n_win=n_win, qk_scale=qk_scale, topk=topk,
                                    side_dwconv=side_dwconv, backend=backend)
        return "bra", dict(num_heads=num_heads, n_win=n_win, qk_dim=qk_dim, qk_scale=qk_scale, topk=topk,
                           side_dwconv=side_dwconv, auto_pad=auto_pad, backend=backend, region_size=region_size)
    if topk not in (PLAIN_ATTENTION_TOPK, ATTENTION_LEPE_TOPK):
        raise NotImplementedError(f"topks value {topk} is not implemented (released models use > 0, -1 or -2)")
    if layout == "NCHW":
        return "attention_lepe_nchw", dict(num_heads=GLOBAL_ATTENTION_HEADS, side_dwconv=NCHW_GLOBAL_LEPE_KERNEL)
    if topk == PLAIN_ATTENTION_TOPK:
        return "attention", dict(num_heads=GLOBAL_ATTENTION_HEADS, side_dwconv=0)
    return "attention_lepe", dict(num_heads=GLOBAL_ATTENTION_HEADS, side_dwconv=side_dwconv)


def stage_token_mixer(dim: int, topk: object, attn_type: str | None = None, **options: Any) -> nn.Module:
    """Build the token mixer :func:`choose_token_mixer` picks for a block of width ``dim``.

    ``options``: the keyword arguments of :func:`choose_token_mixer` (``num_heads``, ``layout``, ``n_win``, ...).
    Shapes: see :data:`TOKEN_MIXERS` (NHWC mixers (N, H, W, dim) -> same; NCHW ones (N, dim, H, W) -> same).
    """
    name, kwargs = choose_token_mixer(topk, attn_type, **options)
    return TOKEN_MIXERS[name](dim, **kwargs)
