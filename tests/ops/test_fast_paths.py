"""The fast attention paths: chunked inference, head-major layout, deterministic gather, auto's choices."""

from __future__ import annotations

import pytest
import torch

import biformer.ops.backends.gather as gather_backend
from biformer.ops import (
    gather_regions,
    head_region_means,
    head_regions_to_image,
    image_to_head_regions,
    image_to_regions,
    regions_to_image,
    routed_attention,
    routed_attention_heads,
    select_backend,
)
from biformer.ops.gather import SortedRowGather, gather_rows

HEAD_BACKENDS = ["gather", "sdpa", "dense", "flex", "auto"]


def random_routing(batch, regions, topk, generator=None):
    rows = [torch.randperm(regions, generator=generator)[:topk] for _ in range(batch * regions)]
    return torch.stack(rows).view(batch, regions, topk)


def random_heads(heads, batch, regions, q_len, kv_len, qk_head, v_head, dtype=torch.float32):
    query = torch.randn(heads, batch, regions, q_len, qk_head, dtype=dtype)
    key = torch.randn(heads, batch, regions, kv_len, qk_head, dtype=dtype)
    value = torch.randn(heads, batch, regions, kv_len, v_head, dtype=dtype)
    return query, key, value


def reference_heads(query, key, value, topk_index, scale):
    """The reference backend run on head-major tensors (converted to its region layout)."""
    return routed_attention_heads(query, key, value, topk_index, scale=scale, backend="reference")


@pytest.mark.parametrize("backend", HEAD_BACKENDS)
@pytest.mark.parametrize("qk_head, v_head", [(4, 4), (2, 6)])
def test_head_layout_backends_match_reference(backend, qk_head, v_head):
    query, key, value = random_heads(2, 2, 9, 3, 5, qk_head, v_head)
    topk_index = random_routing(2, 9, 4)
    expected = reference_heads(query, key, value, topk_index, 0.4)
    actual = routed_attention_heads(query, key, value, topk_index, scale=0.4, backend=backend)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_bytes", [1, 200, 2000, 10**9])
def test_chunked_inference_equals_whole_batch_products(monkeypatch, chunk_bytes):
    """Budgets from 'one query row at a time' to 'everything at once' give the same numbers."""
    query, key, value = random_heads(2, 3, 4, 6, 6, 4, 4)
    topk_index = random_routing(3, 4, 2)
    expected = reference_heads(query, key, value, topk_index, 0.3)
    monkeypatch.setattr(gather_backend, "CHUNK_BYTES", chunk_bytes)
    with torch.no_grad():
        actual = routed_attention_heads(query, key, value, topk_index, scale=0.3, backend="gather")
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_gather_with_gradients_takes_the_autograd_form_and_matches_reference():
    query, key, value = (t.double().requires_grad_() for t in random_heads(2, 2, 4, 3, 3, 4, 4))
    topk_index = random_routing(2, 4, 2)
    out = routed_attention_heads(query, key, value, topk_index, scale=0.5, backend="gather")
    grads = torch.autograd.grad(out.square().sum(), (query, key, value))
    inputs = [t.detach().requires_grad_() for t in (query, key, value)]
    expected = reference_heads(*inputs, topk_index, 0.5)
    expected_grads = torch.autograd.grad(expected.square().sum(), inputs)
    torch.testing.assert_close(out, expected)
    for actual, wanted in zip(grads, expected_grads):
        torch.testing.assert_close(actual, wanted)


def test_region_and_head_layouts_agree():
    query = torch.randn(2, 4, 3, 8)
    key_value = torch.randn(2, 4, 3, 16)
    topk_index = random_routing(2, 4, 2)
    expected = routed_attention(query, key_value, topk_index, num_heads=2, scale=0.3, backend="reference")
    for backend in HEAD_BACKENDS:
        actual = routed_attention(query, key_value, topk_index, num_heads=2, scale=0.3, backend=backend)
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


# --- layout helpers -----------------------------------------------------------------------------------
def test_image_to_head_regions_is_image_to_regions_per_head():
    image = torch.randn(2, 6, 4, 3 * 2 * 5)  # parts 3, heads 2, d 5
    heads = image_to_head_regions(image, 3, 2, num_heads=2, parts=3)
    assert heads.shape == (3, 2, 2, 6, 4, 5) and heads.is_contiguous()
    regions = image_to_regions(image, 3, 2)  # (N, R, L, 30)
    for part in range(3):
        for head in range(2):
            channels = slice((part * 2 + head) * 5, (part * 2 + head + 1) * 5)
            assert torch.equal(heads[part, head], regions[..., channels])


@pytest.mark.parametrize("grad", [False, True])
def test_head_regions_to_image_inverts_and_adds(grad):
    image = torch.randn(2, 6, 4, 10)
    heads = image_to_head_regions(image, 3, 2, num_heads=2)[0]  # (2, N, R, L, 5)
    assert torch.equal(head_regions_to_image(heads, 3, 2, 2, 2), image)
    base = torch.randn(2, 6, 4, 10, requires_grad=grad)
    before = base.detach().clone()
    expected = before + image
    with torch.set_grad_enabled(grad):
        total = head_regions_to_image(heads, 3, 2, 2, 2, add_to=base if grad else base.clone())
    torch.testing.assert_close(total.detach(), expected)
    if grad:
        assert torch.equal(base.detach(), before)  # not modified in place under autograd


def test_head_region_means_are_the_region_layout_means():
    image = torch.randn(2, 6, 4, 8)
    heads = image_to_head_regions(image, 3, 2, num_heads=2)[0]
    torch.testing.assert_close(head_region_means(heads), image_to_regions(image, 3, 2).mean(dim=2))
    assert torch.equal(regions_to_image(image_to_regions(image, 3, 2), 3, 2, 2, 2), image)


def test_gather_regions_picks_each_images_own_regions():
    x = torch.arange(1 * 2 * 3 * 1 * 1.0).view(1, 2, 3, 1, 1)  # (heads, N, R, L, d): value = n * 3 + r
    index = torch.tensor([[[2], [0], [1]], [[1], [1], [0]]])
    assert gather_regions(x, index).flatten().tolist() == [2.0, 0.0, 1.0, 4.0, 4.0, 3.0]


# --- deterministic gather backward ----------------------------------------------------------------------
def test_sorted_row_gather_backward_equals_index_add():
    source = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([2, 0, 2, 2, 4, 0])  # repeated rows, row 1 and 3 never picked
    grad = torch.randn(3, 6, 4, dtype=torch.float64)
    (sorted_grad,) = torch.autograd.grad(gather_rows(source, index, deterministic_backward=True), source, grad)
    expected = torch.zeros_like(source).index_add_(1, index, grad)
    assert torch.equal(sorted_grad, expected)  # exact: each row sums in index order
    assert torch.autograd.gradcheck(lambda s: SortedRowGather.apply(s, index), (source,))


def test_default_gather_path_is_bitwise_reproducible():
    query, key, value = (t.requires_grad_() for t in random_heads(2, 2, 9, 4, 4, 4, 4))
    topk_index = random_routing(2, 9, 3)

    def gradients():
        out = routed_attention_heads(query, key, value, topk_index, scale=0.5, backend="gather")
        return torch.autograd.grad(out.square().sum(), (query, key, value))

    first, second = gradients(), gradients()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# --- auto -----------------------------------------------------------------------------------------------
CPU = torch.device("cpu")


def test_auto_choices_on_cpu(without_cpu_kernels):
    inference, training = dict(device=CPU, needs_grad=False), dict(device=CPU, needs_grad=True)
    stages_224 = [(49, 1, 64), (49, 4, 16), (49, 16, 4)]  # BiFormer-T: (regions, topk, tokens per region)
    # inference: the chunked gather at stages 1-2, dense at stage 3 (as in training)
    assert [select_backend(num_regions=r, topk=k, tokens_per_region=t, **inference) for r, k, t in stages_224] == [
        "gather", "gather", "dense"
    ]
    assert [select_backend(num_regions=r, topk=k, tokens_per_region=t, **training) for r, k, t in stages_224] == [
        "gather", "gather", "dense"
    ]
    # a large map: never dense; in training SDPA, whose backward does not store the scores
    assert select_backend(num_regions=49, topk=16, tokens_per_region=400, **training) == "sdpa"
    assert select_backend(num_regions=49, topk=1, tokens_per_region=1369, **inference) == "gather"


def test_auto_choices_on_cuda_keep_training_deterministic():
    cuda = torch.device("cuda")  # a device object only: no GPU needed
    assert select_backend(num_regions=49, topk=4, tokens_per_region=16, device=cuda, needs_grad=False) == "sdpa"
    assert select_backend(num_regions=49, topk=4, tokens_per_region=16, device=cuda, needs_grad=True) == "gather"


def test_auto_is_the_reference_function_at_every_stage_shape():
    from biformer import BiLevelRoutingAttention

    for size, dim, topk in [(28, 16, 1), (14, 32, 4), (7, 64, 16)]:
        layer = BiLevelRoutingAttention(dim, num_heads=dim // 8, n_win=7, topk=topk, side_dwconv=5)
        x = torch.randn(2, size, size, dim)
        with torch.no_grad():
            out = layer(x)  # default backend: auto
        layer.backend = "reference"
        with torch.no_grad():
            torch.testing.assert_close(out, layer(x), atol=1e-5, rtol=1e-5)


# --- bad inputs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "change, message",
    [
        (dict(query=torch.randn(2, 4, 3, 4)), "query: expected a 5-D tensor"),
        (dict(key=torch.randn(2, 3, 4, 3, 4)), "key: expected batch and region sizes \\(2, 4\\)"),
        (dict(topk_index=torch.zeros(2, 4, 2, dtype=torch.int32)), "topk_index: expected an int64"),
        (dict(topk_index=torch.zeros(2, 5, 2, dtype=torch.int64)), "topk_index: expected \\(N, R\\)"),
    ],
)
def test_head_layout_bad_inputs_name_the_argument(change, message):
    query, key, value = random_heads(2, 2, 4, 3, 3, 4, 4)
    arguments = dict(query=query, key=key, value=value, topk_index=random_routing(2, 4, 2))
    arguments.update(change)
    with pytest.raises(ValueError, match=message):
        routed_attention_heads(**arguments, scale=0.5)


def test_region_layout_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="key_value: expected a 4-D tensor"):
        routed_attention(torch.randn(1, 2, 3, 4), torch.randn(2, 3, 8), torch.zeros(1, 2, 1, dtype=torch.long),
                         num_heads=1, scale=1.0)
