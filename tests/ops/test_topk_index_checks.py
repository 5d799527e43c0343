"""The public routed-attention functions check ``topk_index``: range, distinct, at least one region."""

from __future__ import annotations

import pytest
import torch

from biformer.ops import available_backends, routed_attention
from biformer.ops.functional import routed_attention_heads

BACKENDS = available_backends()


def inputs(batch=2, regions=4, length=3, channels=8, topk=2):
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(batch, regions, length, channels, generator=generator)
    key_value = torch.randn(batch, regions, length, 2 * channels, generator=generator)
    index = torch.stack([torch.randperm(regions, generator=generator)[:topk] for _ in range(batch * regions)])
    return query, key_value, index.view(batch, regions, topk)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad, message", [
    (lambda index: index.index_put_((torch.tensor(0), torch.tensor(1), torch.tensor(0)), torch.tensor(4)),
     r"expected region indices in \[0, 4\), got values from 0 to 4"),
    (lambda index: index.index_put_((torch.tensor(1), torch.tensor(2), torch.tensor(1)), torch.tensor(-1)),
     r"got values from -1"),
    (lambda index: index.index_put_((torch.tensor(1), torch.tensor(0), torch.tensor(1)), index[1, 0, 0].clone()),
     "routes to the same region twice"),
    (lambda index: index[..., :0], "expected 1 to 4 routed regions per query region, got topk=0"),
    (lambda index: torch.cat([index, index, index], dim=-1), "got topk=6"),
])
def test_bad_topk_index_is_refused_by_every_backend(backend, bad, message):
    query, key_value, index = inputs()
    with pytest.raises(ValueError, match=message):
        routed_attention(query, key_value, bad(index.clone()), num_heads=2, scale=0.5, backend=backend)
    heads = query.view(2, 4, 3, 2, 4).permute(3, 0, 1, 2, 4).contiguous()
    values = key_value[..., 8:].reshape(2, 4, 3, 2, 4).permute(3, 0, 1, 2, 4).contiguous()
    with pytest.raises(ValueError, match=message):
        routed_attention_heads(heads, heads, values, bad(index.clone()), scale=0.5, backend=backend)
