"""The stage-4 global attention with LePE takes two forms: the explicit ``softmax((q @ k^T) * scale) @ v`` where a
gradient is needed on CPU in bf16 (SDPA's backward is slow there), SDPA everywhere else. Both against a float64
formulation written out here, forward and backward, in fp32 and bf16 autocast, for the NHWC and NCHW layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from biformer.layers import AttentionLePE, AttentionLePENCHW
from biformer.layers.attention_lepe import _attention

# (dtype of autocast or None, forward tolerance, gradient tolerance), relative to the float64 result's scale
TOLERANCES = {None: (1e-5, 1e-5), torch.bfloat16: (3e-2, 5e-2)}


def plain_attention64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Per head and image, with Python loops: (N, heads, L, d) x3 float64 -> (N, heads, L, d)."""
    out = torch.empty_like(q)
    for n in range(q.shape[0]):
        for h in range(q.shape[1]):
            scores = (q[n, h] @ k[n, h].T) * scale
            out[n, h] = torch.softmax(scores, dim=-1) @ v[n, h]
    return out


def reference_nhwc64(layer: AttentionLePE, x: torch.Tensor) -> torch.Tensor:
    """The authors' AttentionLePE in float64 from the layer's weights: (N, H, W, C) -> (N, H, W, C)."""
    n, hgt, wid, c = x.shape
    heads, d = layer.num_heads, c // layer.num_heads
    w = {name: p.detach().double() for name, p in layer.named_parameters()}
    qkv = (x @ w["qkv.weight"].T).reshape(n, hgt * wid, 3, heads, d).permute(2, 0, 3, 1, 4)
    out = plain_attention64(qkv[0], qkv[1], qkv[2], layer.scale).transpose(1, 2).reshape(n, hgt, wid, c)
    kernel = w["lepe.weight"].shape[-1]
    lepe = F.conv2d(x.permute(0, 3, 1, 2), w["lepe.weight"], w["lepe.bias"], padding=kernel // 2, groups=c)
    out = out + lepe.permute(0, 2, 3, 1)
    return out @ w["proj.weight"].T + w["proj.bias"]


def reference_nchw64(layer: AttentionLePENCHW, x: torch.Tensor) -> torch.Tensor:
    """The authors' nchwAttentionLePE in float64 (LePE on V): (N, C, H, W) -> (N, C, H, W)."""
    n, c, hgt, wid = x.shape
    heads, d = layer.num_heads, c // layer.num_heads
    w = {name: p.detach().double() for name, p in layer.named_parameters()}
    qkv = torch.einsum("oc,nchw->nohw", w["qkv.weight"][:, :, 0, 0], x)
    q, k, v = qkv.chunk(3, dim=1)

    def heads_of(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(n, heads, d, hgt * wid).transpose(-1, -2)

    out = plain_attention64(heads_of(q), heads_of(k), heads_of(v), layer.scale)
    out = out.transpose(-1, -2).reshape(n, c, hgt, wid)
    kernel = w["lepe.weight"].shape[-1]
    out = out + F.conv2d(v, w["lepe.weight"], w["lepe.bias"], padding=kernel // 2, groups=c)
    return torch.einsum("oc,nchw->nohw", w["proj.weight"][:, :, 0, 0], out) + w["proj.bias"].view(1, -1, 1, 1)


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    scale = expected.abs().max().item()
    err = (actual.double() - expected).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} above {rel} x {scale:.3g}"


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["NHWC", "NCHW"])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "with-grad"])
def test_attention_lepe_matches_float64(layout, autocast, grad):
    torch.manual_seed(0)
    dim, hgt, wid = 32, 5, 6
    if layout == "NHWC":
        layer, reference = AttentionLePE(dim, num_heads=4, side_dwconv=3), reference_nhwc64
        x = torch.randn(2, hgt, wid, dim)
    else:
        layer, reference = AttentionLePENCHW(dim, num_heads=4, side_dwconv=3), reference_nchw64
        x = torch.randn(2, dim, hgt, wid)
    x64 = x.double().requires_grad_(True)
    expected = reference(layer, x64)
    upstream = torch.randn_like(expected)
    (expected * upstream).sum().backward()
    fwd_tol, grad_tol = TOLERANCES[autocast]
    x = x.requires_grad_(grad)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast is not None):
        with torch.set_grad_enabled(grad):
            out = layer(x)
    _close(out.float(), expected.detach(), fwd_tol)
    if grad:
        (out.float() * upstream.float()).sum().backward()
        _close(x.grad, x64.grad, grad_tol)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_both_forms_of_attention_agree_with_float64(autocast):
    """``_attention`` itself: without a gradient (SDPA) and with one (explicit form in bf16, SDPA in fp32), forward
    and the gradients of q, k and v, against the per-head float64 loop."""
    torch.manual_seed(1)
    scale = 16 ** -0.5
    q, k, v = (torch.randn(2, 8, 7, 16, dtype=torch.float64) for _ in range(3))
    for t in (q, k, v):
        t.requires_grad_(True)
    expected = plain_attention64(q, k, v, scale)
    upstream = torch.randn_like(expected)
    grads64 = torch.autograd.grad((expected * upstream).sum(), (q, k, v))
    fwd_tol, grad_tol = TOLERANCES[autocast]
    dtype = torch.float32 if autocast is None else autocast
    inputs = [t.detach().to(dtype) for t in (q, k, v)]
    with torch.no_grad():
        _close(_attention(*inputs, scale).float(), expected.detach(), fwd_tol)
    inputs = [t.requires_grad_(True) for t in inputs]
    out = _attention(*inputs, scale)
    ran_sdpa = "Scaled" in type(out.grad_fn).__name__
    assert ran_sdpa == (autocast is None), type(out.grad_fn).__name__  # explicit form in bf16 only
    _close(out.float(), expected.detach(), fwd_tol)
    grads = torch.autograd.grad((out.float() * upstream.float()).sum(), inputs)
    for got, want in zip(grads, grads64):
        _close(got.float(), want, grad_tol)
