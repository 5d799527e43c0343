"""``gather``: ``index_select`` of the routed regions, then batched matmul-softmax-matmul. Head-major.

One copy of the routed K/V on the flattened (N * R) region axis (its backward is a deterministic scatter-add,
see :mod:`biformer.ops.gather`). Without gradients it runs in cache-sized chunks. ``auto``'s fallback: it runs
on every device, in every dtype, with gradients.
"""

from __future__ import annotations

import torch

from ..gather import offset_region_index
from ._common import gathered_keys_values, needs_grad, scaled_scores
from .registry import register_backend

# Working-set budget of one chunk of the chunked inference attention (gathered K/V + scores), in bytes.
CHUNK_BYTES = 4 * 2**20


def _chunk_starts(total: int, chunk: int) -> list[tuple[int, int]]:
    """[(start, stop), ...] covering range(total) in pieces of ``chunk``."""
    return [(start, min(start + chunk, total)) for start in range(0, total, chunk)]


def _chunked_gather_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, topk_index: torch.Tensor, scale: float
) -> torch.Tensor:
    """Inference form of :func:`gather_attention`: blocks of (head, query region) pairs at a time.

    Every temporary (gathered K/V, scores) stays under ``CHUNK_BYTES``: they are reused from the heap
    instead of fresh pages (on CPU a fresh large buffer costs a page fault per 4 KiB, which made the
    unchunked form 2-4x slower at 224 px), they stay in cache, and the peak memory no longer grows with
    the batch. Heads and regions are one axis of ``heads * N * R`` rows, so a block spans heads where they
    fit (at batch 1 a stage is one to two blocks instead of one per head: fewer, larger calls). A region whose
    own scores exceed the budget (large maps) is split along its queries (softmax rows are independent).
    No autograd: the caller uses this only without gradients.
    """
    heads, batch, regions, q_len, qk_head = query.shape
    kv_len, v_head = key.shape[3], value.shape[-1]
    rows, topk = batch * regions, topk_index.shape[-1]
    total, keys = heads * rows, topk * kv_len
    index = offset_region_index(topk_index).view(1, rows, topk)
    head_offsets = torch.arange(0, total, rows, device=index.device).view(heads, 1, 1)
    index = (index + head_offsets).view(total, topk)  # rows of the flattened (heads * N * R) axis
    query = query.reshape(total, q_len, qk_head)
    key = key.reshape(total, kv_len * qk_head)
    value = value.reshape(total, kv_len * v_head)
    out = query.new_empty(total, q_len, v_head)
    region_bytes = (q_len + qk_head + v_head) * keys * query.element_size()
    regions_per_chunk = max(1, CHUNK_BYTES // region_bytes)
    queries_per_chunk = q_len if region_bytes <= CHUNK_BYTES else max(1, CHUNK_BYTES // (keys * query.element_size()))
    for start, stop in _chunk_starts(total, regions_per_chunk):
        chunk_index = index[start:stop].reshape(-1)
        routed_keys = key.index_select(0, chunk_index).view(stop - start, keys, qk_head)
        routed_values = value.index_select(0, chunk_index).view(stop - start, keys, v_head)
        for q_start, q_stop in _chunk_starts(q_len, queries_per_chunk):
            scores = scaled_scores(query[start:stop, q_start:q_stop], routed_keys, scale)
            weights = torch.softmax(scores, dim=-1, out=scores)
            # out[...] is contiguous: whole regions, or one region's rows when queries are split
            torch.bmm(weights, routed_values, out=out[start:stop, q_start:q_stop])
    return out.view(heads, batch, regions, q_len, v_head)


@register_backend("gather", auto=True)
def gather_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, topk_index: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """index_select gather + batched matmul-softmax-matmul. Head-major in and out (see module doc).

    Without gradients and outside ``torch.compile`` it runs in cache-sized chunks
    (:func:`_chunked_gather_attention`); otherwise as whole batched products for autograd and the compiler.
    """
    if not needs_grad(query, key, value) and not torch.compiler.is_compiling():
        return _chunked_gather_attention(query, key, value, topk_index, scale)
    heads, batch, regions, q_len, _ = query.shape
    key, value = gathered_keys_values(key, value, topk_index)
    weights = torch.softmax(scaled_scores(query.flatten(0, 2), key, scale), dim=-1)  # (B, L_q, topk*L_kv)
    return torch.bmm(weights, value).view(heads, batch, regions, q_len, -1)
