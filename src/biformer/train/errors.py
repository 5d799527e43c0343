"""The errors of the training package, in a module that imports nothing else of it.

Every other module of :mod:`biformer.train` (and the command line) may raise or catch these; this module
depends on no other, so the import graph has no circle through it.
"""

from __future__ import annotations

__all__ = ["ConfigError", "DataError"]


class ConfigError(ValueError):
    """A configuration value or file that cannot be used; the message names the option."""


class DataError(ValueError):
    """A dataset that cannot be used: missing, empty, or malformed. The message says what to do."""
