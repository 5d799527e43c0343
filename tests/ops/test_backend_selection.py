"""Which backend ``auto`` picks, pinned on a table of cases (the choices of the measured rule, see docs/bra.md)."""

from __future__ import annotations

import pytest
import torch

from biformer.ops import select_backend

CPU, CUDA, META = torch.device("cpu"), torch.device("cuda"), torch.device("meta")  # device objects: no GPU needed

# (device, needs_grad, num_regions, topk, tokens_per_region) -> backend
CASES = [
    # BiFormer-T at 224 px: stages 1-3, inference then training (CPU)
    (CPU, False, 49, 1, 64, "gather"),
    (CPU, False, 49, 4, 16, "gather"),
    (CPU, False, 49, 16, 4, "gather"),
    (CPU, True, 49, 1, 64, "gather"),
    (CPU, True, 49, 4, 16, "gather"),
    (CPU, True, 49, 16, 4, "dense"),
    # large maps: never dense; in training sdpa above 2**20 scores per region
    (CPU, True, 49, 16, 400, "sdpa"),
    (CPU, False, 49, 1, 1369, "gather"),
    (CPU, True, 1, 1, 1024, "dense"),  # exactly 2**20 scores is not above the limit
    (CPU, True, 4, 1, 1025, "sdpa"),
    # the dense limits: at most 1024 tokens per image, at least a quarter of the regions routed
    (CPU, True, 16, 4, 64, "dense"),  # 1024 tokens, 4 of 16 routed
    (CPU, True, 16, 4, 65, "gather"),  # 1040 tokens
    (CPU, True, 16, 3, 64, "gather"),  # 3 of 16 < a quarter
    (CPU, True, 64, 16, 16, "dense"),  # 1024 tokens, a quarter
    (CPU, True, 64, 15, 16, "gather"),
    (CPU, True, 4, 1, 4, "dense"),
    (CPU, True, 1, 1, 1, "dense"),
    # CUDA: sdpa for inference, gather for training, whatever the sizes
    (CUDA, False, 49, 4, 16, "sdpa"),
    (CUDA, True, 49, 4, 16, "gather"),
    (CUDA, True, 49, 16, 4, "gather"),
    (CUDA, True, 49, 16, 400, "gather"),
    (CUDA, False, 49, 16, 400, "sdpa"),
    # other devices follow the CPU rule
    (META, False, 49, 16, 4, "gather"),
    (META, True, 49, 16, 4, "dense"),
    (META, True, 49, 16, 400, "sdpa"),
]


@pytest.mark.parametrize(("device", "needs_grad", "regions", "topk", "tokens", "expected"), CASES)
def test_auto_choice_is_pinned(device, needs_grad, regions, topk, tokens, expected):
    chosen = select_backend(
        num_regions=regions, topk=topk, tokens_per_region=tokens, device=device, needs_grad=needs_grad
    )
    assert chosen == expected
