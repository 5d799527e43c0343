"""Where the explicit ``softmax(q @ k^T * scale) @ v`` beats ``scaled_dot_product_attention``: one rule for the
layers and backends that could run either (the ``dense`` backend, the last stage's global attention).

SDPA is faster wherever it was measured on CPU except one case: a backward in bf16, where PyTorch's CPU SDPA
backward is 2-3x slower than autograd through the explicit products (``benchmarks/RESULTS.md``: the attention of
biformer_small's stage 4 3.4x, the ``dense`` attention of stage 3 2.1-2.4x). GPUs keep SDPA's fused kernels.
"""

from __future__ import annotations

import torch


def explicit_attention_is_faster(*tensors: torch.Tensor) -> bool:
    """Whether attention on ``tensors`` (q, k, v) should run the explicit form: on CPU, in bf16 (bf16 tensors,
    autocast included), with a gradient to compute."""
    first = tensors[0]
    return (
        first.device.type == "cpu"
        and first.dtype == torch.bfloat16
        and torch.is_grad_enabled()
        and any(t.requires_grad for t in tensors)
    )
