"""The pure parts of benchmarks/bench_vs_swin.py: the --rows selection and the machine line."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_vs_swin")


def test_rows_default_to_every_row_in_table_order(bench):
    assert bench.parse_rows(None) == list(bench.ROWS)
    assert bench.parse_rows("train8, infer1") == ["infer1", "train8"]  # the table's order, not the argument's
    assert bench.parse_rows("infer8-bf16,infer8-bf16") == ["infer8-bf16"]


@pytest.mark.parametrize("text", ["nope", "infer1,train", "", " , "])
def test_unknown_or_empty_rows_are_one_line(bench, text):
    with pytest.raises(SystemExit, match=r"--rows: expected a comma-separated list of infer1, infer8, .* got"):
        bench.parse_rows(text)


def test_cpu_name_says_whether_bf16_matrix_units_exist(bench):
    line = bench.cpu_name()
    assert line.startswith("CPU: ")
    if Path("/proc/cpuinfo").exists():
        assert ("AMX" in line) and ("avx512_bf16" in line)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("fpu avx2 avx512f avx512_bf16 amx_bf16", "(AMX, avx512_bf16)"),
        ("fpu avx2 avx512f", "(no AMX, no avx512_bf16)"),
        ("fpu avx2 fma", "(no AMX, no avx512_bf16, no avx512: AVX2 at most)"),
        ("fpu sse2", "(no AMX, no avx512_bf16, no AVX2)"),
    ],
)
def test_cpu_name_from_a_written_cpuinfo(bench, monkeypatch, tmp_path, flags, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: {flags}\n")
    real_open = open
    monkeypatch.setattr(bench, "open", lambda path, *a, **k: real_open(cpuinfo, *a, **k), raising=False)
    assert bench.cpu_name() == f"CPU: Some CPU {expected}"


@pytest.mark.parametrize("kernels", ["without_cpu_kernels", "with_cpu_kernels"])
def test_layer_table_has_a_row_per_stage_mode_and_dtype_with_autos_choice_marked(bench, monkeypatch, capsys, request,
                                                                                 kernels):
    # The timings are stubbed (the table's shape and its `*` are what is checked): every rule `auto` applies at
    # the stage shapes, bf16 training included, has its row, with and without the fused CPU kernels.
    request.getfixturevalue(kernels)
    monkeypatch.setattr(bench, "layer_call", lambda *args: (lambda: None))
    monkeypatch.setattr(bench, "interleaved_median",
                        lambda calls, rounds: {name: 0.001 * (i + 1) for i, name in enumerate(calls)})
    bench.section_layers(rounds=1)
    rows = [line for line in capsys.readouterr().out.splitlines() if line[:3] in ("| 1", "| 2", "| 3")]
    modes = ("inference fp32", "inference bf16", "training fp32", "training bf16")
    assert [row.split(" | ")[1] for row in rows] == list(modes) * 3
    for row in rows:
        cells = row.strip("| ").split(" | ")[2:]
        marked = [backend for backend, cell in zip(bench.BACKENDS, cells, strict=True) if cell.endswith("*")]
        if kernels == "with_cpu_kernels":
            expected = "cpu_fused"
        else:
            expected = "dense" if row.startswith("| 3 ") else "gather"
        assert marked == [expected], row


def test_depthwise_table_marks_the_form_training_takes(bench, monkeypatch, capsys):
    # Stubbed timings: the table's rows and its `*` (the form the library's training rule takes) are checked against
    # the rule itself (biformer.ops.depthwise).
    import torch

    from biformer.layers.depthwise import DepthwiseConv2d
    from biformer.ops.cpu_kernels import kernels_available
    from biformer.ops.depthwise import depthwise_nhwc

    monkeypatch.setattr(bench, "interleaved_median",
                        lambda calls, rounds: {name: 0.001 * (i + 1) for i, name in enumerate(calls)})
    bench.section_depthwise(rounds=1)
    maps = ("| 56x", "| 28x", "| 14x", "| 7x")
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(maps)]
    assert len(rows) == 16
    for row in rows:
        cells = row.strip("| ").split(" | ")
        kernel, bf16 = int(cells[1][0]), cells[2] == "bf16 autocast"
        marked = [name for name, cell in zip(("plain", "ours", "fused"), cells[3:], strict=True) if cell.endswith("*")]
        conv = DepthwiseConv2d(16, kernel)
        x = torch.randn(1, 6, 6, 16, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            takes_fused = "FusedDepthwiseConv" in type(depthwise_nhwc(x, conv).grad_fn).__name__
        expected = "fused" if takes_fused else "ours" if kernel >= 5 else "plain"
        assert marked == [expected], row
        assert takes_fused == (kernels_available() and kernel >= 5 and not bf16)
