"""The pure parts of benchmarks/bench_gpu.py (shape table, arguments, formatting) and its refusal without CUDA."""

from __future__ import annotations

import pytest
import timm
import torch

import biformer  # noqa: F401  (registers the models)


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_gpu")


def test_stage_shapes_at_224_px(bench):
    shapes = bench.stage_shapes(224)
    assert [(s.heads, s.regions, s.tokens, s.topk, s.head_dim) for s in shapes] == [
        (2, 49, 64, 1, 32), (4, 49, 16, 4, 32), (8, 49, 4, 16, 32)
    ]
    assert [s.blocks for s in shapes] == [
        {"biformer_tiny": 2, "biformer_small": 4}, {"biformer_tiny": 2, "biformer_small": 4},
        {"biformer_tiny": 8, "biformer_small": 18},
    ]
    assert shapes[0].label == "224 px stage 1: 2 heads, 49 regions of 8x8 tokens, top-1"


@pytest.mark.parametrize("size", [224, 512])
def test_stage_shapes_match_the_model(bench, size):
    """The table against what biformer_tiny's BRA layers see (forward hooks on the real model)."""
    model = timm.create_model("biformer_tiny", depth=[1, 1, 1, 1]).eval()  # the shapes do not depend on depth
    seen = []
    for stage in model.stages[:3]:
        attn = stage[0].attn
        attn.register_forward_hook(
            lambda module, inputs, output: seen.append((inputs[0].shape[1], module.num_heads, module.topk))
        )
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    expected = [(s.map_size, s.heads, s.topk) for s in bench.stage_shapes(size)]
    assert seen == expected
    padded = [s.padded_size for s in bench.stage_shapes(size)]
    assert padded == ([56, 28, 14] if size == 224 else [133, 70, 35])
    assert [s.tokens for s in bench.stage_shapes(size)] == [(p // 7) ** 2 for p in padded]


def test_arguments(bench, tmp_path):
    args = bench.parse_args([])
    assert args.backends == ["reference", "gather", "sdpa", "dense", "flex", "triton", "auto"]
    assert args.image_sizes == [224, 512] and args.dtypes == ["fp32", "bf16"]
    assert args.layer_batches == [1, 128] and args.model_batches == [1, 64]
    quick = bench.parse_args(["--quick", "--no-compile", "--output", str(tmp_path / "r.md")])
    assert (quick.rounds, quick.repeats, quick.layer_batches) == (1, 5, [1, 64])
    assert "flex" not in quick.backends and quick.output == tmp_path / "r.md"


@pytest.mark.parametrize("argv", [["--rounds", "0"], ["--layer-batches", "0"], ["--backends", "fast"]])
def test_bad_arguments_exit_with_usage_error(bench, argv, capsys):
    with pytest.raises(SystemExit) as raised:
        bench.parse_args(argv)
    assert raised.value.code == 2
    assert "bench_gpu.py: error:" in capsys.readouterr().err


def test_cells_and_tables(bench):
    assert bench.cell(2.0, 8.0) == "2 (4x)"
    assert bench.cell("OOM", 8.0) == "OOM"
    assert bench.cell(250.0, "OOM") == "250"
    assert bench.markdown_table(["a", "b"], [["1", "2"]]) == "| a | b |\n|---|---|\n| 1 | 2 |"


def test_refuses_without_cuda_in_one_line(bench, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--output", str(tmp_path / "r.md")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("bench_gpu.py: error: needs a CUDA GPU")
    assert not (tmp_path / "r.md").exists()
