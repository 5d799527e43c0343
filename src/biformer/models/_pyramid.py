"""What every BiFormer family shares: a four-stage pyramid with the timm model interface.

Subclasses build ``downsample_layers`` (4), ``stages`` (4, each with a ``grad_checkpointing`` flag) and
``norm``, set ``in_chans``, ``embed_dim`` and ``min_input_size``, then call :meth:`_init_feature_info`,
:meth:`_init_head` (``global_pool``, ``head_drop``, ``head``) and, after their weight init, :meth:`_place`
(``device=`` / ``dtype=``).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError
from timm.layers import SelectAdaptivePool2d, register_notrace_module
from timm.models import build_model_with_cfg, resolve_pretrained_cfg
from timm.models._features import FeatureDictNet, feature_take_indices
from torch.utils.checkpoint import checkpoint

from .._checks import check_feature_map, is_tracing
from ..layers import (
    AttentionLePE,
    AttentionLePENCHW,
    BiLevelRoutingAttention,
    BiLevelRoutingAttentionNCHW,
    ProjectedAttention,
)

NUM_STAGES = 4

# torch.fx traces the networks down to their attention layers and keeps those as single calls (their data flow
# depends on the input size and the chosen backend): timm's fx feature extraction (``features_only=True,
# feature_cls="fx"``, ``timm.models.create_feature_extractor``, ``get_graph_node_names``) uses this list.
for _attention_class in (
    BiLevelRoutingAttention, BiLevelRoutingAttentionNCHW, AttentionLePE, AttentionLePENCHW, ProjectedAttention,
):
    register_notrace_module(_attention_class)

# timm's global pooling types (``timm.layers.SelectAdaptivePool2d``); "" keeps the map unpooled.
POOL_TYPES = ("", "avg", "max", "avgmax", "catavgmax", "fast", "fastavg", "fastmax", "fastavgmax", "fastcatavgmax")
# Without gradients a stage runs its blocks on groups of images whose activations take about this many
# bytes: the temporaries of a group (3x-wide projections, MLP hidden layers) then come from the heap and
# stay in cache instead of being fresh pages (a page fault per 4 KiB on CPU: 10-25% of the time at batch 8).
INFERENCE_GROUP_BYTES = 2**20


# Keyword arguments of an entry point that configure timm's loading, not the architecture.
_LOADING_ARGUMENTS = (
    "pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "device", "dtype", "pretrained_model_args",
)


def build_pyramid_model(
    model_class: type[nn.Module], variant: str, pretrained: bool, checkpoint_filter: Callable,
    requested: dict[str, Any], **architecture: Any,
) -> nn.Module:
    """``timm.models.build_model_with_cfg`` with our checkpoint filter and feature getter.

    Records the keyword arguments the caller gave (``requested``, minus timm's loading options) as
    ``model._model_args``, as timm >= 1.0.31 does in ``create_model``, so :mod:`biformer.hub` can rebuild
    the model on older timm releases and for models made by calling the entry point directly.
    """
    if pretrained:
        _check_pretrained_source(variant, architecture)
    if architecture.get("features_only") and str(architecture.get("feature_cls", "")).lower() == "dict":
        architecture["feature_cls"] = PyramidFeatureDictNet  # timm's FeatureDictNet needs one chain of children
    device = architecture.get("device")
    placement = torch.device(device) if device is not None else contextlib.nullcontext()
    try:
        with placement:  # parameters are made on the device (a meta build allocates nothing)
            model = build_model_with_cfg(
                model_class, variant, pretrained, pretrained_filter_fn=checkpoint_filter,
                feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"), **architecture,
            )
    except (OSError, EOFError, RuntimeError, SafetensorError) as error:
        if not pretrained or isinstance(error, FileNotFoundError):
            raise  # a missing local file names itself
        if _local_source(architecture):
            unreadable = not isinstance(error, RuntimeError) or "PytorchStreamReader" in str(error)
            if not unreadable:
                raise  # weights that do not fit: torch's key listing
            overlay = architecture.get("pretrained_cfg_overlay") or {}
            source = overlay.get("file") or "the given state_dict"
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"pretrained weights {source}: cannot read them ({type(error).__name__}: {reason}; "
                             f"truncated or not a weights file?)") from error
        if not isinstance(error, OSError):  # urllib's URLError and HTTPError are OSErrors
            raise
        url = resolve_pretrained_cfg(
            variant, pretrained_cfg=architecture.get("pretrained_cfg"),
            pretrained_cfg_overlay=architecture.get("pretrained_cfg_overlay"),
        ).url
        raise RuntimeError(
            f"pretrained: cannot download the weights of {variant} from {url} ({error}); download the file "
            f"yourself and pass pretrained_cfg_overlay=dict(file=PATH)"
        ) from error
    model._model_args = {key: value for key, value in requested.items() if key not in _LOADING_ARGUMENTS}
    return model


def _local_source(architecture: dict) -> bool:
    overlay = architecture.get("pretrained_cfg_overlay") or {}
    return bool(overlay.get("file") or overlay.get("state_dict") is not None)


def _check_pretrained_source(variant: str, architecture: dict) -> None:
    """``pretrained=True`` for a model without released weights and no file given: one clear line (timm would
    only log a warning and return random weights)."""
    cfg = resolve_pretrained_cfg(
        variant, pretrained_cfg=architecture.get("pretrained_cfg"),
        pretrained_cfg_overlay=architecture.get("pretrained_cfg_overlay"),
    )
    if not any(getattr(cfg, key, None) for key in ("file", "url", "hf_hub_id")) and cfg.state_dict is None:
        raise ValueError(
            f"pretrained: {variant} has no released weights; pass your own with "
            f"pretrained_cfg_overlay=dict(file=PATH) (a .pth or .safetensors file)"
        )


class PyramidFeatureDictNet(FeatureDictNet):
    """``features_only=True, feature_cls="dict"``: timm's :class:`~timm.models.FeatureDictNet` over the network
    laid out as one chain ``downsample_layers_0, stages_0, downsample_layers_1, ...`` (the model itself keeps the
    authors' ``downsample_layers.i`` / ``stages.i`` names). Returns an ``OrderedDict`` of NCHW stage maps keyed
    by the stage index as a string (or by ``out_map``)."""

    def __init__(self, model: nn.Module, out_indices: tuple[int, ...] = (0, 1, 2, 3), **kwargs: Any) -> None:
        chain = nn.Module()
        for index, (downsample, stage) in enumerate(zip(model.downsample_layers, model.stages)):
            chain.add_module(f"downsample_layers_{index}", downsample)
            chain.add_module(f"stages_{index}", stage)
        chain.feature_info = [dict(info, module=f"stages_{i}") for i, info in enumerate(model.feature_info)]
        kwargs.pop("flatten_sequential", None)
        super().__init__(chain, out_indices=out_indices, **kwargs)
        self.input_spec = (type(model).__name__, model.in_chans, model.min_input_size, model.channels_last_memory)

    def _collect(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return super()._collect(prepare_input(x, *self.input_spec))


def prepare_input(x: torch.Tensor, name: str, in_chans: int, min_size: int, channels_last: bool) -> torch.Tensor:
    """Check the input images of model ``name`` (skipped while tracing) and put them in the memory format
    the network runs in (channels-last when ``channels_last``)."""
    if not is_tracing(x):
        check_feature_map(x, name=f"{name} input", layout="NCHW", channels=in_chans)
        if min(x.shape[-2:]) < min_size:
            raise ValueError(f"{name} input: expected H and W >= {min_size}, got {tuple(x.shape[-2:])}")
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _must_see_whole_batch(blocks: nn.Module) -> bool:
    """Whether a BRA module among ``blocks`` needs the whole batch in one call: it runs the reference
    formulation (kept as the authors' data flow) or its routing is being recorded (records are per call)."""
    return any(
        module.needs_whole_batch
        for module in blocks.modules()
        if isinstance(module, (BiLevelRoutingAttention, BiLevelRoutingAttentionNCHW))
    )


def inference_group_size(blocks: nn.Module, x: torch.Tensor) -> int | None:
    """Images per group when ``blocks`` run on ``x`` (batch first) without gradients; None: the whole batch."""
    if torch.is_grad_enabled() or is_tracing(x) or x.shape[0] == 1:
        return None
    group = max(1, INFERENCE_GROUP_BYTES // (x[0].numel() * x.element_size()))
    if group >= x.shape[0] or _must_see_whole_batch(blocks):
        return None
    return group


def run_blocks(blocks: nn.Module, x: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    """Run ``blocks`` in order, re-computing each in backward when ``grad_checkpointing``.

    Without gradients, groups of images run through all the blocks one group after the other (see
    ``INFERENCE_GROUP_BYTES``; every image is computed independently, so the result is the same).
    """
    group = inference_group_size(blocks, x)
    if group is not None:
        return torch.cat([run_blocks(blocks, part, grad_checkpointing) for part in x.split(group)])
    for block in blocks:
        if grad_checkpointing and torch.is_grad_enabled() and not isinstance(x, torch.fx.Proxy):
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x


def stochastic_depth_rates(depth: list[int] | tuple[int, ...], drop_path_rate: float) -> list[list[float]]:
    """Per-stage lists of drop-path rates, linear in the block index from 0 to ``drop_path_rate``."""
    # on the CPU whatever the default device (a build under ``with torch.device("meta")`` needs the numbers)
    rates = torch.linspace(0, drop_path_rate, sum(depth), device="cpu").tolist()
    starts = [sum(depth[:i]) for i in range(len(depth))]
    return [rates[start : start + count] for start, count in zip(starts, depth)]


def check_stage_list(values: object, name: str) -> list:
    """Check a per-stage list of length 4."""
    if not isinstance(values, (list, tuple)) or len(values) != NUM_STAGES:
        raise ValueError(f"{name}: expected a list of {NUM_STAGES} per-stage values, got {values!r}")
    return list(values)


class PyramidClassifier(nn.Module):
    """timm-style interface on top of ``downsample_layers`` / ``stages`` / ``norm`` / ``head``."""

    in_chans: int
    embed_dim: list[int]
    num_classes: int
    min_input_size: int = 1
    # Run the network on NCHW tensors in channels-last memory: the blocks' NCHW <-> NHWC permutes are then
    # free views and the depth-wise convs take their fast NHWC path. Results are the same up to rounding.
    channels_last_memory: bool = False

    def _init_feature_info(self) -> None:
        self.num_features = self.head_hidden_size = self.embed_dim[-1]
        self.feature_info = [
            dict(num_chs=self.embed_dim[i], reduction=4 * 2**i, module=f"stages.{i}") for i in range(NUM_STAGES)
        ]

    def _init_head(self, num_classes: int, global_pool: str | None, drop_rate: float) -> None:
        """``global_pool`` (timm's pooling; no parameters), ``head_drop`` and the ``head`` Linear (keys ``head.*``)."""
        self.head_drop = nn.Dropout(drop_rate)
        self.reset_classifier(num_classes, "avg" if global_pool is None else global_pool)

    def _place(self, device: torch.device | str | None, dtype: torch.dtype | None) -> None:
        """Move parameters and buffers to ``device`` / ``dtype`` (timm's ``device=``, ``dtype=`` arguments)."""
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ValueError(f"dtype: expected a floating-point torch.dtype, got {dtype!r}")
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    # --- timm conventions -------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Names of parameters to exclude from weight decay: the conditional position encodings."""
        return {name for name, _ in self.named_parameters() if ".pos_embed." in name}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for layer-wise learning-rate decay (timm's ``group_matcher`` format)."""
        return dict(
            stem=r"^downsample_layers\.0",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^downsample_layers\.(\d+)", (0,)),
                (r"^stages\.(\d+)\.(?:blocks\.)?(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Re-compute block activations in backward (saves memory, costs about one extra forward)."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a fresh ``num_classes``-way Linear (0: no head, features are returned).

        ``global_pool``: one of timm's pooling types (:data:`POOL_TYPES`: ``"avg"``, ``"max"``, ``"avgmax"``,
        ``"catavgmax"``, ...; ``""`` returns the unpooled (N, C, h, w) map); None keeps the current one.
        """
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes: expected an integer >= 0, got {num_classes!r}")
        if global_pool is not None:
            if global_pool not in POOL_TYPES:
                raise ValueError(f"global_pool: expected one of {POOL_TYPES}, got {global_pool!r}")
            self.global_pool = SelectAdaptivePool2d(pool_type=global_pool, flatten=bool(global_pool))
        self.num_classes = num_classes
        in_features = self.num_features * self.global_pool.feat_mult()
        self.head = nn.Linear(in_features, num_classes) if num_classes > 0 else nn.Identity()

    # --- forward ---------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        """Validate the input images (not while tracing); returns them in the memory format the network runs in."""
        return prepare_input(x, type(self).__name__, self.in_chans, self.min_input_size, self.channels_last_memory)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> final normalised map (N, C4, ~H/32, ~W/32)."""
        x = self._check_input(x)
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(N, C4, h, w) -> pooled features (N, C4; twice that with ``catavgmax``; the map itself with
        ``global_pool=""``) if ``pre_logits`` else logits (N, num_classes)."""
        x = self.head_drop(self.global_pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> logits (N, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs (NCHW, strides 4, 8, 16, 32) and optionally the final features.

        Args:
            indices: stages to return: None for all, an int n for the last n, or a list of indices.
            norm: apply the final norm to the last stage's output when it is returned.
            stop_early: stop after the last requested stage (only with ``intermediates_only``).
            output_fmt: only ``"NCHW"``.
            intermediates_only: return only the list of stage maps.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt: only 'NCHW' is supported, got {output_fmt!r}")
        x = self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        intermediates = []
        stop = max_index if (stop_early and intermediates_only) else last
        for index in range(stop + 1):
            x = self.stages[index](self.downsample_layers[index](x))
            if index in take_indices:
                intermediates.append(self.norm(x) if norm and index == last else x)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages (and norm/head) not needed to produce ``indices``; returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        self.downsample_layers = self.downsample_layers[: max_index + 1]
        self.num_features = self.head_hidden_size = self.embed_dim[max_index]
        if prune_norm or max_index < NUM_STAGES - 1:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices
