"""BiFormer as a dense-prediction backbone: the four stage maps, as the authors' detection/segmentation code.

The authors' ``BiFormer_mm`` is the classification network without ``norm`` and ``head``, plus a LayerNorm
over channels on each stage output (``extra_norms.{0..3}``), built with ``auto_pad=True`` and an ``n_win``
chosen for the input size (16 for COCO, 8 for 512 px ADE20K crops); ``n_win="auto"`` picks it per input
from :func:`auto_n_win`, a rule through the reference's settings. :class:`BiFormerBackbone` has the same
parameter names, so the authors' dense checkpoints (``backbone.``-prefixed mmdet/mmseg files) and the
classification checkpoints (ours or the authors', head dropped) load into it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import timm
import torch
import torch.nn as nn
from timm.layers import LayerNorm2d, freeze_batch_norm_2d

from .._checks import check_feature_map, check_topk_fits
from ..checkpoint import read_state_dict, shape_mismatches, unwrap_state_dict
from ..layers import BiLevelRoutingAttention
from .biformer import BiFormer

__all__ = ["BATCH_NORM_MODES", "REFERENCE_N_WIN", "BiFormerBackbone", "LoadReport", "auto_n_win",
           "load_backbone_weights"]

NUM_STAGES = 4
BATCH_NORM_MODES = ("train", "eval", "frozen")
# Classification-only parameters that a dense backbone drops when loading a classification checkpoint.
CLASSIFICATION_ONLY_PREFIXES = ("head.", "norm.")
# The authors' mmdet/mmseg checkpoints store the backbone under this prefix, next to neck and head weights.
DENSE_CHECKPOINT_PREFIX = "backbone."
# The reference's (shorter image side in pixels, n_win) settings: ImageNet 224 px, ADE20K 512 px crops, COCO's
# 800 x 1333 images. ``auto_n_win`` interpolates between them.
REFERENCE_N_WIN = ((224, 7), (512, 8), (800, 16))
# The n_win used to build the layers of an ``n_win="auto"`` backbone before its first input (any value works:
# n_win holds no parameter).
_AUTO_BUILD_N_WIN = 7


def auto_n_win(height: int, width: int) -> int:
    """Regions per side for an (H, W) input, following the reference: 7 at 224 px, 8 at 512 px, 16 at COCO's
    800 x 1333.

    The rule uses the shorter side ``s``: below 224 px, ``round(s / 32)`` (regions of 8 x 8 stage-1 tokens,
    as n_win 7 at 224 px; at least 1); between the reference sizes, linear interpolation of their n_win,
    rounded; above 800 px, proportional to ``s`` (``round(16 * s / 800)``). Examples: 128 px -> 4,
    224 -> 7, 384 -> 8, 512 -> 8, 640 -> 12, 800 x 1333 -> 16.

    Raises:
        ValueError: a side that is not a positive integer.
    """
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    side = min(height, width)
    (first_side, first_n_win), (last_side, last_n_win) = REFERENCE_N_WIN[0], REFERENCE_N_WIN[-1]
    if side <= first_side:
        value = side * first_n_win / first_side
    elif side >= last_side:
        value = side * last_n_win / last_side
    else:
        (low, low_n), (high, high_n) = next(
            pair for pair in zip(REFERENCE_N_WIN, REFERENCE_N_WIN[1:]) if pair[0][0] <= side <= pair[1][0]
        )
        value = low_n + (high_n - low_n) * (side - low) / (high - low)
    return max(1, math.floor(value + 0.5))  # round half up


def _check_n_win(n_win: int | str) -> int | str:
    if n_win == "auto" or (not isinstance(n_win, bool) and isinstance(n_win, int) and n_win >= 1):
        return n_win
    raise ValueError(f"n_win: expected an integer >= 1 or 'auto', got {n_win!r}")


def _check_out_indices(out_indices: Sequence[int]) -> tuple[int, ...]:
    indices = tuple(out_indices) if isinstance(out_indices, (list, tuple)) else None
    if (
        not indices
        or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < NUM_STAGES for i in indices)
        or list(indices) != sorted(set(indices))
    ):
        raise ValueError(f"out_indices: expected increasing stage indices in 0..3, got {out_indices!r}")
    return indices


def _build_classifier(variant: str | Mapping, **kwargs: object) -> BiFormer:
    """A BiFormer from a registered name (``"biformer_small"``) or a dict of :class:`biformer.BiFormer` kwargs."""
    if isinstance(variant, str):
        if not variant.startswith("biformer_") or variant.startswith("biformer_stl"):
            raise ValueError(
                f"variant: expected 'biformer_tiny', 'biformer_small', 'biformer_base' or a dict of BiFormer "
                f"arguments, got {variant!r}"
            )
        return timm.create_model(variant, num_classes=0, **kwargs)
    if isinstance(variant, Mapping):
        arguments = {"auto_pad": True, **variant, **kwargs, "num_classes": 0}
        return BiFormer(**arguments)
    raise ValueError(f"variant: expected a model name or a dict of BiFormer arguments, got {type(variant).__name__}")


class BiFormerBackbone(nn.Module):
    """The four stage maps of a BiFormer, each normalised by a LayerNorm over channels.

    Args:
        variant: ``"biformer_tiny"``, ``"biformer_small"``, ``"biformer_base"``, or a dict of
            :class:`biformer.BiFormer` arguments (e.g. a small custom configuration; ``auto_pad`` defaults to
            True).
        n_win: regions per side in every BRA. The classification weights were trained with 7 at 224 px;
            the authors used 16 for COCO (about 800 x 1333 px) and 8 for 512 px ADE20K crops. ``"auto"``:
            chosen for every input from its size by :func:`auto_n_win` (at least enough regions for the
            largest ``topk``). It holds no parameters, so any value loads any checkpoint; see also
            :meth:`set_n_win`.
        region_sizes: per stage, None or a region side in tokens (fixed-size regions whose count grows with
            the image, so the cost per query stays constant); overrides ``n_win`` in those stages.
        out_indices: the stages to return (0..3, strides 4, 8, 16, 32).
        frozen_stages: freeze the stem and the first ``frozen_stages`` stages (0 freezes nothing, 4 all):
            their parameters get ``requires_grad=False`` and they stay in eval mode.
        batch_norm: ``"train"`` (ordinary BatchNorm), ``"eval"`` (running statistics frozen in training,
            affine parameters trained: the authors' ``norm_eval=True``, used in detection) or ``"frozen"``
            (``FrozenBatchNorm2d``: nothing trained, as torchvision's detection backbones).
        checkpoint: optional weight file (or state_dict) loaded with :func:`load_backbone_weights`.
        **kwargs: passed to the model constructor (``drop_path_rate``, ``backend`` ...).

    Shapes: (N, 3, H, W), any H and W -> list of maps (N, C_i, ceil(H / 2^(i+2)), ceil(W / 2^(i+2))) for
    i in ``out_indices``.
    """

    def __init__(
        self,
        variant: str | Mapping = "biformer_small",
        *,
        n_win: int | str = 7,
        region_sizes: Sequence[int | None] | None = None,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        frozen_stages: int = 0,
        batch_norm: str = "train",
        checkpoint: str | os.PathLike | Mapping | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__()
        if batch_norm not in BATCH_NORM_MODES:
            raise ValueError(f"batch_norm: expected one of {BATCH_NORM_MODES}, got {batch_norm!r}")
        if isinstance(frozen_stages, bool) or not isinstance(frozen_stages, int) or not 0 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages: expected an integer in 0..4, got {frozen_stages!r}")
        self.out_indices = _check_out_indices(out_indices)
        self.n_win = _check_n_win(n_win)
        build_n_win = _AUTO_BUILD_N_WIN if n_win == "auto" else n_win
        classifier = _build_classifier(variant, n_win=build_n_win, region_sizes=region_sizes, **kwargs)
        # Take the stem, the downsamplings and the stages; norm and head are left behind. Attribute names
        # are the classifier's, so state_dict keys match the authors' BiFormer_mm.
        self.in_chans = classifier.in_chans
        self.embed_dim = list(classifier.embed_dim)
        self.downsample_layers = classifier.downsample_layers
        self.stages = classifier.stages
        self.extra_norms = nn.ModuleList(LayerNorm2d(dim) for dim in self.embed_dim)
        self.channels = [self.embed_dim[i] for i in self.out_indices]
        self.strides = [4 * 2**i for i in self.out_indices]
        self.frozen_stages = frozen_stages
        self.batch_norm = batch_norm
        if batch_norm == "frozen":
            freeze_batch_norm_2d(self.downsample_layers)
            freeze_batch_norm_2d(self.stages)
        for index in range(frozen_stages):
            for module in (self.downsample_layers[index], self.stages[index]):
                module.requires_grad_(False)
        self.load_report: LoadReport | None = None
        if checkpoint is not None:
            self.load_report = load_backbone_weights(self, checkpoint)

    def train(self, mode: bool = True) -> BiFormerBackbone:
        """Set training mode, keeping frozen stages (and, with ``batch_norm="eval"``, BatchNorms) in eval."""
        super().train(mode)
        if mode:
            for index in range(self.frozen_stages):
                self.downsample_layers[index].eval()
                self.stages[index].eval()
            if self.batch_norm == "eval":
                for module in self.modules():
                    if isinstance(module, nn.modules.batchnorm._BatchNorm):
                        module.eval()
        return self

    def bra_layers(self) -> list[BiLevelRoutingAttention]:
        """Every BRA module of the backbone (stages 1-3)."""
        return [m for m in self.modules() if isinstance(m, BiLevelRoutingAttention)]

    def _routed_layers(self) -> list[BiLevelRoutingAttention]:
        """The BRA layers that follow ``n_win`` (not those built with a fixed ``region_size``)."""
        return [layer for layer in self.bra_layers() if layer.region_size is None]

    def smallest_n_win(self) -> int:
        """The fewest regions per side that hold the largest ``topk`` (``ceil(sqrt(topk))``)."""
        largest_topk = max((layer.topk for layer in self._routed_layers()), default=1)
        return math.isqrt(largest_topk - 1) + 1

    def set_n_win(self, n_win: int | str) -> None:
        """Use ``n_win`` regions per side from now on (e.g. per input size), or ``"auto"`` to choose it per
        input with :func:`auto_n_win`; ``topk`` must fit in n_win ** 2.

        Layers built with a fixed ``region_size`` are unaffected.
        """
        self.n_win = _check_n_win(n_win)
        if n_win != "auto":
            self._apply_n_win(n_win)

    def _apply_n_win(self, n_win: int) -> None:
        layers = self._routed_layers()
        check_topk_fits(max((layer.topk for layer in layers), default=1), n_win, blame="n_win")
        for layer in layers:
            layer.n_win = n_win

    def n_win_for(self, height: int, width: int) -> int:
        """The n_win an (H, W) input is processed with: the fixed one, or with ``"auto"``
        ``max(auto_n_win(H, W), smallest_n_win())``."""
        if self.n_win != "auto":
            return self.n_win
        return max(auto_n_win(height, width), self.smallest_n_win())

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Re-compute block activations in backward (saves memory, costs about one extra forward)."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """The conditional position-encoding parameters (as the classifier's ``no_weight_decay``)."""
        return {name for name, _ in self.named_parameters() if ".pos_embed." in name}

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, 3, H, W) -> [(N, C_i, H_i, W_i) for i in out_indices], strides 4 * 2 ** i."""
        check_feature_map(x, name="BiFormerBackbone input", layout="NCHW", channels=self.in_chans)
        if self.n_win == "auto":
            self._apply_n_win(self.n_win_for(int(x.shape[-2]), int(x.shape[-1])))
        outputs = []
        for index in range(self.out_indices[-1] + 1):
            x = self.stages[index](self.downsample_layers[index](x))
            if index in self.out_indices:
                outputs.append(self.extra_norms[index](x))
        return outputs


@dataclass
class LoadReport:
    """What :func:`load_backbone_weights` did: which keys loaded, which were dropped and which did not match."""

    loaded: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # classification head/norm, or a dense file's neck/heads
    missing: list[str] = field(default_factory=list)  # backbone keys the file lacks (left as initialised)
    unexpected: list[str] = field(default_factory=list)  # file keys the backbone does not have

    def __str__(self) -> str:
        def listing(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "") if keys else "none"

        return (
            f"loaded {len(self.loaded)} tensors; dropped {len(self.dropped)} (not part of a backbone: "
            f"{listing(self.dropped)}); missing from the file: {listing(self.missing)}; "
            f"unexpected in the file: {listing(self.unexpected)}"
        )


def _backbone_entries(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Split a checkpoint into backbone entries and dropped ones (classifier head/norm, dense neck/heads)."""
    if any(key.startswith(DENSE_CHECKPOINT_PREFIX) for key in state_dict):
        kept = {k.removeprefix(DENSE_CHECKPOINT_PREFIX): v for k, v in state_dict.items()
                if k.startswith(DENSE_CHECKPOINT_PREFIX)}
        return kept, [k for k in state_dict if not k.startswith(DENSE_CHECKPOINT_PREFIX)]
    kept = {k: v for k, v in state_dict.items() if not k.startswith(CLASSIFICATION_ONLY_PREFIXES)}
    return kept, [k for k in state_dict if k.startswith(CLASSIFICATION_ONLY_PREFIXES)]


def load_backbone_weights(
    backbone: BiFormerBackbone, checkpoint: str | os.PathLike | Mapping, strict: bool = True
) -> LoadReport:
    """Load a classification or dense checkpoint into ``backbone``, dropping what a backbone has no use for.

    Accepted: our files and the authors' classification checkpoints (``{"model": state_dict}``; ``head.*``
    and ``norm.*`` are dropped), the authors' mmdet/mmseg files (``{"state_dict": {"backbone.…": …}}``; only
    ``backbone.*`` is kept, prefix stripped), ``.safetensors``, or an in-memory state_dict. Files are read
    safely (:func:`biformer.read_state_dict`). ``extra_norms.*`` missing from a classification file is
    expected: they keep their initialisation (weight 1, bias 0).

    Raises:
        ValueError: shapes differ; no key matches; or, with ``strict``, a backbone key other than
            ``extra_norms.*`` is missing or a file key is unexpected (the message lists them).
    """
    state_dict = unwrap_state_dict(checkpoint) if isinstance(checkpoint, Mapping) else read_state_dict(checkpoint)
    entries, dropped = _backbone_entries(state_dict)
    own = backbone.state_dict()
    mismatched = shape_mismatches(entries, own, "backbone")
    if mismatched:
        raise ValueError("checkpoint: shapes differ from the backbone (another variant?): " + "; ".join(mismatched[:8]))
    result = backbone.load_state_dict(entries, strict=False)
    report = LoadReport(
        loaded=[key for key in entries if key in own],
        dropped=dropped,
        missing=list(result.missing_keys),
        unexpected=list(result.unexpected_keys),
    )
    if not report.loaded:
        raise ValueError(f"checkpoint: no key matches a BiFormer backbone ({report})")
    serious_missing = [key for key in report.missing if not key.startswith("extra_norms.")]
    if strict and (serious_missing or report.unexpected):
        raise ValueError(f"checkpoint does not match the backbone: {report}")
    return report
