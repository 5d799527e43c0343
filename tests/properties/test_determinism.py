"""Same seed, same results on CPU: model construction, forward and backward."""

from __future__ import annotations

import timm
import torch

import biformer  # noqa: F401


def _run(seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = timm.create_model("biformer_tiny", num_classes=3, drop_path_rate=0.2)
    x = torch.randn(2, 3, 64, 64)
    logits = model(x)  # training mode: drop path draws random numbers too
    logits.square().sum().backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters()]


def test_same_seed_gives_bitwise_identical_forward_and_backward():
    logits_a, grads_a = _run(3)
    logits_b, grads_b = _run(3)
    assert torch.equal(logits_a, logits_b)
    assert all(torch.equal(a, b) for a, b in zip(grads_a, grads_b))


def test_different_seed_differs():
    logits_a, _ = _run(3)
    logits_b, _ = _run(4)
    assert not torch.equal(logits_a, logits_b)
