"""Token-to-token attention over routed regions: the functional API, with interchangeable backends.

Every backend computes the same function (the reference's, to float rounding):

    for each query region r and head m:
        keys/values = tokens of the regions topk_index[:, r]   (topk * L_kv tokens)
        out = softmax((q * scale) @ k^T) @ v

Heads are contiguous channel chunks of q, k and v. The backends, one module each in
:mod:`biformer.ops.backends`:

- ``reference``: the reference formulation (``torch.gather`` over a (N, R, R, L, C) expanded view, which
  materialises topk copies of K/V). Kept as the test oracle and the benchmark baseline.
- ``gather``: ``index_select`` of the routed regions on the flattened (N * R) region axis (one copy of the
  routed K/V; its backward is a deterministic scatter-add), then batched matmul-softmax-matmul.
- ``sdpa``: the same gather, then ``torch.nn.functional.scaled_dot_product_attention`` on 4-D tensors.
- ``dense``: attention over every token with the unrouted regions masked out; no gather at all. Wins
  when few regions are skipped (stage 3 at 224 px: 16 of 49 routed); its cost grows with the square of
  the token count.
- ``flex``: FlexAttention with a block mask built from the routing (``BlockMask.from_kv_blocks``), for
  inference under ``torch.compile`` (see :mod:`biformer.ops.backends.flex`).
- ``triton``: gather and attention fused in Triton kernels, forward and backward (see
  :mod:`biformer.ops.backends.triton`); needs ``triton`` and a GPU (or ``TRITON_INTERPRET=1`` on CPU).
- ``auto``: picks one of the above per call from measured speed (see
  :func:`biformer.ops.backends.registry.select_backend`).

Two tensor layouts exist. The *region* layout is the public one of :func:`routed_attention`:
query (N, R, L_q, C_qk) and key_value (N, R, L_kv, C_qk + C_v). The *head-major* layout of
:func:`routed_attention_heads` puts heads first, (heads, N, R, L, d), so that batched matrix products run
on contiguous memory without per-head copies; the BRA layer produces it straight from the projection with
one copy. ``reference`` works in the region layout (as the authors' code), every other backend in the
head-major layout; the two functions convert where needed.

``backend`` is a name (resolved here, once per call), None (the current default, see
:func:`~biformer.ops.backends.registry.attention_backend`) or a :class:`~biformer.ops.backends.registry.Backend`
already resolved by the caller (run as given: the BRA layers resolve once per forward and pass it down).
"""

from __future__ import annotations

import torch

from .backends import HEAD_LAYOUT, REGION_LAYOUT, Backend, resolve_backend
from .backends._common import needs_grad
from .checks import check_routed_inputs, check_topk_index
from .regions import heads_to_regions, regions_to_heads


def routed_attention_heads(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    topk_index: torch.Tensor,
    *,
    scale: float,
    backend: str | Backend | None = None,
    check_index: bool = True,
) -> torch.Tensor:
    """Routed attention on head-major tensors (the fast path of the BRA layer).

    Args:
        query: (heads, N, R, L_q, d_qk).
        key: (heads, N, R, L_kv, d_qk).
        value: (heads, N, R, L_kv, d_v).
        topk_index: int64 (N, R, topk) routed region indices.
        scale: multiplier of q before the dot product.
        backend: a name from :func:`~biformer.ops.available_backends`, None for the current default, or a
            resolved :class:`~biformer.ops.backends.Backend` (run as given).
        check_index: check ``topk_index`` (:func:`~biformer.ops.checks.check_topk_index`: range, distinct);
            False for an index known to be valid (the BRA layer's, from ``topk``).

    Returns:
        (heads, N, R, L_q, d_v).
    """
    check_routed_inputs({"query": query, "key": key, "value": value}, 5, topk_index)
    if check_index:
        check_topk_index(topk_index, query.shape[2])
    heads, _, regions, _, _ = query.shape
    if not isinstance(backend, Backend):
        backend = resolve_backend(
            backend, num_regions=regions, topk=topk_index.shape[-1], tokens_per_region=key.shape[3],
            device=query.device, needs_grad=needs_grad(query, key, value), dtype=query.dtype,
            head_dim=max(query.shape[-1], value.shape[-1]),
        )
    if backend.layout == HEAD_LAYOUT:
        return backend.function(query, key, value, topk_index, scale=scale)
    key_value = torch.cat([heads_to_regions(key), heads_to_regions(value)], dim=-1)
    out = backend.function(heads_to_regions(query), key_value, topk_index, num_heads=heads, scale=scale)
    return regions_to_heads(out, heads)


def routed_attention(
    query: torch.Tensor,
    key_value: torch.Tensor,
    topk_index: torch.Tensor,
    *,
    num_heads: int,
    scale: float,
    backend: str | Backend | None = None,
    check_index: bool = True,
) -> torch.Tensor:
    """Attention of each query region's tokens over the tokens of its routed regions (region layout).

    Args:
        query: (N, R, L_q, C_qk) tokens of each query region.
        key_value: (N, R, L_kv, C_qk + C_v) keys then values of each region (a channel slice is fine).
        topk_index: int64 (N, R, topk) routed region indices.
        num_heads: heads; C_qk and C_v must be divisible by it.
        scale: multiplier of q before the dot product.
        backend: a name from :func:`~biformer.ops.available_backends`, None for the current default, or a
            resolved :class:`~biformer.ops.backends.Backend` (run as given).
        check_index: check ``topk_index`` (:func:`~biformer.ops.checks.check_topk_index`: range, distinct);
            False for an index known to be valid.

    Returns:
        (N, R, L_q, C_v).
    """
    check_routed_inputs({"query": query, "key_value": key_value}, 4, topk_index)
    if check_index:
        check_topk_index(topk_index, query.shape[1])
    qk_dim = query.shape[-1]
    if not isinstance(backend, Backend):
        backend = resolve_backend(
            backend, num_regions=query.shape[1], topk=topk_index.shape[-1], tokens_per_region=key_value.shape[2],
            device=query.device, needs_grad=needs_grad(query, key_value), dtype=query.dtype,
            head_dim=max(qk_dim, key_value.shape[-1] - qk_dim) // num_heads,
        )
    if backend.layout == REGION_LAYOUT:
        return backend.function(query, key_value, topk_index, num_heads=num_heads, scale=scale)
    out = backend.function(
        regions_to_heads(query, num_heads),
        regions_to_heads(key_value[..., :qk_dim], num_heads),
        regions_to_heads(key_value[..., qk_dim:], num_heads),
        topk_index,
        scale=scale,
    )
    return heads_to_regions(out)
