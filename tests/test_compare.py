"""The comparison's pieces: FLOP counting against hand formulas, the memory guard, summaries, idx subsets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from biformer.comparison import CompareOptions, ComparisonError, check_options
from biformer.comparison.accuracy import TrainingResult, fashion_mnist_subset
from biformer.comparison.cost import count_flops, measure_cost
from biformer.comparison.report import accuracy_summary
from biformer.train.data import read_idx
from train.synthetic import make_fashion_mnist


class LinearThenAttention(nn.Module):
    """x (N, L, 16) -> Linear to 48 -> q, k, v of 2 heads of 8 -> attention (the CPU SDPA kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(16, 48)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, 2, 8).permute(2, 0, 3, 1, 4)  # 3 x (N, 2, L, 8)
        return F.scaled_dot_product_attention(q, k, v)


def test_flops_follow_the_textbook_formulas():
    batch, length = 3, 20
    total, by_op = count_flops(LinearThenAttention(), torch.rand(batch, length, 16))
    linear = 2 * batch * length * 16 * 48  # one multiply-add per weight per token
    attention = 2 * (2 * batch * 2 * length * length * 8)  # q @ k^T and scores @ v, 2 heads of 8 channels
    assert by_op == {"aten.addmm": linear, "aten._scaled_dot_product_flash_attention_for_cpu": attention}
    assert total == linear + attention


def test_a_point_over_the_memory_limit_is_skipped_with_the_reason():
    # global attention at 512 px: stage 1 alone has 128 x 128 tokens; about 1 MiB of extra memory cannot hold it
    points = measure_cost(["global"], [512], "biformer_nano", memory_limit_gib=0.001, log=lambda text: None)
    assert len(points) == 1
    point = points[0]
    assert point.skipped == "needs more than 0.001 GiB of extra memory"
    assert point.gflops is None and point.images_per_s is None and point.peak_extra_mib is None
    assert point.params > 0


def _result(task: str, attn_type: str, seed: int, value: float) -> TrainingResult:
    return TrainingResult(task=task, attn_type=attn_type, seed=seed, metric="top1", value=value, steps=10, params=5,
                          seconds=2.0 + seed)


def test_summary_is_the_mean_and_sample_std_over_seeds():
    results = [_result("classification", "bra", 0, 80.0), _result("classification", "global", 0, 70.0),
               _result("classification", "bra", 1, 84.0), _result("classification", "global", 1, 71.0),
               _result("classification", "bra", 2, 83.0)]
    summary = accuracy_summary(results)
    assert [(row["task"], row["attn_type"]) for row in summary] == [("classification", "bra"),
                                                                   ("classification", "global")]
    bra = summary[0]
    assert bra["values"] == [80.0, 84.0, 83.0] and bra["seeds"] == [0, 1, 2]
    assert bra["mean"] == pytest.approx(np.mean([80.0, 84.0, 83.0]))
    assert bra["std"] == pytest.approx(np.std([80.0, 84.0, 83.0], ddof=1))
    assert bra["seconds"] == pytest.approx(3.0)
    single = accuracy_summary([_result("segmentation", "axial", 0, 0.5)])[0]
    assert single["std"] == 0.0 and single["mean"] == 0.5


def test_fashion_mnist_subset_holds_the_first_images_and_the_whole_test_split(tmp_path):
    source = make_fashion_mnist(tmp_path / "source", train=30, test=12)
    subset = fashion_mnist_subset(tmp_path / "subset", 20, source)
    assert np.array_equal(read_idx(subset / "train-images-idx3-ubyte"),
                          read_idx(source / "train-images-idx3-ubyte.gz")[:20])
    assert np.array_equal(read_idx(subset / "train-labels-idx1-ubyte"),
                          read_idx(source / "train-labels-idx1-ubyte.gz")[:20])
    assert np.array_equal(read_idx(subset / "t10k-images-idx3-ubyte.gz"),
                          read_idx(source / "t10k-images-idx3-ubyte.gz"))
    from biformer.train.data import DataError

    with pytest.raises(DataError, match="--train-samples: .* has 30 training images, asked for 31"):
        fashion_mnist_subset(tmp_path / "too-many", 31, source)


def test_options_are_checked_before_anything_runs(tmp_path):
    check_options(CompareOptions(output=str(tmp_path / "ok")))
    with pytest.raises(ComparisonError, match="--train-batch-size: expected an integer >= 1, got 0"):
        check_options(CompareOptions(output=str(tmp_path / "a"), train_batch_size=0))
    with pytest.raises(ComparisonError, match="--attn-types: expected at least one value, got none"):
        check_options(CompareOptions(output=str(tmp_path / "b"), attn_types=[]))
    with pytest.raises(ComparisonError, match="--memory-limit-gib: expected a positive number, got -1"):
        check_options(CompareOptions(output=str(tmp_path / "c"), memory_limit_gib=-1))
