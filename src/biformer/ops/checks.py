"""Input checks of the routed-attention functions: shapes that fit together and a valid routing index."""

from __future__ import annotations

import torch


def check_routed_inputs(tensors: dict[str, torch.Tensor], rank: int, topk_index: torch.Tensor) -> None:
    """ValueError naming the argument when ranks, batch/region sizes or the index do not fit together.

    Args:
        tensors: name -> tensor, the query first: (N, R, L, C) for ``rank`` 4, (heads, N, R, L, d) for 5.
        rank: 4 (region layout) or 5 (head-major layout).
        topk_index: expected int64 (N, R, topk).
    """
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
