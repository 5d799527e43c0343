"""The fused ``triton`` backend in Triton's CPU interpreter, against the float64 reference formulation.

Forward and every gradient are compared per dtype (fp32 1e-4, fp16 1e-2, bf16 5e-2, absolute and
relative) with the ``reference`` backend (the authors' gather formulation) run in float64 on the same
rounded inputs. Grids stay small: the interpreter runs each program instance in Python.

Every test here runs with ``TRITON_INTERPRET=1`` (the autouse fixture below). The ``triton`` backend reads
the variable at every call rather than relying on triton's import-time setting, so setting it per test
with ``monkeypatch`` is hermetic: other tests never see it, and it does not matter whether triton was
imported before (``import torch`` / ``import biformer`` import it). The fixture lives in this module, not in
a ``conftest.py``: tests elsewhere import helpers with ``from conftest import ...``, which a second
``conftest`` module would shadow.
"""

from __future__ import annotations

import pytest
import torch

from biformer import BiLevelRoutingAttention
from biformer.ops import routed_attention_heads
from biformer.ops.backends import triton as triton_bra
from biformer.ops.backends.triton import transposed_routing, triton_available


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
# CPU: the interpreter; CUDA (where present): the compiled kernels, same cases and tolerances
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}

CASES = {
    # heads, batch, regions, q_len, kv_len, d_qk, d_v, topk
    "d16-two-images": (2, 2, 4, 4, 4, 16, 16, 2),
    "odd-region-topk-all-d32": (1, 1, 9, 5, 5, 32, 32, 9),
    "topk1-d64": (1, 1, 4, 9, 9, 64, 64, 1),
    "several-tiles-odd-dims": (1, 1, 4, 70, 70, 24, 20, 2),  # 70 tokens: two query tiles; d_qk != d_v
}


def random_routing(batch, regions, topk, generator=None):
    return torch.stack([torch.randperm(regions, generator=generator)[:topk] for _ in range(batch * regions)]).view(
        batch, regions, topk
    )


def make_inputs(case, dtype, device="cpu"):
    heads, batch, regions, q_len, kv_len, d_qk, d_v, topk = case
    query = torch.randn(heads, batch, regions, q_len, d_qk).to(device, dtype)
    key = torch.randn(heads, batch, regions, kv_len, d_qk).to(device, dtype)
    value = torch.randn(heads, batch, regions, kv_len, d_v).to(device, dtype)
    return query, key, value, random_routing(batch, regions, topk).to(device)


def forward_backward(query, key, value, topk_index, grad_out, backend, scale=0.25):
    leaves = [t.detach().clone().requires_grad_() for t in (query, key, value)]
    out = routed_attention_heads(*leaves, topk_index, scale=scale, backend=backend)
    grads = torch.autograd.grad(out, leaves, grad_out)
    return out.detach(), grads


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_forward_and_gradients_match_float64_reference(case, dtype, device):
    query, key, value, topk_index = make_inputs(case, dtype, device)
    heads, batch, regions, q_len, _, _, d_v, _ = case
    grad_out = torch.randn(heads, batch, regions, q_len, d_v).to(device, dtype)
    out, grads = forward_backward(query, key, value, topk_index, grad_out, "triton")
    expected, expected_grads = forward_backward(
        query.double(), key.double(), value.double(), topk_index, grad_out.double(), "reference"
    )
    tol = TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == expected.shape
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol, msg=lambda m: f"output: {m}")
    for name, grad, want in zip(("query", "key", "value"), grads, expected_grads):
        assert grad.dtype == dtype
        torch.testing.assert_close(grad.double(), want, atol=tol, rtol=tol, msg=lambda m, n=name: f"d{n}: {m}")


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_wide_heads_use_smaller_tiles_and_match(device):
    # head size 100 (tiles of 128 channels) takes 32-token tiles: 40 tokens span two query and key tiles
    test_forward_and_gradients_match_float64_reference((1, 1, 4, 40, 40, 100, 72, 2), torch.float32, device)


@needs_triton
@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_bit_identical_across_runs(device):
    # every query region routes to regions 0 and 1: their dK/dV sum many contributions
    query, key, value, _ = make_inputs((1, 2, 4, 6, 6, 16, 16, 2), torch.float32, device)
    topk_index = torch.tensor([[[0, 1], [1, 0], [0, 1], [1, 0]]] * 2, device=device)
    grad_out = torch.randn(1, 2, 4, 6, 16, device=device)
    first = forward_backward(query, key, value, topk_index, grad_out, "triton")[1]
    second = forward_backward(query, key, value, topk_index, grad_out, "triton")[1]
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    assert first[1][:, :, 2:].abs().sum() == 0  # unrouted key regions get no gradient


@needs_triton
def test_bra_layer_with_triton_matches_reference_backend():
    torch.manual_seed(0)
    layer = BiLevelRoutingAttention(32, num_heads=2, n_win=2, topk=2, side_dwconv=3)
    x = torch.randn(1, 6, 6, 32)  # regions of 3 x 3 tokens; q, k, v are strided views of one tensor
    outs, grads = [], []
    for backend in ("triton", "reference"):
        layer.backend = backend
        layer.zero_grad()
        x_leaf = x.clone().requires_grad_()
        out = layer(x_leaf)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append((x_leaf.grad, layer.qkv.qkv.weight.grad.clone()))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
    for a, b in zip(grads[0], grads[1]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_transposed_routing_lists_the_query_regions_of_every_key_region():
    topk_index = torch.tensor([[[2, 0], [2, 1], [0, 2]], [[1, 1], [0, 2], [2, 0]]])  # (N=2, R=3, topk=2)
    offsets, sources = transposed_routing(topk_index)
    for n in range(2):
        for s in range(3):
            g = n * 3 + s
            listed = sources[offsets[g] : offsets[g + 1]].tolist()
            expected = [r for r in range(3) for t in range(2) if topk_index[n, r, t] == s]
            assert listed == expected, (n, s)


@needs_triton
def test_without_interpreter_on_cpu_the_fallback_computes(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    query, key, value, topk_index = make_inputs(CASES["d16-two-images"], torch.float32)

    def kernels_must_not_run(*args):
        raise AssertionError("the kernels ran on CPU without TRITON_INTERPRET")

    monkeypatch.setattr(triton_bra.FusedRoutedAttention, "apply", kernels_must_not_run)
    out = routed_attention_heads(query, key, value, topk_index, scale=0.25, backend="triton")
    expected = routed_attention_heads(query, key, value, topk_index, scale=0.25, backend="gather")
    assert torch.equal(out, expected)


@needs_triton
def test_float64_falls_back_to_gather(monkeypatch):
    query, key, value, topk_index = make_inputs(CASES["d16-two-images"], torch.float64)
    monkeypatch.setattr(triton_bra.FusedRoutedAttention, "apply", None)  # would fail if called
    out = routed_attention_heads(query, key, value, topk_index, scale=0.25, backend="triton")
    expected = routed_attention_heads(query, key, value, topk_index, scale=0.25, backend="gather")
    assert torch.equal(out, expected)


def test_triton_backend_without_triton_names_the_package(monkeypatch):
    monkeypatch.setattr(triton_bra, "triton_available", lambda: False)
    query, key, value, topk_index = make_inputs(CASES["d16-two-images"], torch.float32)
    with pytest.raises(ImportError, match=r"^backend='triton' needs the 'triton' package.*pip install triton$"):
        routed_attention_heads(query, key, value, topk_index, scale=0.25, backend="triton")


@needs_triton
def test_triton_backend_refuses_head_sizes_above_its_limit():
    query, key, value, topk_index = make_inputs((1, 1, 4, 2, 2, 8, 300, 1), torch.float32)
    with pytest.raises(ValueError, match=r"^value: the triton backend supports head sizes up to 256, got 300$"):
        routed_attention_heads(query, key, value, topk_index, scale=0.25, backend="triton")


@needs_triton
def test_kernels_compile_for_an_nvidia_gpu(tmp_path, monkeypatch):
    """The GPU path, which the interpreter does not take: compile the three kernels for sm_90 (no GPU needed).

    bfloat16 with the tiles of BiFormer's stage 1 (64 x 64, head size 32): the native half-precision
    ``tl.dot`` the interpreter replaces by float32 products.
    """
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from biformer.ops.backends import _triton_kernels as kernels

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TRITON_INTERPRET")
    pointers = {"Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV"}
    for function in (
        kernels.routed_attention_forward, kernels.routed_attention_backward_query,
        kernels.routed_attention_backward_key_value,
    ):
        names = list(inspect.signature(function).parameters)
        signature = {
            name: "*bf16" if name in pointers else "*fp32" if name in ("LSE", "DELTA")
            else "*i64" if name in ("IDX", "OFFSETS", "SOURCES") else "fp32" if name == "scale"
            else "constexpr" if name.isupper() else "i32"
            for name in names
        }
        constants = dict(BLOCK_Q=64, BLOCK_K=64, BLOCK_KV=64, BLOCK_DQK=32, BLOCK_DV=32, PRECISION="tf32", UPCAST=False)
        source = ASTSource(triton.jit(function), signature, {k: v for k, v in constants.items() if k in names})
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"] and compiled.metadata.shared < 100 * 2**10
