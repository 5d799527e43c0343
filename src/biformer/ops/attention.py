"""Token-to-token attention over routed regions, with interchangeable backends.

Every backend computes the same function (the reference's, to float rounding):

    for each query region r and head m:
        keys/values = tokens of the regions topk_index[:, r]   (topk * L_kv tokens)
        out = softmax((q * scale) @ k^T) @ v

Heads are contiguous channel chunks of q, k and v. Backends:

- ``reference``: the reference formulation (``torch.gather`` over a (N, R, R, L, C) expanded view, which
  materialises topk copies of K/V). Kept as the test oracle and the benchmark baseline.
- ``gather``: ``index_select`` of the routed regions on the flattened (N * R) region axis (one copy of the
  routed K/V; its backward is a deterministic scatter-add), then batched matmul-softmax-matmul.
- ``sdpa``: the same gather, then ``torch.nn.functional.scaled_dot_product_attention`` on 4-D tensors.
- ``dense``: attention over every token with the unrouted regions masked out; no gather at all. Wins
  when few regions are skipped (stage 3 at 224 px: 16 of 49 routed); its cost grows with the square of
  the token count.
- ``flex``: FlexAttention with a block mask built from the routing (``BlockMask.from_kv_blocks``), for
  inference under ``torch.compile`` (see :mod:`biformer.ops.flex`).
- ``triton``: gather and attention fused in Triton kernels, forward and backward (see
  :mod:`biformer.ops.triton_bra`); needs ``triton`` and a GPU (or ``TRITON_INTERPRET=1`` on CPU).
- ``auto``: picks one of the above per call from measured speed (see :func:`select_backend`).

Two tensor layouts exist. The *region* layout is the public one of :func:`routed_attention`:
query (N, R, L_q, C_qk) and key_value (N, R, L_kv, C_qk + C_v). The *head-major* layout of
:func:`routed_attention_heads` puts heads first, (heads, N, R, L, d), so that batched matrix products run
on contiguous memory without per-head copies; the BRA layer produces it straight from the projection with
one copy. ``reference`` works in the region layout (as the authors' code), every other backend in the
head-major layout; the two public functions convert where needed.

Select a backend per module (``backend=`` argument) or for a block of code with
:func:`attention_backend`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .flex import flex_routed_attention
from .gather import gather_regions, offset_region_index
from .routing import routing_mask

AttentionFn = Callable[..., torch.Tensor]

REGION_LAYOUT = "regions"
HEAD_LAYOUT = "heads"

# Working-set budget of one chunk of the chunked inference attention (gathered K/V + scores), in bytes.
CHUNK_BYTES = 4 * 2**20
# Largest token count per image for which ``auto`` considers ``dense`` (its scores grow with the square).
DENSE_MAX_TOKENS = 1024
# In training ``auto`` takes ``sdpa`` above this many scores per region (its backward never stores them).
LARGE_SCORES = 2**20
# ``auto`` takes ``dense`` when at least this fraction of the regions is routed (its wasted work is the rest).
DENSE_MIN_ROUTED_FRACTION = 0.25


@dataclass(frozen=True)
class Backend:
    """An attention implementation and the tensor layout it takes (``"regions"`` or ``"heads"``)."""

    function: AttentionFn
    layout: str


_BACKENDS: dict[str, Backend] = {}
_default_backend: str = "auto"


def register_backend(name: str, layout: str = HEAD_LAYOUT) -> Callable[[AttentionFn], AttentionFn]:
    """Decorator adding an attention backend under ``name`` that takes tensors in ``layout``."""

    def add(fn: AttentionFn) -> AttentionFn:
        _BACKENDS[name] = Backend(fn, layout)
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


# --- layout conversions ------------------------------------------------------------------------------
def regions_to_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(N, R, L, heads * d) -> contiguous (heads, N, R, L, d)."""
    batch, regions, length, channels = x.shape
    x = x.reshape(batch, regions, length, num_heads, channels // num_heads)
    return x.permute(3, 0, 1, 2, 4).contiguous()  # (heads, N, R, L, d)


def heads_to_regions(x: torch.Tensor) -> torch.Tensor:
    """(heads, N, R, L, d) -> (N, R, L, heads * d)."""
    heads, batch, regions, length, head_dim = x.shape
    return x.permute(1, 2, 3, 0, 4).reshape(batch, regions, length, heads * head_dim)


# --- the reference formulation (region layout) --------------------------------------------------------
def _split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, L, heads * d) -> (B, heads, L, d) as a view."""
    batch, length, channels = x.shape
    return x.view(batch, length, num_heads, channels // num_heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor, batch: int, regions: int) -> torch.Tensor:
    """(N * R, heads, L, d) -> (N, R, L, heads * d)."""
    _, heads, length, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, regions, length, heads * head_dim)


def gather_routed(key_value: torch.Tensor, topk_index: torch.Tensor) -> torch.Tensor:
    """Gather the tokens of each query region's routed regions without an expanded copy (region layout).

    Args:
        key_value: (N, R, L_kv, C) (may be a channel slice of a larger tensor).
        topk_index: int64 (N, R, topk).

    Returns:
        (N * R, topk * L_kv, C): for query region ``n * R + r`` the tokens of its routed regions, in
        routing order.
    """
    batch, regions, kv_len, channels = key_value.shape
    topk = topk_index.shape[-1]
    flat = key_value.reshape(batch * regions, kv_len, channels)
    gathered = flat.index_select(0, offset_region_index(topk_index))  # (N * R * topk, L_kv, C)
    return gathered.view(batch * regions, topk * kv_len, channels)


@register_backend("reference", layout=REGION_LAYOUT)
def reference_attention(
    query: torch.Tensor, key_value: torch.Tensor, topk_index: torch.Tensor, *, num_heads: int, scale: float
) -> torch.Tensor:
    """The reference formulation: gather from an expanded (N, R, R, L, C) view (topk-fold copy).

    query (N, R, L_q, C_qk), key_value (N, R, L_kv, C_qk + C_v) -> (N, R, L_q, C_v).
    """
    batch, regions, kv_len, channels = key_value.shape
    q_len, qk_dim, topk = query.shape[2], query.shape[3], topk_index.shape[-1]
    expanded = key_value.unsqueeze(1).expand(-1, regions, -1, -1, -1)  # (N, R, R, L_kv, C), no copy
    index = topk_index.view(batch, regions, topk, 1, 1).expand(-1, -1, -1, kv_len, channels)
    selected = torch.gather(expanded, dim=2, index=index)  # (N, R, topk, L_kv, C)
    selected = selected.reshape(batch * regions, topk * kv_len, channels)
    key = _split_heads(selected[..., :qk_dim], num_heads)  # (N*R, heads, topk*L_kv, d_qk)
    value = _split_heads(selected[..., qk_dim:], num_heads)  # (N*R, heads, topk*L_kv, d_v)
    q = _split_heads(query.reshape(batch * regions, q_len, qk_dim), num_heads)  # (N*R, heads, L_q, d_qk)
    weights = torch.softmax((q * scale) @ key.transpose(-2, -1), dim=-1)
    return _merge_heads(weights @ value, batch, regions)


# --- head-major backends ------------------------------------------------------------------------------
def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _scaled_scores(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """scale * query @ key^T for (B, L_q, d) x (B, L_k, d) -> (B, L_q, L_k), the scale fused in the GEMM."""
    scores = query.new_empty(query.shape[0], query.shape[1], key.shape[1])
    return torch.baddbmm(scores, query, key.transpose(1, 2), beta=0.0, alpha=scale)


def _gathered_keys_values(
    key: torch.Tensor, value: torch.Tensor, topk_index: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(heads, N, R, L, d) each -> (heads * N * R, topk * L, d): the routed regions' tokens."""
    key = gather_regions(key, topk_index)  # (heads, N, R, topk * L, d_qk)
    value = gather_regions(value, topk_index)  # (heads, N, R, topk * L, d_v)
    return key.flatten(0, 2), value.flatten(0, 2)


def _chunk_starts(total: int, chunk: int) -> list[tuple[int, int]]:
    """[(start, stop), ...] covering range(total) in pieces of ``chunk``."""
    return [(start, min(start + chunk, total)) for start in range(0, total, chunk)]


def _chunked_gather_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, topk_index: torch.Tensor, scale: float
) -> torch.Tensor:
    """Inference form of :func:`gather_attention`: one head and a block of query regions at a time.

    Every temporary (gathered K/V, scores) stays under ``CHUNK_BYTES``: they are reused from the heap
    instead of fresh pages (on CPU a fresh large buffer costs a page fault per 4 KiB, which made the
    unchunked form 2-4x slower at 224 px), they stay in cache, and the peak memory no longer grows with
    the batch. A region whose own scores exceed the budget (large maps) is split along its queries
    (softmax rows are independent). No autograd: the caller uses this only without gradients.
    """
    heads, batch, regions, q_len, qk_head = query.shape
    kv_len, v_head = key.shape[3], value.shape[-1]
    rows, topk = batch * regions, topk_index.shape[-1]
    keys = topk * kv_len
    index = offset_region_index(topk_index).view(rows, topk)
    query = query.reshape(heads, rows, q_len, qk_head)
    key = key.reshape(heads, rows, kv_len * qk_head)
    value = value.reshape(heads, rows, kv_len * v_head)
    out = query.new_empty(heads, rows, q_len, v_head)
    region_bytes = (q_len + qk_head + v_head) * keys * query.element_size()
    regions_per_chunk = max(1, CHUNK_BYTES // region_bytes)
    queries_per_chunk = q_len if region_bytes <= CHUNK_BYTES else max(1, CHUNK_BYTES // (keys * query.element_size()))
    for head in range(heads):
        for start, stop in _chunk_starts(rows, regions_per_chunk):
            chunk_index = index[start:stop].reshape(-1)
            routed_keys = key[head].index_select(0, chunk_index).view(stop - start, keys, qk_head)
            routed_values = value[head].index_select(0, chunk_index).view(stop - start, keys, v_head)
            for q_start, q_stop in _chunk_starts(q_len, queries_per_chunk):
                scores = _scaled_scores(query[head, start:stop, q_start:q_stop], routed_keys, scale)
                weights = torch.softmax(scores, dim=-1, out=scores)
                # out[...] is contiguous: whole regions, or one region's rows when queries are split
                torch.bmm(weights, routed_values, out=out[head, start:stop, q_start:q_stop])
    return out.view(heads, batch, regions, q_len, v_head)


@register_backend("gather")
def gather_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, topk_index: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """index_select gather + batched matmul-softmax-matmul. Head-major in and out (see module doc).

    Without gradients and outside ``torch.compile`` it runs in cache-sized chunks
    (:func:`_chunked_gather_attention`); otherwise as whole batched products for autograd and the compiler.
    """
    if not _needs_grad(query, key, value) and not torch.compiler.is_compiling():
        return _chunked_gather_attention(query, key, value, topk_index, scale)
    heads, batch, regions, q_len, _ = query.shape
    key, value = _gathered_keys_values(key, value, topk_index)
    weights = torch.softmax(_scaled_scores(query.flatten(0, 2), key, scale), dim=-1)  # (B, L_q, topk*L_kv)
    return torch.bmm(weights, value).view(heads, batch, regions, q_len, -1)


@register_backend("sdpa")
def sdpa_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, topk_index: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """index_select gather + ``scaled_dot_product_attention`` on 4-D tensors. Head-major in and out."""
    if query.shape[-1] != value.shape[-1]:
        # SDPA's fused kernels need equal q and v head sizes; the explicit form computes the same.
        return gather_attention(query, key, value, topk_index, scale=scale)
    heads, batch, regions, q_len, _ = query.shape
    key, value = _gathered_keys_values(key, value, topk_index)
    out = F.scaled_dot_product_attention(
        query.flatten(0, 1), key.unflatten(0, (heads * batch, regions)), value.unflatten(0, (heads * batch, regions)),
        scale=scale,
    )  # 4-D (heads * N, R, L_q, d): 5-D inputs take a slow path
    return out.view(heads, batch, regions, q_len, -1)


@register_backend("dense")
def dense_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, topk_index: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """Attention over all tokens, unrouted regions masked: no gather, O((R * L)^2) scores. Head-major."""
    heads, batch, regions, q_len, _ = query.shape
    kv_len = key.shape[3]
    scores = _scaled_scores(query.flatten(2, 3).flatten(0, 1), key.flatten(2, 3).flatten(0, 1), scale)
    blocked = ~routing_mask(topk_index, regions)  # (N, R, R)
    # (heads * N, R*L_q, R*L_kv) seen as (heads, N, R, L_q, R, L_kv); the mask broadcasts, nothing expanded.
    scores.view(heads, batch, regions, q_len, regions, kv_len).masked_fill_(
        blocked.view(1, batch, regions, 1, regions, 1), float("-inf")
    )
    out = torch.bmm(torch.softmax(scores, dim=-1), value.flatten(2, 3).flatten(0, 1))  # (heads*N, R*L_q, d_v)
    return out.view(heads, batch, regions, q_len, -1)


@register_backend("flex")
def flex_attention_backend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, topk_index: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """FlexAttention under ``torch.compile``; ``gather`` where FlexAttention cannot be used (see ops.flex)."""
    return flex_routed_attention(query, key, value, topk_index, scale=scale, fallback=gather_attention)


@register_backend("triton")
def triton_attention_backend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, topk_index: torch.Tensor, *, scale: float
) -> torch.Tensor:
    """Fused gather + attention Triton kernels; ``gather`` where they cannot run (see ops.triton_bra)."""
    from .triton_bra import triton_routed_attention  # imports triton only when this backend runs

    return triton_routed_attention(query, key, value, topk_index, scale=scale, fallback=gather_attention)


# --- choosing and dispatching -------------------------------------------------------------------------
def select_backend(
    *,
    num_regions: int,
    topk: int,
    tokens_per_region: int,
    device: torch.device,
    needs_grad: bool,
) -> str:
    """The backend ``auto`` resolves to.

    From the measurements in ``benchmarks/RESULTS.md`` (CPU, fp32 and bf16, inference and training):

    - inference: ``gather``, whose chunked inference form is the fastest at every BiFormer shape and keeps
      the memory bounded at any image size;
    - training: ``dense`` when at least a quarter of the regions is routed and the map is small (stage 3
      at 224 px: 16 of 49 regions, 196 tokens); ``sdpa`` when one region's score matrix is large (more
      than ``LARGE_SCORES``: large maps with ``n_win`` regions), as its backward recomputes the scores
      block by block instead of storing them; else ``gather``;
    - ``sdpa`` and ``flex`` were slower on CPU at every BiFormer shape.
    - ``triton`` is not chosen until ``benchmarks/bench_gpu.py`` has shown it faster on a GPU.
    - CUDA (not measured: no GPU here): ``sdpa`` for inference (its fused kernels never materialise the
      score matrix), ``gather`` for training (cuBLAS products and the sorted, atomic-free gather backward
      of :mod:`biformer.ops.gather`: deterministic, where SDPA's CUDA backward kernels may use atomics).

    The batch size never enters the choice, so ``torch.compile`` with a dynamic batch sees one decision.
    """
    if device.type == "cuda":  # not measured here
        return "gather" if needs_grad else "sdpa"
    if not needs_grad:
        return "gather"
    if topk * tokens_per_region**2 > LARGE_SCORES:
        return "sdpa"
    dense_fits = num_regions * tokens_per_region <= DENSE_MAX_TOKENS
    if dense_fits and topk >= DENSE_MIN_ROUTED_FRACTION * num_regions:
        return "dense"
    return "gather"


def resolve_backend(
    name: str | None,
    *,
    num_regions: int,
    topk: int,
    tokens_per_region: int,
    device: torch.device,
    needs_grad: bool,
) -> str:
    """The concrete backend for a call: ``name`` (None: the default), with ``auto`` resolved."""
    name = name or _default_backend
    if name == "auto":
        return select_backend(
            num_regions=num_regions, topk=topk, tokens_per_region=tokens_per_region, device=device,
            needs_grad=needs_grad,
        )
    check_backend(name)
    return name


def uses_reference_backend(name: str | None) -> bool:
    """Whether a module with ``backend=name`` runs the reference formulation (``None``: the default)."""
    return (name or _default_backend) == "reference"


def backend_layout(name: str) -> str:
    """``"regions"`` or ``"heads"``: the layout a concrete backend takes."""
    return _BACKENDS[name].layout


def _check_routed_inputs(tensors: dict[str, torch.Tensor], rank: int, topk_index: torch.Tensor) -> None:
    """ValueError naming the argument when ranks, batch/region sizes or the index do not fit together."""
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != rank:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{name}: expected a {rank}-D tensor, got {shape}")
    if not isinstance(topk_index, torch.Tensor) or topk_index.dim() != 3 or topk_index.dtype != torch.int64:
        got = (topk_index.dtype, tuple(topk_index.shape)) if isinstance(topk_index, torch.Tensor) else topk_index
        raise ValueError(f"topk_index: expected an int64 (N, R, topk) tensor, got {got}")
    query = next(iter(tensors.values()))
    batch_axis = rank - 4  # (heads,) N, R, L, C
    expected = (query.shape[batch_axis], query.shape[batch_axis + 1])
    for name, tensor in tensors.items():
        if (tensor.shape[batch_axis], tensor.shape[batch_axis + 1]) != expected:
            raise ValueError(f"{name}: expected batch and region sizes {expected}, got {tuple(tensor.shape)}")
    if tuple(topk_index.shape[:2]) != expected:
        raise ValueError(f"topk_index: expected (N, R) = {expected} leading sizes, got {tuple(topk_index.shape)}")


def check_topk_index(topk_index: torch.Tensor, regions: int) -> None:
    """ValueError unless every query region routes to ``1..regions`` distinct regions in ``[0, regions)``.

    Out-of-range indices would make the gathering backends read another image's regions (the flattened
    region axis spans the batch); a region routed twice would be counted twice by the gathering backends and
    once by ``dense``: both are refused. The cost is one min/max and one sort of the small (N, R, topk) index
    and one device synchronisation (see ``benchmarks/bench_topk_check.py``). Skipped while compiling,
    exporting or tracing (the graph cannot raise on values; the BRA layer's own index is valid by construction).
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return
    topk = topk_index.shape[-1]
    if not 1 <= topk <= regions:
        raise ValueError(f"topk_index: expected 1 to {regions} routed regions per query region, got topk={topk}")
    if topk_index.numel() == 0:
        return
    low, high = topk_index.aminmax()
    bad = (low < 0) | (high >= regions)
    if topk > 1:
        ordered = topk_index.sort(dim=-1).values
        repeated = (ordered[..., 1:] == ordered[..., :-1]).any()
        bad = bad | repeated
    if not bad.item():  # the one synchronisation
        return
    if low < 0 or high >= regions:
        raise ValueError(f"topk_index: expected region indices in [0, {regions}), got values from {int(low)} to "
                         f"{int(high)}")
    where = (ordered[..., 1:] == ordered[..., :-1]).nonzero()[0].tolist()
    raise ValueError(f"topk_index: a query region routes to the same region twice (image {where[0]}, query "
                     f"region {where[1]}: {topk_index[where[0], where[1]].tolist()}); indices must be distinct")


def routed_attention_heads(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    topk_index: torch.Tensor,
    *,
    scale: float,
    backend: str | None = None,
    check_index: bool = True,
) -> torch.Tensor:
    """Routed attention on head-major tensors (the fast path of the BRA layer).

    Args:
        query: (heads, N, R, L_q, d_qk).
        key: (heads, N, R, L_kv, d_qk).
        value: (heads, N, R, L_kv, d_v).
        topk_index: int64 (N, R, topk) routed region indices.
        scale: multiplier of q before the dot product.
        backend: a name from :func:`available_backends`, or None for the current default.
        check_index: check ``topk_index`` (:func:`check_topk_index`: range, distinct); False for an index
            known to be valid (the BRA layer's, from ``topk``).

    Returns:
        (heads, N, R, L_q, d_v).
    """
    _check_routed_inputs({"query": query, "key": key, "value": value}, 5, topk_index)
    if check_index:
        check_topk_index(topk_index, query.shape[2])
    heads, _, regions, _, _ = query.shape
    name = resolve_backend(
        backend, num_regions=regions, topk=topk_index.shape[-1], tokens_per_region=key.shape[3],
        device=query.device, needs_grad=_needs_grad(query, key, value),
    )
    chosen = _BACKENDS[name]
    if chosen.layout == HEAD_LAYOUT:
        return chosen.function(query, key, value, topk_index, scale=scale)
    key_value = torch.cat([heads_to_regions(key), heads_to_regions(value)], dim=-1)
    out = chosen.function(heads_to_regions(query), key_value, topk_index, num_heads=heads, scale=scale)
    return regions_to_heads(out, heads)


def routed_attention(
    query: torch.Tensor,
    key_value: torch.Tensor,
    topk_index: torch.Tensor,
    *,
    num_heads: int,
    scale: float,
    backend: str | None = None,
    check_index: bool = True,
) -> torch.Tensor:
    """Attention of each query region's tokens over the tokens of its routed regions (region layout).

    Args:
        query: (N, R, L_q, C_qk) tokens of each query region.
        key_value: (N, R, L_kv, C_qk + C_v) keys then values of each region (a channel slice is fine).
        topk_index: int64 (N, R, topk) routed region indices.
        num_heads: heads; C_qk and C_v must be divisible by it.
        scale: multiplier of q before the dot product.
        backend: a name from :func:`available_backends`, or None for the current default.
        check_index: check ``topk_index`` (:func:`check_topk_index`: range, distinct); False for an index
            known to be valid.

    Returns:
        (N, R, L_q, C_v).
    """
    _check_routed_inputs({"query": query, "key_value": key_value}, 4, topk_index)
    if check_index:
        check_topk_index(topk_index, query.shape[1])
    qk_dim = query.shape[-1]
    name = resolve_backend(
        backend, num_regions=query.shape[1], topk=topk_index.shape[-1], tokens_per_region=key_value.shape[2],
        device=query.device, needs_grad=_needs_grad(query, key_value),
    )
    chosen = _BACKENDS[name]
    if chosen.layout == REGION_LAYOUT:
        return chosen.function(query, key_value, topk_index, num_heads=num_heads, scale=scale)
    out = chosen.function(
        regions_to_heads(query, num_heads),
        regions_to_heads(key_value[..., :qk_dim], num_heads),
        regions_to_heads(key_value[..., qk_dim:], num_heads),
        topk_index,
        scale=scale,
    )
    return heads_to_regions(out)
