"""The pure parts of benchmarks/bench_linear.py: the swap it applies to timm's own linears."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from biformer.ops import linear as L


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_linear")


@pytest.mark.skipif(not L._available(), reason="this torch build has no oneDNN linear")
def test_swap_routes_plain_linears_to_onednn_only_while_on(bench, monkeypatch):
    monkeypatch.setattr(nn.Linear, "forward", nn.Linear.forward)  # restored after the test
    monkeypatch.setenv(L.ENV_VARIABLE, "1")
    calls = []
    real = L._pointwise
    monkeypatch.setattr(L, "_pointwise", lambda *args: calls.append(1) or real(*args))
    swapped = [False]
    bench.swap_all_linears(swapped)
    torch.manual_seed(0)
    layer, x = nn.Linear(12, 5), torch.randn(3, 4, 12)
    with torch.no_grad():
        plain = layer(x)
        assert not calls
        swapped[0] = True
        fused = layer(x)
    assert len(calls) == 1 and fused.shape == (3, 4, 5)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    layer(x).sum()  # with gradients (outside no_grad) the swap keeps nn.Linear's call
    assert len(calls) == 1


def test_dtypes_are_parsed_and_a_bad_list_is_one_line(bench):
    assert bench.parse_dtypes("fp32, bf16") == ["fp32", "bf16"]
    for bad in ("fp16", "", "fp32,int8"):
        with pytest.raises(SystemExit, match=r"^--dtypes: expected a comma-separated list of fp32, bf16, got "):
            bench.parse_dtypes(bad)
