"""Token-to-token attention over routed regions, with interchangeable backends.

Every backend computes the same function (the reference's, to float rounding):

    for each query region r and head m:
        keys/values = tokens of the regions topk_index[:, r]   (topk * L_kv tokens)
        out = softmax((q * scale) @ k^T) @ v

Heads are contiguous channel chunks of q, k and v. Backends:

- ``reference``: the reference formulation (``torch.gather`` over a (N, R, R, L, C) expanded view, which
  materialises topk copies of K/V). Kept as the test oracle and the benchmark baseline.
- ``gather``: ``index_select`` on the flattened (N * R) region axis (one copy of the routed K/V, no
  expanded gather in backward), then explicit matmul-softmax-matmul on 4-D tensors.
- ``sdpa``: the same gather, then ``torch.nn.functional.scaled_dot_product_attention``.
- ``dense``: attention over every token with the unrouted regions masked out; no gather at all. Only
  sensible for small maps (cost grows with the square of the token count).
- ``auto``: picks one of the above per call (see :func:`select_backend`).

Select a backend per module (``backend=`` argument) or for a block of code with
:func:`attention_backend`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

AttentionFn = Callable[..., torch.Tensor]

_BACKENDS: dict[str, AttentionFn] = {}
_default_backend: str = "auto"


def register_backend(name: str) -> Callable[[AttentionFn], AttentionFn]:
    """Decorator adding an attention backend under ``name``."""

    def add(fn: AttentionFn) -> AttentionFn:
        _BACKENDS[name] = fn
        return fn

    return add


def available_backends() -> tuple[str, ...]:
    """Names accepted by ``backend=`` and :func:`attention_backend` (``auto`` included)."""
    return ("auto", *_BACKENDS)


def check_backend(name: object) -> str | None:
    """Validate a backend name (``None`` means: use the current default)."""
    if name is not None and name not in available_backends():
        raise ValueError(f"backend: expected one of {available_backends()} or None, got {name!r}")
    return name


def get_default_backend() -> str:
    """The backend used by modules whose ``backend`` is ``None``."""
    return _default_backend


@contextlib.contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Use backend ``name`` for every BRA module without an explicit ``backend`` inside the block.

    Example::

        with biformer.attention_backend("reference"):
            logits = model(images)
    """
    global _default_backend
    check_backend(name)
    previous, _default_backend = _default_backend, name
    try:
        yield
    finally:
        _default_backend = previous


def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, heads * d) -> (B, heads, L, d) as a view."""
    batch, length, channels = x.shape
    return x.view(batch, length, num_heads, channels // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor, batch: int, regions: int) -> torch.Tensor:
    """(N * R, heads, L, d) -> (N, R, L, heads * d)."""
    _, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, regions, length, heads * head_dim)


def gather_routed(key_value: torch.Tensor, topk_index: torch.Tensor) -> torch.Tensor:
    """Gather the tokens of each query region's routed regions without an expanded copy.

    Args:
        key_value: (N, R, L_kv, C) (may be a channel slice of a larger tensor).
        topk_index: int64 (N, R, topk).

    Returns:
        (N * R, topk * L_kv, C): for query region ``n * R + r`` the tokens of its routed regions, in
        routing order.
    """
    batch, regions, kv_len, channels = key_value.shape
    topk = topk_index.shape[-1]
    offsets = torch.arange(batch, device=topk_index.device).view(batch, 1, 1) * regions
    flat_index = (topk_index + offsets).reshape(-1)  # (N * R * topk,)
    flat = key_value.reshape(batch * regions, kv_len, channels)
    gathered = flat.index_select(0, flat_index)  # (N * R * topk, L_kv, C)
    return gathered.view(batch * regions, topk * kv_len, channels)


def _explicit_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax((q * scale) @ k^T) @ v on (B, heads, L, d) tensors."""
    weights = torch.softmax((query * scale) @ key.transpose(-2, -1), dim=-1)
    return weights @ value


@register_backend("reference")
def reference_attention(
    query: torch.Tensor,
    key_value: torch.Tensor,
    topk_index: torch.Tensor,
    *,
    num_heads: int,
    qk_dim: int,
    scale: float,
) -> torch.Tensor:
    """The reference formulation: gather from an expanded (N, R, R, L, C) view (topk-fold copy)."""
    batch, regions, kv_len, channels = key_value.shape
    q_len, topk = query.shape[2], topk_index.shape[-1]
    expanded = key_value.unsqueeze(1).expand(-1, regions, -1, -1, -1)  # (N, R, R, L_kv, C), no copy
    index = topk_index.view(batch, regions, topk, 1, 1).expand(-1, -1, -1, kv_len, channels)
    selected = torch.gather(expanded, dim=2, index=index)  # (N, R, topk, L_kv, C)
    selected = selected.reshape(batch * regions, topk * kv_len, channels)
    key = _split_heads(selected[..., :qk_dim], num_heads)  # (N*R, heads, topk*L_kv, d_qk)
    value = _split_heads(selected[..., qk_dim:], num_heads)  # (N*R, heads, topk*L_kv, d_v)
    q = _split_heads(query.reshape(batch * regions, q_len, qk_dim), num_heads)  # (N*R, heads, L_q, d_qk)
    return _merge_heads(_explicit_attention(q, key, value, scale), batch, regions)


def _gathered_heads(
    query: torch.Tensor, key_value: torch.Tensor, topk_index: torch.Tensor, num_heads: int, qk_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, regions, q_len, _ = query.shape
    selected = gather_routed(key_value, topk_index)  # (N*R, topk*L_kv, C_qk + C_v)
    key = _split_heads(selected[..., :qk_dim], num_heads)
    value = _split_heads(selected[..., qk_dim:], num_heads)
    q = _split_heads(query.reshape(batch * regions, q_len, qk_dim), num_heads)
    return q, key, value


@register_backend("gather")
def gather_attention(
    query: torch.Tensor,
    key_value: torch.Tensor,
    topk_index: torch.Tensor,
    *,
    num_heads: int,
    qk_dim: int,
    scale: float,
) -> torch.Tensor:
    """index_select gather + explicit matmul-softmax-matmul."""
    q, key, value = _gathered_heads(query, key_value, topk_index, num_heads, qk_dim)
    return _merge_heads(_explicit_attention(q, key, value, scale), query.shape[0], query.shape[1])


@register_backend("sdpa")
def sdpa_attention(
    query: torch.Tensor,
    key_value: torch.Tensor,
    topk_index: torch.Tensor,
    *,
    num_heads: int,
    qk_dim: int,
    scale: float,
) -> torch.Tensor:
    """index_select gather + ``scaled_dot_product_attention`` on 4-D tensors."""
    q, key, value = _gathered_heads(query, key_value, topk_index, num_heads, qk_dim)
    if q.shape[-1] != value.shape[-1]:
        # SDPA's fused kernels need equal q and v head sizes; fall back to the explicit form.
        out = _explicit_attention(q, key, value, scale)
    else:
        out = F.scaled_dot_product_attention(q, key, value, scale=scale)
    return _merge_heads(out, query.shape[0], query.shape[1])


def routing_mask(topk_index: torch.Tensor, num_regions: int) -> torch.Tensor:
    """Boolean region adjacency (N, R, R): ``mask[n, r, s]`` is True where region r routes to s."""
    batch, regions, _ = topk_index.shape
    mask = torch.zeros(batch, regions, num_regions, dtype=torch.bool, device=topk_index.device)
    return mask.scatter_(2, topk_index, True)


@register_backend("dense")
def dense_attention(
    query: torch.Tensor,
    key_value: torch.Tensor,
    topk_index: torch.Tensor,
    *,
    num_heads: int,
    qk_dim: int,
    scale: float,
) -> torch.Tensor:
    """Attention over all tokens, unrouted regions masked: no gather, O((R * L)^2) scores."""
    batch, regions, q_len, _ = query.shape
    kv_len = key_value.shape[2]
    q = _split_heads(query.reshape(batch, regions * q_len, qk_dim), num_heads)  # (N, heads, R*L_q, d)
    flat_kv = key_value.reshape(batch, regions * kv_len, key_value.shape[-1])
    key = _split_heads(flat_kv[..., :qk_dim], num_heads)  # (N, heads, R*L_kv, d_qk)
    value = _split_heads(flat_kv[..., qk_dim:], num_heads)  # (N, heads, R*L_kv, d_v)
    allowed = routing_mask(topk_index, regions)  # (N, R, R)
    allowed = allowed.repeat_interleave(q_len, dim=1).repeat_interleave(kv_len, dim=2)  # (N, R*L_q, R*L_kv)
    scores = (q * scale) @ key.transpose(-2, -1)  # (N, heads, R*L_q, R*L_kv)
    scores = scores.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    out = torch.softmax(scores, dim=-1) @ value  # (N, heads, R*L_q, d_v)
    return out.transpose(1, 2).reshape(batch, regions, q_len, -1)


def select_backend(query: torch.Tensor, key_value: torch.Tensor, topk_index: torch.Tensor) -> str:
    """The backend ``auto`` resolves to for these inputs.

    Chosen from measurements on CPU (see ``benchmarks/RESULTS.md``): the index_select gather with the
    explicit matmul form is the fastest general choice; dense masking only wins on very small maps.
    """
    return "gather"


def routed_attention(
    query: torch.Tensor,
    key_value: torch.Tensor,
    topk_index: torch.Tensor,
    *,
    num_heads: int,
    scale: float,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention of each query region's tokens over the tokens of its routed regions.

    Args:
        query: (N, R, L_q, C_qk) tokens of each query region.
        key_value: (N, R, L_kv, C_qk + C_v) keys then values of each region (a channel slice is fine).
        topk_index: int64 (N, R, topk) routed region indices.
        num_heads: heads; C_qk and C_v must be divisible by it.
        scale: multiplier of q before the dot product.
        backend: a name from :func:`available_backends`, or None for the current default.

    Returns:
        (N, R, L_q, C_v).
    """
    name = backend or _default_backend
    if name == "auto":
        name = select_backend(query, key_value, topk_index)
    function = _BACKENDS.get(name)
    if function is None:
        check_backend(name)  # raises a ValueError naming the choices
    return function(query, key_value, topk_index, num_heads=num_heads, qk_dim=query.shape[-1], scale=scale)
