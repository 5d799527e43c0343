"""A strided ``nn.Conv2d`` (same parameters and state_dict keys) that spares large weights a reorder per call on CPU.

BiFormer's downsamplings are 3x3 stride-2 convs on channels-last maps. oneDNN runs a channels-last conv with a
channels-last weight, so every call copies the (O, I, 3, 3) weight into that layout; for the last downsampling
(256 -> 512 in biformer_small, a 4.5 MiB weight) the copy and the fresh pages it writes took up to 4 ms a call
on the CPUs measured, beside 3-6 ms for the conv. The weight stays an ordinary contiguous parameter
(``safetensors`` refuses non-contiguous tensors in a state_dict), and:

- without gradients (inference, CPU, eager) the channels-last copy is made once and kept, with the dtype CPU
  autocast computes in, until the weight changes (another tensor, new data or an in-place update): the same conv,
  bit-identical outputs;
- in float32 training on CPU (the weight changes every step, so a kept copy would not help) the conv runs on
  the input in NCHW layout, where oneDNN takes the weight as it is, and its output goes back to channels-last:
  the same conv to float rounding (a different summation order);
- elsewhere (small weights, other devices, bfloat16 training, float64 tensors under autocast, a weight made
  under ``torch.inference_mode``, ``torch.compile``, export, tracing) it is the plain ``nn.Conv2d``.

Measured in ``benchmarks/RESULTS.md`` (fifth round) and by ``benchmarks/bench_vs_swin.py``'s downsampling table;
only weights of at least ``LARGE_WEIGHT_ELEMENTS`` take either path (the 128 -> 256 conv was level or slower with
both). Inside a whole model the gain is small (0.99-1.03x a forward, within the run-to-run spread).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import is_tracing

# Weights of at least this many elements (4 MiB in float32) take the paths above: biformer_small's and
# biformer_tiny's 256 -> 512 conv (1.18 M), biformer_base's 384 -> 768 (2.65 M); not 128 -> 256 (0.29 M), whose
# kept channels-last weight was 0.85-1.18x and NCHW input 0.79-1.09x across batch 1-8.
LARGE_WEIGHT_ELEMENTS = 1 << 20
# Input dtypes that CPU autocast casts to its dtype for a conv (float64 it leaves alone): under autocast such an
# input with a float32 weight computes in autocast's dtype, the dtype of the kept weight. In biformer_small under
# bfloat16 autocast the last downsampling's input is already bfloat16 (the block before it ends in bfloat16).
_AUTOCAST_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


class DownsampleConv2d(nn.Conv2d):
    """``nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)``; see the module doc for its CPU paths.

    Shapes: (N, in_channels, H, W) -> (N, out_channels, H', W') as ``nn.Conv2d``; channels-last in, channels-last
    out on the CPU paths.
    """

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, padding: int = 0
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        self._kept: tuple[torch.Tensor, int, int, torch.dtype, torch.Tensor] | None = None

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> DownsampleConv2d:
        self._kept = None  # .to(), .float(), .cpu(): the weight is another tensor; drop the old copy now
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_kept"] = None  # a cache: never pickled or deep-copied
        return state

    def path(self, x: torch.Tensor) -> str:
        """Which path a call on ``x`` takes now: ``"kept"``, ``"nchw"`` or ``"plain"``."""
        weight = self.weight
        if (
            is_tracing(x)
            or weight.numel() < LARGE_WEIGHT_ELEMENTS
            or x.device.type != "cpu"
            or x.dim() != 4
            or not x.is_contiguous(memory_format=torch.channels_last)
        ):
            return "plain"
        autocast = torch.is_autocast_enabled("cpu")
        float32 = x.dtype == weight.dtype == torch.float32
        if autocast and not (weight.dtype == torch.float32 and x.dtype in _AUTOCAST_INPUTS):
            return "plain"  # autocast's casts for other dtypes (float64 stays float64): nn.Conv2d's own
        if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
            # an inference tensor (a model built under torch.inference_mode) has no version to follow
            return "plain" if weight.is_inference() else "kept"
        return "nchw" if float32 and not autocast else "plain"

    def _kept_weight(self) -> torch.Tensor:
        """The weight in channels-last memory, in the dtype the conv computes in; made once per weight version."""
        weight = self.weight
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else weight.dtype
        kept = self._kept
        if (
            kept is not None
            and kept[0] is weight
            and kept[1] == weight._version
            and kept[2] == weight.data_ptr()
            and kept[3] == dtype
        ):
            return kept[4]
        with torch.no_grad():
            copy = weight.detach().to(dtype).contiguous(memory_format=torch.channels_last)
        self._kept = (weight, weight._version, weight.data_ptr(), dtype, copy)
        return copy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = self.path(x)
        if path == "kept":
            weight = self._kept_weight()
            bias = None if self.bias is None else self.bias.to(weight.dtype)  # the casts autocast would make
            with torch.autocast("cpu", enabled=False):
                x = x.to(weight.dtype)
                return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        if path == "nchw":
            nchw = x.contiguous()  # (N, C, H, W) in NCHW memory
            out = F.conv2d(nchw, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
            return out.contiguous(memory_format=torch.channels_last)
        return super().forward(x)
