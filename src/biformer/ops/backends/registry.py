"""The registry of attention backends, the global default and the one rule that picks a backend.

A backend is a plain function registered with :func:`register_backend` under a name, with the tensor layout it
takes and the capability flags :func:`select_backend` reads for ``auto`` (see :class:`Backend`). The layers call
:func:`resolve_backend` once per forward and hand the :class:`Backend` it returns to
:func:`biformer.ops.functional.routed_attention` / ``routed_attention_heads``, which then run it as given.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import torch

AttentionFn = Callable[..., torch.Tensor]

REGION_LAYOUT = "regions"
HEAD_LAYOUT = "heads"
LAYOUTS = (REGION_LAYOUT, HEAD_LAYOUT)

# In training ``auto`` prefers ``sdpa`` above this many scores per region (its backward never stores them).
LARGE_SCORES = 2**20
# What ``auto`` takes when no preferred backend admits the call.
AUTO_FALLBACK = "gather"


@dataclasses.dataclass(frozen=True)
class Backend:
    """A registered attention backend.

    Attributes:
        name: the name accepted by ``backend=`` and :func:`attention_backend`.
        function: the backend's plain function. Head layout: ``fn(query, key, value, topk_index, *, scale)`` on
            (heads, N, R, L, d) tensors -> (heads, N, R, L_q, d_v). Region layout:
            ``fn(query, key_value, topk_index, *, num_heads, scale)`` on (N, R, L, C) tensors -> (N, R, L_q, C_v).
        layout: ``"regions"`` or ``"heads"``, the layout ``function`` takes (the BRA layer builds that one).
        auto: whether ``auto`` may choose it.
        devices: device types (``"cpu"``, ``"cuda"`` ...) its own implementation runs on; elsewhere it computes
            the same function with ``gather``. None: every device.
        gradients: whether ``auto`` may choose it when gradients are needed.
        dtypes: dtypes its own implementation runs in; None: every floating dtype.
        max_tokens: the largest token count per image (regions x tokens per region) ``auto`` gives it; None: any.
        min_routed_fraction: ``auto`` gives it only calls that route at least this fraction of the regions.
        max_head_dim: the largest q or v head size it accepts; None: any.
        whole_batch: the models must run it on the whole batch in one call (never on groups of images).
        available: None, or a check that its own implementation can run in this process now (compiled kernels
            built, not being traced or compiled); ``auto`` skips it where the check says no.
        image_function: None, or an entry that takes the BRA projection's output directly:
            ``fn(qkv, topk_index, add_to, *, grid_h, grid_w, num_heads, qk_dim, scale)`` with qkv
            (N, H, W, 2 * qk_dim + C) -> (N, H, W, C) plus ``add_to`` (N, H, W, C) when given; the BRA layer calls
            it instead of splitting the projection into head-major q, k, v.
        runs_on: with ``image_function``: whether its own implementation runs for a call on this projection output
            (device, dtype, kernels built, not traced); where it says no, the layer takes the head-major path.
        fuses_local_conv: with ``image_function``: whether it takes the layer's LCE conv itself (keyword
            ``local_conv``, instead of ``add_to``) for this conv.
    """

    name: str
    function: AttentionFn
    layout: str = HEAD_LAYOUT
    auto: bool = False
    devices: tuple[str, ...] | None = None
    gradients: bool = True
    dtypes: tuple[torch.dtype, ...] | None = None
    max_tokens: int | None = None
    min_routed_fraction: float = 0.0
    max_head_dim: int | None = None
    whole_batch: bool = False
    available: Callable[[], bool] | None = None
    image_function: AttentionFn | None = None
    runs_on: Callable[[torch.Tensor], bool] | None = None
    fuses_local_conv: Callable[[object], bool] | None = None

    def admits(
        self,
        *,
        num_regions: int,
        topk: int,
        tokens_per_region: int,
        device: torch.device,
        needs_grad: bool,
        dtype: torch.dtype | None = None,
        head_dim: int | None = None,
    ) -> bool:
        """Whether its flags allow ``auto`` to give it this call (``dtype`` / ``head_dim`` None: not checked)."""
        return (
            self.auto
            and (self.devices is None or device.type in self.devices)
            and (self.gradients or not needs_grad)
            and (self.dtypes is None or dtype is None or dtype in self.dtypes)
            and (self.max_tokens is None or num_regions * tokens_per_region <= self.max_tokens)
            and topk >= self.min_routed_fraction * num_regions
            and (self.max_head_dim is None or head_dim is None or head_dim <= self.max_head_dim)
            and (self.available is None or self.available())
        )


_BACKENDS: dict[str, Backend] = {}
_default_backend: str = "auto"


def register_backend(
    name: str, layout: str = HEAD_LAYOUT, **capabilities: object
) -> Callable[[AttentionFn], AttentionFn]:
    """Decorator adding the function it decorates as backend ``name`` (unchanged: it stays a plain function).

    Args:
        name: the backend's name (not ``"auto"``, not taken).
        layout: ``"heads"`` (default) or ``"regions"``.
        capabilities: the other fields of :class:`Backend` (``auto``, ``devices``, ``gradients`` ...).
    """
    if name == "auto" or name in _BACKENDS:
        raise ValueError(f"name: expected a new backend name, got {name!r} (taken)")
    if layout not in LAYOUTS:
        raise ValueError(f"layout: expected one of {LAYOUTS}, got {layout!r}")
    known = tuple(field.name for field in dataclasses.fields(Backend))[3:]
    unknown = sorted(set(capabilities) - set(known))
    if unknown:
        raise ValueError(f"capabilities: unknown flag(s) {unknown}; known: {known}")

    def add(fn: AttentionFn) -> AttentionFn:
        _BACKENDS[name] = Backend(name, fn, layout, **capabilities)
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


def get_backend(name: str) -> Backend:
    """The registered backend ``name`` (a concrete one: ``auto`` is resolved per call by :func:`resolve_backend`)."""
    if name not in _BACKENDS:
        raise ValueError(f"backend: expected one of {tuple(_BACKENDS)}, got {name!r}")
    return _BACKENDS[name]


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


def select_backend(
    backend: str | None = "auto",
    *,
    num_regions: int,
    topk: int,
    tokens_per_region: int,
    device: torch.device,
    needs_grad: bool,
    dtype: torch.dtype | None = None,
    head_dim: int | None = None,
) -> str:
    """The concrete backend for a call: ``backend`` (None: the current default, read once), ``auto`` resolved.

    ``auto`` takes the first backend of a preference list, measured in ``benchmarks/RESULTS.md`` (CPU, fp32
    and bf16, inference and training), that its flags admit (:meth:`Backend.admits`), else ``gather``:

    - CPU, float32 and bfloat16, inference and training: ``cpu_fused`` wherever its kernels are built (see
      :mod:`biformer.ops.cpu_kernels`) and the call is not traced or compiled: it was the fastest at every
      BiFormer stage shape, forward and forward + backward. Without it, the rules below;
    - CPU (and every device but CUDA), inference: ``dense`` where its flags admit it (stage 3 at 224 px: its
      three large batched products beat the gather of 16 regions of 4 tokens), else ``gather``, whose chunked
      inference form is the fastest at the other BiFormer shapes and keeps the memory bounded at any image size;
    - training: ``sdpa`` when one region's score matrix is large (more than ``LARGE_SCORES``: large maps with
      ``n_win`` regions), as its backward recomputes the scores block by block instead of storing them; else
      ``dense`` where its flags admit it (a map of at most 1024 tokens with at least a quarter of the regions
      routed: stage 3 at 224 px, 16 of 49 regions, 196 tokens); else ``gather``;
    - CUDA (not measured: no GPU here): ``sdpa`` for inference (its fused kernels never materialise the score
      matrix), ``gather`` for training (cuBLAS products and the sorted, atomic-free gather backward of
      :mod:`biformer.ops.gather`: deterministic, where SDPA's CUDA backward kernels may use atomics);
    - ``sdpa`` and ``flex`` were slower on CPU at every BiFormer shape; ``triton`` is not chosen until
      ``benchmarks/bench_gpu.py`` has shown it faster on a GPU; ``reference`` is the oracle.

    The batch size never enters the choice, so ``torch.compile`` with a dynamic batch sees one decision.

    Args:
        backend: a name from :func:`available_backends` (default ``"auto"``), or None for the current default.
        num_regions: R, regions per image.
        topk: routed regions per query region.
        tokens_per_region: L_kv, tokens per key region.
        device: the device of the tensors.
        needs_grad: whether a backward will run.
        dtype: the dtype of the tensors (None: not checked).
        head_dim: the larger of the q and v head sizes (None: not checked).

    Returns:
        a backend name (never ``"auto"``).
    """
    name = backend or get_default_backend()
    if name != "auto":
        return check_backend(name)
    if device.type == "cuda":  # not measured here
        preferred = ("gather",) if needs_grad else ("sdpa", "gather")
    elif not needs_grad:
        preferred = ("cpu_fused", "dense", "gather")
    elif topk * tokens_per_region**2 > LARGE_SCORES:
        preferred = ("cpu_fused", "sdpa", "gather")
    else:
        preferred = ("cpu_fused", "dense", "gather")
    sizes = dict(
        num_regions=num_regions, topk=topk, tokens_per_region=tokens_per_region, device=device,
        needs_grad=needs_grad, dtype=dtype, head_dim=head_dim,
    )
    for candidate in preferred:
        if _BACKENDS[candidate].admits(**sizes):
            return candidate
    return AUTO_FALLBACK


def resolve_backend(backend: str | None, **sizes: object) -> Backend:
    """:func:`select_backend` (same arguments), as the registered :class:`Backend` a layer hands to the op."""
    return _BACKENDS[select_backend(backend, **sizes)]


class BackendChoice:
    """Mixin of the routed-attention layers: their ``backend`` attribute, checked whenever it is assigned.

    ``layer.backend`` is a name from :func:`available_backends` or None (the current default, read once per
    forward); assigning another value raises ``ValueError`` naming the accepted ones and keeps the old one.
    """

    @property
    def backend(self) -> str | None:
        """The attention backend's name, or None for the current default."""
        return self._backend

    @backend.setter
    def backend(self, name: str | None) -> None:
        self._backend = check_backend(name)


def runs_whole_batch(backend: str | None) -> bool:
    """Whether a module with ``backend`` (None: the current default) must see the whole batch in one call:
    the backend's ``whole_batch`` flag (``reference``: the authors' data flow). False for ``auto``."""
    name = backend or get_default_backend()
    return name != "auto" and _BACKENDS[name].whole_batch
