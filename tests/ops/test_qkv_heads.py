"""``qkv_to_heads``: the head-major split of the BRA projection, and the backward of :class:`QKVToHeads` against
autograd through the plain copies (float64), with and without V as an image, with q/k narrower than v, and with
outputs that get no gradient."""

from __future__ import annotations

import pytest
import torch

from biformer.ops.qkv_heads import QKVToHeads, qkv_to_heads
from biformer.ops.regions import image_to_head_regions


def plain(qkv, grid, heads, qk_dim, with_image_value):
    """The same split with autograd's own backward (slices and copies)."""
    query, key = image_to_head_regions(qkv[..., : 2 * qk_dim], grid, grid, heads, parts=2)
    value = image_to_head_regions(qkv[..., 2 * qk_dim :], grid, grid, heads)[0]
    return query, key, value, (qkv[..., 2 * qk_dim :] if with_image_value else None)


@pytest.mark.parametrize("qk_dim, v_dim", [(8, 8), (4, 12)], ids=["equal", "narrow-qk"])
@pytest.mark.parametrize("with_image_value", [True, False], ids=["with-image-v", "no-image-v"])
@pytest.mark.parametrize("used", ["all", "no-key", "no-image-v"])
def test_backward_matches_autograd_of_the_plain_split(qk_dim, v_dim, with_image_value, used):
    torch.manual_seed(0)
    grid, heads = 2, 2
    qkv = torch.randn(2, 4, 6, 2 * qk_dim + v_dim, dtype=torch.float64, requires_grad=True)
    # a random linear function of each output: (heads, N, R, L, d) for q, k and v (4 regions of 2 x 3 tokens)
    weights = [torch.randn(heads, 2, grid * grid, 6, width // heads, dtype=torch.float64)
               for width in (qk_dim, qk_dim, v_dim)]
    image_weight = torch.randn(2, 4, 6, v_dim, dtype=torch.float64)

    def loss(outputs):
        query, key, value, image = outputs
        total = (query * weights[0]).sum() + (value * weights[2]).sum()
        if used != "no-key":
            total = total + (key * weights[1]).sum()
        if image is not None and used != "no-image-v":
            total = total + (image * image_weight).sum()
        return total

    ours = qkv_to_heads(qkv, grid, grid, heads, qk_dim, with_image_value)
    assert type(ours[0].grad_fn).__name__ == "QKVToHeadsBackward"
    expected = plain(qkv, grid, heads, qk_dim, with_image_value)
    for got, want in zip(ours, expected):
        if want is None:
            assert got is None
        else:
            assert torch.equal(got, want) and got.is_contiguous()
    grad_ours = torch.autograd.grad(loss(ours), qkv)[0]
    grad_plain = torch.autograd.grad(loss(expected), qkv)[0]
    torch.testing.assert_close(grad_ours, grad_plain, rtol=0, atol=1e-12)


def test_without_a_gradient_no_function_runs_and_v_is_a_view():
    qkv = torch.randn(1, 4, 4, 24)
    with torch.no_grad():
        query, key, value, image = qkv_to_heads(qkv.requires_grad_(), 2, 2, 2, 8, True)
    assert query.grad_fn is None and image.data_ptr() == qkv[..., 16:].data_ptr()
    assert query.shape == (2, 1, 4, 4, 4) and value.shape == (2, 1, 4, 4, 4)


def test_function_passes_gradcheck():
    qkv = torch.randn(1, 2, 2, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: QKVToHeads.apply(t, 1, 1, 1, 2, True), (qkv,))
