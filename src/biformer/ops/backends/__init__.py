"""The attention backends, one module each, and their registry (:mod:`biformer.ops.backends.registry`).

Importing this package registers every backend, in the order :func:`available_backends` lists them.

Adding a backend: write ``backends/<name>.py`` with a plain function of the head-major signature
``fn(query, key, value, topk_index, *, scale)`` on (heads, N, R, L, d) tensors (or the region one, see
:class:`Backend`), decorated with ``@register_backend("<name>", ...)`` and the capability flags ``auto`` reads
(``auto=True`` to let it be chosen; ``devices``, ``gradients``, ``dtypes``, size limits), then import the module
in the line below. Where ``auto`` should prefer it, add it to the preference lists of :func:`select_backend`.
"""

from . import reference, gather, sdpa, dense, flex, triton, cpu_fused  # noqa: F401, I001  (registration order)
from .registry import (
    HEAD_LAYOUT,
    REGION_LAYOUT,
    Backend,
    BackendChoice,
    attention_backend,
    available_backends,
    check_backend,
    get_backend,
    get_default_backend,
    register_backend,
    resolve_backend,
    runs_whole_batch,
    select_backend,
)

__all__ = [
    "HEAD_LAYOUT",
    "REGION_LAYOUT",
    "Backend",
    "BackendChoice",
    "attention_backend",
    "available_backends",
    "check_backend",
    "get_backend",
    "get_default_backend",
    "register_backend",
    "resolve_backend",
    "runs_whole_batch",
    "select_backend",
]
