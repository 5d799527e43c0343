"""A depth-wise ``nn.Conv2d`` (same parameters and state_dict keys) whose CPU training backward is faster."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.depthwise import depthwise_conv2d


class DepthwiseConv2d(nn.Conv2d):
    """``nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)``, odd ``kernel_size``.

    Parameters ``weight`` (dim, 1, k, k) and ``bias`` (dim,) as ``nn.Conv2d``; the forward is the same conv. In
    CPU float32 training its backward runs as :func:`biformer.ops.depthwise.depthwise_conv2d` (the same
    gradients, computed faster); everywhere else it is ``nn.Conv2d``'s.

    Shapes: (N, dim, H, W) -> (N, dim, H, W).
    """

    # Its forward is nn.Conv2d's function (the fused CPU kernels may compute it in inference); a subclass that
    # changes the forward does not inherit this declaration (it is read from the class's own body).
    computes_plain_conv = True

    def __init__(self, dim: int, kernel_size: int, bias: bool = True) -> None:
        super().__init__(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return depthwise_conv2d(x, self.weight, self.bias)
