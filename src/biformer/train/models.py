"""``biformer_nano``: a small BiFormer for quick experiments and the quick start, registered with timm.

Same layout as BiFormer-T (conv stem, BRA in stages 1-3, plain attention with LePE in stage 4) with one or
two blocks per stage, half the width and 16-channel heads: 1.71 M parameters with a 1000-way head, 1.46 M
with 10 classes.
For 224 px images its defaults are BiFormer-T's (``n_win`` 7, top-k 1, 4, 16); for small images pass fewer
regions, e.g. ``n_win=2, topks=[2, 2, 4, -2]`` at 32 px (stage maps 8, 4, 2, 1 pixels per side).
"""

from __future__ import annotations

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ..models.biformer import BiFormer, _cfg, checkpoint_filter_fn

__all__ = ["biformer_nano"]

NANO_ARCHITECTURE = dict(
    depth=[1, 1, 2, 1], embed_dim=[32, 64, 128, 256], qk_dims=[32, 64, 128, 256], head_dim=16,
    mlp_ratios=[3, 3, 3, 3], n_win=7, topks=[1, 4, 16, -2], side_dwconv=5, before_attn_dwconv=3, auto_pad=True,
)

default_cfgs = generate_default_cfgs({"biformer_nano.untrained": _cfg(url="")})


@register_model
def biformer_nano(pretrained: bool = False, **kwargs: object) -> BiFormer:
    """BiFormer-Nano: 1.71 M parameters; depth 1, 1, 2, 1; widths 32-256 (no released weights)."""
    architecture = {**NANO_ARCHITECTURE, **kwargs}
    if "embed_dim" in kwargs and "qk_dims" not in kwargs:
        architecture["qk_dims"] = architecture["embed_dim"]
    return build_model_with_cfg(
        BiFormer, "biformer_nano", pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"), **architecture,
    )
