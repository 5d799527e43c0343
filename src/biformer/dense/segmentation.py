"""Semantic segmentation on a BiFormer backbone: Semantic FPN (the paper's ADE20K head) and UperNet.

Both heads take the four stage maps (strides 4..32) and predict at stride 4; :class:`SemanticSegmentor`
normalises [0, 1] images, runs backbone and head, and resizes the logits to the input size, so any H and W
work. UperNet can have the auxiliary FCN head of the mmseg configs the paper used (on stage 3, loss weight
0.4, training only): :class:`AuxiliaryFCNHead`.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.ops import Conv2dNormActivation, FeaturePyramidNetwork

from .._checks import check_feature_map, check_positive_int
from ..models.backbone import BiFormerBackbone

__all__ = [
    "AUXILIARY_LOSS_WEIGHT",
    "AuxiliaryFCNHead",
    "SemanticFPNHead",
    "SemanticSegmentor",
    "UperNetHead",
    "semantic_fpn_biformer",
    "semantic_fpn_biformer_base",
    "semantic_fpn_biformer_small",
    "semantic_fpn_biformer_tiny",
    "upernet_biformer",
    "upernet_biformer_base",
    "upernet_biformer_small",
    "upernet_biformer_tiny",
]


# The weight of the auxiliary head's cross-entropy in the mmseg UperNet configs the paper used.
AUXILIARY_LOSS_WEIGHT = 0.4


def _resize(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize of (N, C, h, w) to (N, C, *size) (no-op when the size already matches)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> Conv2dNormActivation:
    return Conv2dNormActivation(in_channels, out_channels, kernel_size, norm_layer=nn.BatchNorm2d,
                                activation_layer=nn.ReLU)


def _check_channels(in_channels: Sequence[int]) -> list[int]:
    if not isinstance(in_channels, (list, tuple)) or len(in_channels) != 4 or any(
        isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in in_channels
    ):
        raise ValueError(f"in_channels: expected 4 positive channel counts (strides 4..32), got {in_channels!r}")
    return list(in_channels)


class SemanticFPNHead(nn.Module):
    """Semantic FPN (Kirillov et al., 2019): an FPN over the four maps, then per level as many
    (3x3 conv, BN, ReLU, 2x upsampling) steps as needed to reach stride 4, summed, dropout, 1x1 classifier.

    Args:
        in_channels: channels of the four backbone maps.
        num_classes: output classes.
        fpn_channels: FPN width (256 in the paper).
        channels: width of the upsampling branches (128 in the paper).
        dropout: before the classifier (0.1 in the paper).

    Shapes: four maps (N, in_channels[i], H_i, W_i) -> logits (N, num_classes, H_0, W_0) at stride 4.
    """

    def __init__(
        self, in_channels: Sequence[int], num_classes: int, fpn_channels: int = 256, channels: int = 128,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.fpn = FeaturePyramidNetwork(_check_channels(in_channels), check_positive_int(fpn_channels,
                                         name="fpn_channels"))
        channels = check_positive_int(channels, name="channels")
        # Level i (stride 4 * 2^i) needs max(1, i) conv steps, i of them followed by an upsampling.
        self.scale_heads = nn.ModuleList(
            nn.ModuleList(_conv_bn_relu(fpn_channels if step == 0 else channels, channels, 3)
                          for step in range(max(1, level)))
            for level in range(4)
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, check_positive_int(num_classes, name="num_classes"), 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        pyramid = list(self.fpn(OrderedDict((str(i), f) for i, f in enumerate(features))).values())
        sizes = [p.shape[-2:] for p in pyramid]  # the exact size of each level, for odd input sizes
        output = None
        for level, steps in enumerate(self.scale_heads):
            x = pyramid[level]
            for step, conv in enumerate(steps):
                x = conv(x)
                if level > 0:
                    x = _resize(x, sizes[level - step - 1])  # one octave finer
            output = x if output is None else output + x
        return self.classifier(self.dropout(output))


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: average-pool to each scale, 1x1 conv-BN-ReLU, upsample, concatenate with
    the input. Shapes: (N, C, h, w) -> (N, C + len(scales) * channels, h, w)."""

    def __init__(self, in_channels: int, channels: int, scales: Sequence[int]) -> None:
        super().__init__()
        self.scales = list(scales)
        self.branches = nn.ModuleList(_conv_bn_relu(in_channels, channels, 1) for _ in self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = [_resize(branch(F.adaptive_avg_pool2d(x, scale)), x.shape[-2:])
                  for scale, branch in zip(self.scales, self.branches)]
        return torch.cat([x, *pooled], dim=1)


class UperNetHead(nn.Module):
    """UperNet (Xiao et al., 2018): pyramid pooling on the coarsest map, an FPN with conv-BN-ReLU laterals
    and outputs, all levels upsampled to stride 4 and fused by a 3x3 conv, dropout, 1x1 classifier.

    Args:
        in_channels: channels of the four backbone maps.
        num_classes: output classes.
        channels: width of every branch (512 in the paper's setting).
        pool_scales: pyramid pooling output sizes.
        dropout: before the classifier.

    Shapes: four maps (N, in_channels[i], H_i, W_i) -> logits (N, num_classes, H_0, W_0) at stride 4.
    """

    def __init__(
        self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1,
    ) -> None:
        super().__init__()
        in_channels = _check_channels(in_channels)
        channels = check_positive_int(channels, name="channels")
        self.pyramid_pooling = PyramidPooling(in_channels[-1], channels, pool_scales)
        self.pooling_bottleneck = _conv_bn_relu(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList(_conv_bn_relu(c, channels, 1) for c in in_channels[:-1])
        self.outputs = nn.ModuleList(_conv_bn_relu(channels, channels, 3) for _ in in_channels[:-1])
        self.fusion = _conv_bn_relu(4 * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, check_positive_int(num_classes, name="num_classes"), 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        top = self.pooling_bottleneck(self.pyramid_pooling(features[-1]))
        laterals = [lateral(f) for lateral, f in zip(self.laterals, features)] + [top]
        for level in range(len(laterals) - 2, -1, -1):  # top-down: add the coarser level, upsampled
            laterals[level] = laterals[level] + _resize(laterals[level + 1], laterals[level].shape[-2:])
        levels = [conv(x) for conv, x in zip(self.outputs, laterals)] + [top]
        size = levels[0].shape[-2:]
        fused = self.fusion(torch.cat([_resize(x, size) for x in levels], dim=1))  # (N, 4 * channels, H_0, W_0)
        return self.classifier(self.dropout(fused))


class AuxiliaryFCNHead(nn.Module):
    """The auxiliary head of mmseg's UperNet configs: on one backbone map (stage 3, stride 16), a 3x3
    conv-BN-ReLU, dropout and a 1x1 classifier. It only adds a training loss (weight
    :data:`AUXILIARY_LOSS_WEIGHT`); predictions come from the main head.

    Args:
        in_channels: channels of the map it reads.
        num_classes: output classes.
        channels: width of its conv (256 in mmseg).
        in_index: which of the four backbone maps it reads (2: stage 3).
        dropout: before the classifier (0.1 in mmseg).

    Shapes: four maps -> logits (N, num_classes, H_i, W_i) at the stride of map ``in_index``.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, in_index: int = 2,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.in_index = in_index
        self.conv = _conv_bn_relu(check_positive_int(in_channels, name="in_channels"),
                                  check_positive_int(channels, name="channels"), 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, check_positive_int(num_classes, name="num_classes"), 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(features[self.in_index])))


class SemanticSegmentor(nn.Module):
    """Backbone + decode head (+ an optional auxiliary head). Images in [0, 1] are normalised with
    ``mean``/``std`` inside.

    Shapes: (N, 3, H, W) -> logits (N, num_classes, H, W). In training mode with an ``auxiliary_head`` the
    result is a pair ``(logits, auxiliary_logits)``, both (N, num_classes, H, W); in eval mode it is always
    the main logits alone.
    """

    def __init__(
        self, backbone: BiFormerBackbone, head: nn.Module,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
        auxiliary_head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.auxiliary_head = auxiliary_head
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        check_feature_map(images, name="SemanticSegmentor input", layout="NCHW", channels=self.backbone.in_chans)
        features = self.backbone((images - self.mean) / self.std)
        logits = _resize(self.head(features), images.shape[-2:])  # (N, classes, H, W) from ~H/4
        if self.training and self.auxiliary_head is not None:
            return logits, _resize(self.auxiliary_head(features), images.shape[-2:])  # from ~H/16
        return logits


def _segmentor(
    head_class: type[nn.Module],
    variant: str | Mapping,
    num_classes: int,
    checkpoint: str | os.PathLike | Mapping | None,
    backbone_options: Mapping | None,
    head_options: Mapping | None,
    auxiliary_head: bool | Mapping = False,
) -> SemanticSegmentor:
    options = {"n_win": 8, **(backbone_options or {})}
    backbone = BiFormerBackbone(variant, checkpoint=checkpoint, **options)
    if backbone.out_indices != (0, 1, 2, 3):
        raise ValueError(f"backbone_options: the heads need all four stages, got out_indices={backbone.out_indices}")
    if not isinstance(auxiliary_head, (bool, Mapping)):
        raise ValueError(f"auxiliary_head: expected True, False or a dict of AuxiliaryFCNHead arguments, "
                         f"got {auxiliary_head!r}")
    auxiliary = None
    if auxiliary_head is not False:
        arguments = dict(auxiliary_head) if isinstance(auxiliary_head, Mapping) else {}
        in_index = arguments.pop("in_index", 2)
        if in_index not in range(4):
            raise ValueError(f"auxiliary_head: in_index must be a stage index in 0..3, got {in_index!r}")
        auxiliary = AuxiliaryFCNHead(backbone.channels[in_index], num_classes, in_index=in_index, **arguments)
    head = head_class(backbone.channels, num_classes, **(head_options or {}))
    return SemanticSegmentor(backbone, head, auxiliary_head=auxiliary)


def semantic_fpn_biformer(
    variant: str | Mapping = "biformer_small",
    num_classes: int = 150,
    *,
    checkpoint: str | os.PathLike | Mapping | None = None,
    backbone_options: Mapping | None = None,
    head_options: Mapping | None = None,
) -> SemanticSegmentor:
    """BiFormer + Semantic FPN, the paper's ADE20K model (BiFormer-S: 48.9 mIoU).

    Args:
        variant: backbone name or dict of :class:`biformer.BiFormer` arguments.
        num_classes: output classes (150 for ADE20K).
        checkpoint: classification or dense weights for the backbone (head dropped; report in
            ``model.backbone.load_report``).
        backbone_options: more :class:`BiFormerBackbone` arguments (default ``n_win=8``, the authors' 512 px
            setting).
        head_options: :class:`SemanticFPNHead` arguments (``fpn_channels``, ``channels``, ``dropout``).
    """
    return _segmentor(SemanticFPNHead, variant, num_classes, checkpoint, backbone_options, head_options)


def upernet_biformer(
    variant: str | Mapping = "biformer_small",
    num_classes: int = 150,
    *,
    checkpoint: str | os.PathLike | Mapping | None = None,
    backbone_options: Mapping | None = None,
    head_options: Mapping | None = None,
    auxiliary_head: bool | Mapping = False,
) -> SemanticSegmentor:
    """BiFormer + UperNet; arguments as :func:`semantic_fpn_biformer`, ``head_options`` for
    :class:`UperNetHead` (``channels``, ``pool_scales``, ``dropout``). ``auxiliary_head``: True (or a dict
    of :class:`AuxiliaryFCNHead` arguments: ``channels``, ``in_index``, ``dropout``) adds the mmseg
    auxiliary FCN head on stage 3; the model then returns ``(logits, auxiliary_logits)`` in training mode."""
    return _segmentor(UperNetHead, variant, num_classes, checkpoint, backbone_options, head_options, auxiliary_head)


def semantic_fpn_biformer_tiny(num_classes: int = 150, **kwargs: object) -> SemanticSegmentor:
    """Semantic FPN on BiFormer-T (see :func:`semantic_fpn_biformer`)."""
    return semantic_fpn_biformer("biformer_tiny", num_classes, **kwargs)


def semantic_fpn_biformer_small(num_classes: int = 150, **kwargs: object) -> SemanticSegmentor:
    """Semantic FPN on BiFormer-S (see :func:`semantic_fpn_biformer`)."""
    return semantic_fpn_biformer("biformer_small", num_classes, **kwargs)


def semantic_fpn_biformer_base(num_classes: int = 150, **kwargs: object) -> SemanticSegmentor:
    """Semantic FPN on BiFormer-B (see :func:`semantic_fpn_biformer`)."""
    return semantic_fpn_biformer("biformer_base", num_classes, **kwargs)


def upernet_biformer_tiny(num_classes: int = 150, **kwargs: object) -> SemanticSegmentor:
    """UperNet on BiFormer-T (see :func:`upernet_biformer`)."""
    return upernet_biformer("biformer_tiny", num_classes, **kwargs)


def upernet_biformer_small(num_classes: int = 150, **kwargs: object) -> SemanticSegmentor:
    """UperNet on BiFormer-S (see :func:`upernet_biformer`)."""
    return upernet_biformer("biformer_small", num_classes, **kwargs)


def upernet_biformer_base(num_classes: int = 150, **kwargs: object) -> SemanticSegmentor:
    """UperNet on BiFormer-B (see :func:`upernet_biformer`)."""
    return upernet_biformer("biformer_base", num_classes, **kwargs)
