"""Triton kernel tests run in Triton's CPU interpreter: ``TRITON_INTERPRET=1`` for each test of this folder.

The ``triton`` backend reads the variable at every call (it does not rely on triton's own import-time
setting), so setting it per test with ``monkeypatch`` is hermetic: tests elsewhere never see it, and the
order in which triton gets imported (by torch or by these tests) does not matter.
"""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
