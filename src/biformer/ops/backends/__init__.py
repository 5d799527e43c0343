"""The attention backends, one module each, and their registry (:mod:`biformer.ops.backends.registry`).

Importing this package registers every backend, in the order :func:`available_backends` lists them.
"""

from . import reference, gather, sdpa, dense, flex, triton  # noqa: F401, I001  (registration order)
from .registry import (
    HEAD_LAYOUT,
    REGION_LAYOUT,
    Backend,
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
