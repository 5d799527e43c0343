"""What every BiFormer family shares: a four-stage pyramid with the timm model interface.

Subclasses build ``downsample_layers`` (4), ``stages`` (4, each with a ``grad_checkpointing`` flag),
``norm``, ``head_drop`` and ``head``, set ``in_chans``, ``embed_dim``, ``num_classes`` and
``min_input_size``, then call :meth:`_init_feature_info`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from timm.models import build_model_with_cfg
from timm.models._features import feature_take_indices
from torch.utils.checkpoint import checkpoint

from .._checks import check_feature_map
from ..layers import BiLevelRoutingAttention, BiLevelRoutingAttentionNCHW
from ..ops.attention import uses_reference_backend

NUM_STAGES = 4
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
    model = build_model_with_cfg(
        model_class, variant, pretrained, pretrained_filter_fn=checkpoint_filter,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"), **architecture,
    )
    model._model_args = {key: value for key, value in requested.items() if key not in _LOADING_ARGUMENTS}
    return model


def _must_see_whole_batch(blocks: nn.Module) -> bool:
    """Whether a BRA module among ``blocks`` needs the whole batch in one call: it runs the reference
    formulation (kept as the authors' data flow) or its routing is being recorded (records are per call)."""
    return any(
        uses_reference_backend(module.backend) or module.routing_sink is not None
        for module in blocks.modules()
        if isinstance(module, (BiLevelRoutingAttention, BiLevelRoutingAttentionNCHW))
    )


def inference_group_size(blocks: nn.Module, x: torch.Tensor) -> int | None:
    """Images per group when ``blocks`` run on ``x`` (batch first) without gradients; None: the whole batch."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or torch.jit.is_tracing() or x.shape[0] == 1:
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
        if grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x


def stochastic_depth_rates(depth: list[int] | tuple[int, ...], drop_path_rate: float) -> list[list[float]]:
    """Per-stage lists of drop-path rates, linear in the block index from 0 to ``drop_path_rate``."""
    rates = torch.linspace(0, drop_path_rate, sum(depth)).tolist()
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
        """Replace the head with a fresh ``num_classes``-way Linear (0: no head, features are returned)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes: expected an integer >= 0, got {num_classes!r}")
        if global_pool not in (None, "", "avg"):
            raise ValueError(f"global_pool: only 'avg' pooling is supported, got {global_pool!r}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    # --- forward ---------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        """Validate the input images; returns them in the memory format the network runs in."""
        check_feature_map(x, name=f"{type(self).__name__} input", layout="NCHW", channels=self.in_chans)
        if min(x.shape[-2:]) < self.min_input_size:
            raise ValueError(
                f"{type(self).__name__} input: expected H and W >= {self.min_input_size}, "
                f"got {tuple(x.shape[-2:])}"
            )
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last_memory else x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> final normalised map (N, C4, ~H/32, ~W/32)."""
        x = self._check_input(x)
        for downsample, stage in zip(self.downsample_layers, self.stages):
            x = stage(downsample(x))
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(N, C4, h, w) -> pooled features (N, C4) if ``pre_logits`` else logits (N, num_classes)."""
        x = self.head_drop(x.mean(dim=(2, 3)))
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
            self.reset_classifier(0)
        return take_indices
