"""torchvision detectors (Mask R-CNN, RetinaNet) on a BiFormer + FPN backbone, each built by one call.

Images go in as torchvision expects: a list of (3, H, W) float tensors in [0, 1], any sizes; the model's
``GeneralizedRCNNTransform`` normalises them (ImageNet mean/std) and resizes them so the shorter side is
``min_size`` (the longer at most ``max_size``): small values keep CPU training affordable.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock,
    FeaturePyramidNetwork,
    LastLevelMaxPool,
    LastLevelP6P7,
)

from .._checks import check_positive_int
from ..models.backbone import BiFormerBackbone

__all__ = [
    "BiFormerFPN",
    "maskrcnn_biformer",
    "maskrcnn_biformer_base",
    "maskrcnn_biformer_small",
    "maskrcnn_biformer_tiny",
    "retinanet_biformer",
    "retinanet_biformer_base",
    "retinanet_biformer_small",
    "retinanet_biformer_tiny",
]

# torchvision's defaults: one anchor size per pyramid level (Mask R-CNN: P2-P6; RetinaNet: P3-P7).
MASKRCNN_ANCHOR_SIZES = (32, 64, 128, 256, 512)
RETINANET_ANCHOR_SIZES = (32, 64, 128, 256, 512)


class BiFormerFPN(nn.Module):
    """A :class:`BiFormerBackbone` followed by torchvision's ``FeaturePyramidNetwork``.

    Shapes: (N, 3, H, W) -> OrderedDict of (N, out_channels, H_l, W_l) maps, finest first: one per backbone
    output (keys "0", "1", ...) then the ``extra_blocks`` levels ("pool" or "p6", "p7"). ``out_channels``
    is what torchvision's detectors read.
    """

    def __init__(self, body: BiFormerBackbone, out_channels: int = 256, extra_blocks: ExtraFPNBlock | None = None):
        super().__init__()
        self.body = body
        self.out_channels = check_positive_int(out_channels, name="fpn_channels")
        self.fpn = FeaturePyramidNetwork(body.channels, out_channels, extra_blocks=extra_blocks)

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        features = self.body(x)
        return self.fpn(OrderedDict((str(index), feature) for index, feature in enumerate(features)))


def _anchor_generator(sizes: Sequence[int], scales_per_octave: int, num_levels: int) -> AnchorGenerator:
    """One octave of ``scales_per_octave`` sizes per level starting at ``sizes[l]``, aspect ratios 0.5, 1, 2."""
    if not isinstance(sizes, (list, tuple)) or len(sizes) != num_levels or any(
        not isinstance(size, (int, float)) or size <= 0 for size in sizes
    ):
        raise ValueError(f"anchor_sizes: expected {num_levels} positive sizes (one per pyramid level), got {sizes!r}")
    per_level = tuple(tuple(size * 2 ** (i / scales_per_octave) for i in range(scales_per_octave)) for size in sizes)
    return AnchorGenerator(per_level, ((0.5, 1.0, 2.0),) * num_levels)


def _check_sizes(min_size: int, max_size: int) -> None:
    check_positive_int(min_size, name="min_size")
    if check_positive_int(max_size, name="max_size") < min_size:
        raise ValueError(f"max_size: expected at least min_size ({min_size}), got {max_size}")


def _backbone(
    variant: str | Mapping,
    out_indices: tuple[int, ...],
    checkpoint: str | os.PathLike | Mapping | None,
    backbone_options: Mapping | None,
) -> BiFormerBackbone:
    options = {"n_win": 16, "batch_norm": "eval", **(backbone_options or {})}
    return BiFormerBackbone(variant, out_indices=out_indices, checkpoint=checkpoint, **options)


def maskrcnn_biformer(
    variant: str | Mapping = "biformer_small",
    num_classes: int = 91,
    *,
    checkpoint: str | os.PathLike | Mapping | None = None,
    backbone_options: Mapping | None = None,
    fpn_channels: int = 256,
    representation_size: int = 1024,
    mask_head_channels: int = 256,
    anchor_sizes: Sequence[int] = MASKRCNN_ANCHOR_SIZES,
    min_size: int = 800,
    max_size: int = 1333,
    **kwargs: object,
) -> MaskRCNN:
    """torchvision Mask R-CNN on BiFormer + FPN (P2-P5 from the four stages, plus a max-pooled P6).

    Args:
        variant: backbone variant name or dict of :class:`biformer.BiFormer` arguments.
        num_classes: including the background (class 0); labels in targets are 1..num_classes-1.
        checkpoint: classification or dense weight file for the backbone (see
            :func:`~biformer.dense.load_backbone_weights`; head dropped, report in ``backbone.body.load_report``).
        backbone_options: more :class:`BiFormerBackbone` arguments; defaults ``n_win=16`` and
            ``batch_norm="eval"`` (the authors' COCO setting).
        fpn_channels, representation_size, mask_head_channels: widths of the FPN, the box head's two MLP
            layers and the mask head's four convs (torchvision's defaults: 256, 1024, 256; smaller for CPU).
        anchor_sizes: one anchor size per level P2-P6 (aspect ratios 0.5, 1, 2).
        min_size, max_size: the shorter image side is resized to ``min_size``, the longer kept <= max_size.
        **kwargs: passed to ``torchvision.models.detection.MaskRCNN`` (``rpn_post_nms_top_n_train`` ...).

    Returns the model: in training ``model(images, targets)`` gives a dict of losses; in eval
    ``model(images)`` gives per image ``boxes`` (K, 4) xyxy, ``labels`` (K,), ``scores`` (K,) and ``masks``
    (K, 1, H, W) probabilities.
    """
    num_classes = check_positive_int(num_classes, name="num_classes", minimum=2)
    _check_sizes(min_size, max_size)
    backbone = BiFormerFPN(_backbone(variant, (0, 1, 2, 3), checkpoint, backbone_options), fpn_channels,
                           LastLevelMaxPool())
    representation_size = check_positive_int(representation_size, name="representation_size")
    mask_head_channels = check_positive_int(mask_head_channels, name="mask_head_channels")
    return MaskRCNN(
        backbone,
        num_classes=None,
        min_size=min_size,
        max_size=max_size,
        rpn_anchor_generator=_anchor_generator(anchor_sizes, 1, 5),
        box_head=TwoMLPHead(fpn_channels * 7 * 7, representation_size),  # 7 x 7 RoIAlign output
        box_predictor=FastRCNNPredictor(representation_size, num_classes),
        mask_head=MaskRCNNHeads(fpn_channels, [mask_head_channels] * 4, dilation=1),
        mask_predictor=MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes),
        **kwargs,
    )


def retinanet_biformer(
    variant: str | Mapping = "biformer_small",
    num_classes: int = 91,
    *,
    checkpoint: str | os.PathLike | Mapping | None = None,
    backbone_options: Mapping | None = None,
    fpn_channels: int = 256,
    anchor_sizes: Sequence[int] = RETINANET_ANCHOR_SIZES,
    min_size: int = 800,
    max_size: int = 1333,
    **kwargs: object,
) -> RetinaNet:
    """torchvision RetinaNet on BiFormer + FPN (P3-P5 from stages 2-4, P6 and P7 by strided convs on P5).

    Arguments as :func:`maskrcnn_biformer`; ``anchor_sizes`` gives the smallest anchor of each level P3-P7
    (three scales per octave, aspect ratios 0.5, 1, 2). ``num_classes`` counts class 0 as in torchvision's
    COCO models. In eval ``model(images)`` gives per image ``boxes``, ``labels`` and ``scores``.
    """
    num_classes = check_positive_int(num_classes, name="num_classes", minimum=2)
    _check_sizes(min_size, max_size)
    backbone = BiFormerFPN(_backbone(variant, (1, 2, 3), checkpoint, backbone_options), fpn_channels,
                           LastLevelP6P7(fpn_channels, fpn_channels))
    return RetinaNet(
        backbone,
        num_classes=num_classes,
        min_size=min_size,
        max_size=max_size,
        anchor_generator=_anchor_generator(anchor_sizes, 3, 5),
        **kwargs,
    )


def maskrcnn_biformer_tiny(num_classes: int = 91, **kwargs: object) -> MaskRCNN:
    """Mask R-CNN with a BiFormer-T + FPN backbone (see :func:`maskrcnn_biformer`)."""
    return maskrcnn_biformer("biformer_tiny", num_classes, **kwargs)


def maskrcnn_biformer_small(num_classes: int = 91, **kwargs: object) -> MaskRCNN:
    """Mask R-CNN with a BiFormer-S + FPN backbone, the paper's setting (47.8 box / 43.2 mask mAP, COCO 1x)."""
    return maskrcnn_biformer("biformer_small", num_classes, **kwargs)


def maskrcnn_biformer_base(num_classes: int = 91, **kwargs: object) -> MaskRCNN:
    """Mask R-CNN with a BiFormer-B + FPN backbone (see :func:`maskrcnn_biformer`)."""
    return maskrcnn_biformer("biformer_base", num_classes, **kwargs)


def retinanet_biformer_tiny(num_classes: int = 91, **kwargs: object) -> RetinaNet:
    """RetinaNet with a BiFormer-T + FPN backbone (see :func:`retinanet_biformer`)."""
    return retinanet_biformer("biformer_tiny", num_classes, **kwargs)


def retinanet_biformer_small(num_classes: int = 91, **kwargs: object) -> RetinaNet:
    """RetinaNet with a BiFormer-S + FPN backbone (see :func:`retinanet_biformer`)."""
    return retinanet_biformer("biformer_small", num_classes, **kwargs)


def retinanet_biformer_base(num_classes: int = 91, **kwargs: object) -> RetinaNet:
    """RetinaNet with a BiFormer-B + FPN backbone (see :func:`retinanet_biformer`)."""
    return retinanet_biformer("biformer_base", num_classes, **kwargs)
