"""What the model families share besides the network machinery of :mod:`._pyramid`: the pretrained
configurations of every registered variant (:data:`default_cfgs`, one table, ``biformer_nano`` included), the
weight init and the checkpoint filter.

A family module imports :data:`default_cfgs` so that timm's ``register_model`` finds the configuration of each
entry point it defines; each entry point holds its architecture as ``model_args = dict(...)`` (timm's style).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import generate_default_cfgs

__all__ = ["MODEL_NAMES", "RELEASED_MODEL_NAMES", "checkpoint_filter_fn", "default_cfgs", "init_weights",
           "pretrained_cfg"]


def pretrained_cfg(url: str = "", **kwargs: object) -> dict:
    """timm's pretrained configuration of a BiFormer variant (preprocessing of the released weights, the first
    conv and the classifier names); ``kwargs`` override entries."""
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


# Every registered variant. The released weights' links are the authors' (OneDrive shares and a short link,
# broken at the time of writing): use a local file with ``pretrained_cfg_overlay=dict(file=PATH)``.
default_cfgs = generate_default_cfgs(
    {
        "biformer_tiny.in1k": pretrained_cfg(
            url="https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHEOoGkgwgQzEDlM/root/content"
        ),
        "biformer_small.in1k": pretrained_cfg(
            url="https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHDyM-x9KWRBZ832/root/content"
        ),
        "biformer_base.in1k": pretrained_cfg(
            url="https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChHI_XPhoadjaNxtO/root/content"
        ),
        "biformer_stl.in1k": pretrained_cfg(url="https://matix.li/4e9034a91a23"),
        "biformer_stl_nchw.in1k": pretrained_cfg(
            url="https://api.onedrive.com/v1.0/shares/s!AkBbczdRlZvChWYrKbWbMgqd2Ai0/root/content"
        ),
        "biformer_nano.untrained": pretrained_cfg(url=""),  # ours, for quick experiments; no released weights
    }
)

# Every registered model, in the table's order; the released ones (the authors' weights load unchanged,
# tests/reference holds their state_dict manifests) are those with a published link.
MODEL_NAMES = tuple(default_cfgs)
RELEASED_MODEL_NAMES = tuple(name for name in MODEL_NAMES if default_cfgs[name].default.url)


def init_weights(module: nn.Module) -> None:
    """The reference's init: truncated normal (std 0.02) Linear weights, zero biases, unit LayerNorms.

    Applied with ``model.apply(init_weights)``; convolutions keep torch's default init, as in the reference.
    """
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
