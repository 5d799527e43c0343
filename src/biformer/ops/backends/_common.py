"""Pieces shared by the head-major backends (``gather``, ``sdpa``, ``dense``)."""

from __future__ import annotations

import torch

from ..gather import gather_regions


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether a backward will run through any of ``tensors``."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def scaled_scores(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * query @ key^T for (B, L_q, d) x (B, L_k, d) -> (B, L_q, L_k).

    Without gradients the scale is fused in the GEMM (``baddbmm``'s alpha). With them, q is scaled first (the
    authors' ``(q * scale) @ k^T``): the fused alpha would cost a multiply over the keys' gradient in backward,
    and the routed keys are topk times as many as the queries (biformer_small training step, fp32: 1.03x).
    """
    if needs_grad(query, key):
        return torch.bmm(query * scale, key.transpose(1, 2))
    scores = query.new_empty(query.shape[0], query.shape[1], key.shape[1])
    return torch.baddbmm(scores, query, key.transpose(1, 2), beta=0.0, alpha=scale)


def gathered_keys_values(
    key: torch.Tensor, value: torch.Tensor, topk_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(heads, N, R, L, d) each -> (heads * N * R, topk * L, d): the routed regions' tokens."""
    key = gather_regions(key, topk_index)  # (heads, N, R, topk * L, d_qk)
    value = gather_regions(value, topk_index)  # (heads, N, R, topk * L, d_v)
    return key.flatten(0, 2), value.flatten(0, 2)
