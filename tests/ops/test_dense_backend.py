"""The ``dense`` backend's two forms: SDPA with the routing as a 0/-inf mask, and the explicit products where SDPA
is slower (a bf16 backward on CPU) or cannot fuse (q and v head sizes differ). Each against a float64 loop over
images, heads and query regions, forward and backward, in float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch

from biformer.ops.backends import dense

# dtype -> (forward tolerance, gradient tolerance), relative to the float64 result's largest magnitude
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (3e-2, 5e-2)}
EXPLICIT = dense._explicit_dense  # the explicit form itself, before a test wraps it to see which form ran


def plain64(query, key, value, topk_index, scale):
    """(heads, N, R, L, d) float64 -> (heads, N, R, L_q, d_v): each query region over its routed regions' tokens."""
    heads, batch, regions, q_len, _ = query.shape
    out = torch.zeros(heads, batch, regions, q_len, value.shape[-1], dtype=torch.float64)
    for h in range(heads):
        for n in range(batch):
            for r in range(regions):
                keys = torch.cat([key[h, n, int(s)] for s in topk_index[n, r]])
                values = torch.cat([value[h, n, int(s)] for s in topk_index[n, r]])
                out[h, n, r] = torch.softmax(query[h, n, r] @ keys.T * scale, dim=-1) @ values
    return out


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    scale = expected.abs().max().item()
    err = (actual.double() - expected).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3g} above {rel} x {scale:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("v_head", [8, 12], ids=["equal-heads", "wider-v"])
@pytest.mark.parametrize("grad", [False, True], ids=["no-grad", "with-grad"])
def test_dense_matches_float64(monkeypatch, dtype, v_head, grad):
    torch.manual_seed(0)
    heads, batch, regions, q_len, kv_len, topk, scale = 2, 2, 9, 4, 4, 3, 8**-0.5
    tensors64 = [torch.randn(heads, batch, regions, length, width, dtype=torch.float64, requires_grad=True)
                 for length, width in ((q_len, 8), (kv_len, 8), (kv_len, v_head))]
    topk_index = torch.stack([torch.randperm(regions)[:topk] for _ in range(batch * regions)]).view(
        batch, regions, topk
    )
    expected = plain64(*tensors64, topk_index, scale)
    upstream = torch.randn_like(expected)
    grads64 = torch.autograd.grad((expected * upstream).sum(), tensors64)
    forms = []
    monkeypatch.setattr(dense, "_explicit_dense", lambda *a: forms.append("explicit") or EXPLICIT(*a))
    inputs = [t.detach().to(dtype).requires_grad_(grad) for t in tensors64]
    with torch.set_grad_enabled(grad):
        out = dense.dense_attention(*inputs, topk_index, scale=scale)
    fwd_tol, grad_tol = TOLERANCES[dtype]
    assert out.dtype == dtype and out.shape == expected.shape
    _close(out.float(), expected.detach(), fwd_tol)
    wants_explicit = v_head != 8 or (dtype == torch.bfloat16 and grad)
    assert forms == (["explicit"] if wants_explicit else []), forms
    if grad:
        grads = torch.autograd.grad((out.float() * upstream.float()).sum(), inputs)
        for got, want in zip(grads, grads64):
            _close(got.float(), want, grad_tol)


def test_sdpa_form_returns_a_view_in_the_head_major_shape():
    query, key, value = (torch.randn(2, 1, 4, 3, 8) for _ in range(3))
    topk_index = torch.tensor([[[0, 1], [1, 2], [2, 3], [3, 0]]])
    with torch.no_grad():
        out = dense.dense_attention(query, key, value, topk_index, scale=0.5)
    assert out.shape == (2, 1, 4, 3, 8)
    # the BRA layer splits the region and token axes with view (head_regions_to_image): they must stay splittable
    out.view(2, 1, 2, 2, 3, 1, 8)
