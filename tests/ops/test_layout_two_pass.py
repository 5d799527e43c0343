"""The two-pass head-major layout copies (CPU, eager): ``image_to_head_regions_two_pass`` against the one-copy
``image_to_head_regions`` (every chunking of the batch, channel slices, bf16), the rule that picks them, and
:class:`HeadRegionsToImage` against autograd through the plain permuted view (float64, gradcheck)."""

from __future__ import annotations

import pytest
import torch

import biformer.ops.regions as regions
from biformer.ops.qkv_heads import qkv_to_heads
from biformer.ops.regions import (
    HeadRegionsToImage,
    head_regions_to_image,
    image_to_head_regions,
    image_to_head_regions_two_pass,
    two_pass_layout,
)


def image_bytes(x: torch.Tensor) -> int:
    return x[0].numel() * x.element_size()


@pytest.mark.parametrize("images_per_chunk", [1, 2, 5, 8], ids=lambda n: f"{n}-per-chunk")
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_two_pass_equals_one_copy_for_every_chunking(monkeypatch, images_per_chunk, parts):
    x = torch.randn(5, 6, 4, parts * 2 * 3)  # 5 images, 3 x 2 regions of 2 x 2 tokens, 2 heads of 3 channels
    monkeypatch.setattr(regions, "LAYOUT_CHUNK_BYTES", images_per_chunk * image_bytes(x))
    got = image_to_head_regions_two_pass(x, 3, 2, num_heads=2, parts=parts)
    assert got.is_contiguous() and torch.equal(got, image_to_head_regions(x, 3, 2, num_heads=2, parts=parts))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_two_pass_takes_a_channel_slice_in_every_dtype(monkeypatch, dtype):
    qkv = torch.randn(3, 4, 4, 40).to(dtype)
    key_value = qkv[..., 8:32]  # k and v of a wider projection: a strided view
    monkeypatch.setattr(regions, "LAYOUT_CHUNK_BYTES", 2 * image_bytes(key_value))
    got = image_to_head_regions_two_pass(key_value, 2, 2, num_heads=4, parts=2)
    assert got.dtype == dtype and torch.equal(got, image_to_head_regions(key_value, 2, 2, num_heads=4, parts=2))


def test_the_rule_takes_short_runs_on_cpu_only():
    x = torch.empty(2, 14, 14, 768)
    assert two_pass_layout(x, region_w=2, head_dim=32)  # stage 3 of biformer_small: runs of 64 elements
    assert two_pass_layout(x, region_w=4, head_dim=32)  # stage 2: 128
    assert not two_pass_layout(x, region_w=8, head_dim=32)  # stage 1: 256, the one copy is as fast
    assert not two_pass_layout(torch.empty(2, 14, 14, 768, device="meta"), region_w=2, head_dim=32)


def test_long_runs_keep_the_one_copy(monkeypatch):
    calls = []
    monkeypatch.setattr(regions, "_image_to_head_regions_in_chunks", lambda *args: calls.append(args))
    x = torch.randn(2, 16, 16, 2 * 64)  # regions of 8 x 8 tokens, heads of 64 channels: runs of 512
    got = image_to_head_regions_two_pass(x, 2, 2, num_heads=2)
    assert not calls and torch.equal(got, image_to_head_regions(x, 2, 2, num_heads=2))


def test_qkv_split_under_autograd_matches_the_plain_split(monkeypatch):
    qkv = torch.randn(3, 4, 6, 3 * 8, requires_grad=True)
    monkeypatch.setattr(regions, "LAYOUT_CHUNK_BYTES", 2 * image_bytes(qkv))
    query, key, value, _ = qkv_to_heads(qkv, 2, 2, 2, 8, True)
    expected = image_to_head_regions(qkv.detach(), 2, 2, 2, parts=3)
    assert torch.equal(torch.stack([query, key, value]), expected)


def permuted_image(x: torch.Tensor, grid_h: int, grid_w: int, region_h: int, region_w: int) -> torch.Tensor:
    """head_regions_to_image written out: a permuted view, reshaped (autograd's own backward)."""
    heads, batch, _, _, head_dim = x.shape
    view = x.view(heads, batch, grid_h, grid_w, region_h, region_w, head_dim).permute(1, 2, 4, 3, 5, 0, 6)
    return view.reshape(batch, grid_h * region_h, grid_w * region_w, heads * head_dim)


@pytest.mark.parametrize("with_add_to", [True, False], ids=["add-to", "alone"])
def test_head_regions_to_image_backward_matches_autograd_of_the_permuted_view(monkeypatch, with_add_to):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 4, 5, dtype=torch.float64, requires_grad=True)  # 3 x 2 regions of 2 x 2 tokens
    base = torch.randn(3, 6, 4, 10, dtype=torch.float64, requires_grad=True) if with_add_to else None
    weight = torch.randn(3, 6, 4, 10, dtype=torch.float64)
    before = None if base is None else base.detach().clone()
    monkeypatch.setattr(regions, "LAYOUT_CHUNK_BYTES", 2 * 6 * 4 * 10 * 8)  # two images per chunk: 2 + 1
    ours = head_regions_to_image(x, 3, 2, 2, 2, add_to=base)
    assert type(ours.grad_fn).__name__ == "HeadRegionsToImageBackward"
    want = permuted_image(x, 3, 2, 2, 2) + (0 if base is None else base)
    assert torch.equal(ours, want)
    inputs = (x,) if base is None else (x, base)
    for got, expected in zip(torch.autograd.grad((ours * weight).sum(), inputs),
                             torch.autograd.grad((want * weight).sum(), inputs)):
        assert torch.equal(got, expected)
    if base is not None:
        assert torch.equal(base.detach(), before)  # not updated in place under autograd


def test_head_regions_to_image_function_passes_gradcheck():
    x = torch.randn(2, 2, 4, 2, 3, dtype=torch.float64, requires_grad=True)  # 2 x 2 regions of 1 x 2 tokens
    base = torch.randn(2, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: HeadRegionsToImage.apply(a, 2, 2, 1, 2, b), (x, base))
    assert torch.autograd.gradcheck(lambda a: HeadRegionsToImage.apply(a, 2, 2, 1, 2, None), (x,))
