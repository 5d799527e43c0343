"""torch.compile with dynamic height and width: one compilation serves every later image size.

NATTEN-style: after the first (dynamic) compilation, ``recompile_limit=1`` with ``fail_on_recompile_limit_hit``
and ``error_on_recompile`` make any further compilation fail the test, for inference and for training steps.
Tiny models at small sizes, compiled with the ``aot_eager`` backend: the guards that decide a recompilation are
dynamo's and the same for every backend, and inductor's code generation would add minutes on CPU.
"""

from __future__ import annotations

import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import biformer

# non-square first (dynamic=True gives equal sizes one symbol), not multiples of the 2 x 2 region grid
SIZES = [(40, 56), (48, 48), (61, 37), (64, 64), (72, 80), (37, 99)]


def tiny_biformer(**kwargs) -> biformer.BiFormer:
    torch.manual_seed(0)
    return biformer.BiFormer(
        depth=[1, 1, 1, 1], embed_dim=[16, 32, 32, 32], qk_dims=[16, 32, 32, 32], head_dim=16, n_win=2,
        topks=[1, 2, -2, -2], mlp_ratios=[2, 2, 2, 2], num_classes=5, auto_pad=True, **kwargs,
    )


def no_recompiles():
    return torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True, error_on_recompile=True)


def test_inference_compiles_once_for_every_size():
    torch._dynamo.reset()
    model = tiny_biformer().eval()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, dynamic=True, backend=counter)
    with torch.no_grad():
        first = torch.randn(2, 3, *SIZES[0])
        torch.testing.assert_close(compiled(first), model(first), atol=1e-5, rtol=1e-5)
        frames = counter.frame_count  # the frames of the first (dynamic) compilation
        assert frames >= 1
        with no_recompiles():
            for batch, size in enumerate(SIZES[1:], start=2):  # batch 1 would specialise (torch's 0/1 rule)
                x = torch.randn(batch, 3, *size)
                torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
    assert counter.frame_count == frames


def test_training_steps_compile_once_for_every_size():
    torch._dynamo.reset()
    model, reference = tiny_biformer().train(), tiny_biformer().train()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, dynamic=True, backend=counter)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.01)

    def step(module, opt, x):
        loss = module(x).logsumexp(dim=-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.detach()

    step(compiled, optimizer, torch.randn(2, 3, *SIZES[0]))
    step(reference, reference_optimizer, torch.randn(2, 3, *SIZES[0]))
    frames = counter.frame_count
    assert frames >= 1
    with no_recompiles():
        for size in SIZES[1:]:
            x = torch.randn(2, 3, *size)
            torch.testing.assert_close(step(compiled, optimizer, x), step(reference, reference_optimizer, x),
                                       atol=1e-4, rtol=1e-4)
    assert counter.frame_count == frames
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, atol=1e-3, rtol=1e-3)  # six steps of float rounding
