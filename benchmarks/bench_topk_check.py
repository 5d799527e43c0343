"""The cost of checking ``topk_index`` in the public routed-attention functions, side by side in one run.

    .venv/bin/python benchmarks/bench_topk_check.py          # about a minute on 2 cores

For the three BRA stages of biformer_tiny at 224 px (7 x 7 regions; top-1, 4, 16), batch 1 and 16, fp32
inference with the default backend on CPU: ``routed_attention_heads`` with ``check_index=True`` (the public
default: min/max and a sort of the (N, R, topk) index, one synchronisation) and with ``check_index=False`` (what
the BRA layer passes, its index coming from ``topk``). The two take turns, best of several rounds, so both
see the same machine load; on a loaded machine their difference is noise of either sign, so the check is also
timed alone (best of all repeats) and given as a share of the unchecked attention.
"""

from __future__ import annotations

import argparse
import time

import torch

from biformer.ops.checks import check_topk_index
from biformer.ops.functional import routed_attention_heads

# (stage, heads, head dim, tokens per region, topk) of biformer_tiny at 224 px, 7 x 7 regions
STAGES = ((1, 2, 32, 64, 1), (2, 4, 32, 16, 4), (3, 8, 32, 4, 16))
REGIONS = 49


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, CPU, fp32 inference, backend auto (gather)\n")
    print("| stage | batch | topk | attention with check (ms) | without (ms) | difference | check alone (ms) | "
          "check / attention |")
    print("|---|---|---|---|---|---|---|---|")
    for stage, heads, head_dim, tokens, topk in STAGES:
        for batch in (1, 16):
            generator = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(heads, batch, REGIONS, tokens, head_dim, generator=generator) for _ in range(3))
            index = torch.rand(batch, REGIONS, REGIONS, generator=generator).topk(topk, dim=-1).indices

            def run(check: bool, q=q, k=k, v=v, index=index, head_dim=head_dim) -> None:
                with torch.inference_mode():
                    routed_attention_heads(q, k, v, index, scale=head_dim**-0.5, check_index=check)

            checked, unchecked = float("inf"), float("inf")
            for _ in range(args.rounds):  # taking turns: the same load for both
                checked = min(checked, best_time(lambda run=run: run(True), args.repeats))
                unchecked = min(unchecked, best_time(lambda run=run: run(False), args.repeats))
            alone = best_time(lambda index=index: check_topk_index(index, REGIONS), args.repeats * args.rounds)
            print(f"| {stage} | {batch} | {topk} | {checked * 1e3:.3f} | {unchecked * 1e3:.3f} | "
                  f"{(checked / unchecked - 1) * 100:+.1f}% | {alone * 1e3:.4f} | {alone / unchecked * 100:.1f}% |")


if __name__ == "__main__":
    main()
