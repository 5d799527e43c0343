"""Export: ONNX (checked with onnxruntime on CPU), torch.export, TorchScript; dynamic batch; bad inputs."""

from __future__ import annotations

import onnx
import onnxruntime
import pytest
import timm
import torch

import biformer
from biformer.export import ExportCheckError, export_model, export_program, fixed_backend, format_for_path
from conftest import fixture_state_dict, load_fixture

MICRO = dict(depth=[1, 1, 2, 1], embed_dim=[32, 64, 96, 128], qk_dims=[32, 64, 96, 128], num_classes=10)
SIZE = 64  # pads every stage's map to the 7 x 7 region grid: the export must carry the padding too
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def model():
    """The authors' micro fixture weights (realistic magnitudes: logits of a few units)."""
    model = timm.create_model("biformer_tiny", **MICRO)
    model.load_state_dict(fixture_state_dict(load_fixture("biformer_micro")[0]), strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def onnx_file(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx") / "micro.onnx"
    return export_model(model, path, image_size=SIZE, batch_size=2)


def images(batch):
    return torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))


def test_onnx_matches_eager_with_any_batch(model, onnx_file):
    assert onnx_file.format == "onnx" and onnx_file.check_batch_size == 3
    assert onnx_file.max_abs_diff <= 1e-4
    session = onnxruntime.InferenceSession(str(onnx_file.path), providers=["CPUExecutionProvider"])
    for batch in (1, 5):  # neither is the export batch (2)
        x = images(batch)
        (logits,) = session.run(None, {"images": x.numpy()})
        with torch.no_grad():
            expected = model(x)
        assert expected.abs().max() > 0.5  # a meaningful scale for the tolerance
        torch.testing.assert_close(torch.from_numpy(logits), expected, atol=1e-4, rtol=0)


def test_onnx_file_has_opset_and_dynamic_batch(onnx_file):
    graph_model = onnx.load(str(onnx_file.path))
    onnx.checker.check_model(graph_model)
    assert max(entry.version for entry in graph_model.opset_import if entry.domain in ("", "ai.onnx")) >= 17
    batch_dim = graph_model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")
    assert [d.dim_value for d in graph_model.graph.input[0].type.tensor_type.shape.dim[1:]] == [3, SIZE, SIZE]


def test_missing_onnx_packages(model, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install 'biformer\[export\]'"):
        export_model(model, tmp_path / "m.onnx", image_size=SIZE)
    assert list(tmp_path.iterdir()) == []


def test_program_bad_batch(model):
    with pytest.raises(ValueError, match="batch_size"):
        export_program(model, image_size=SIZE, batch_size=1)


# 256 px for the trace: with big maps the models' no-grad inference path runs batches in groups, whose count
# depends on the batch size; called under no_grad, the export must still keep the batch size dynamic.
@pytest.mark.parametrize("suffix, fmt, size", [(".pt2", "torch-export", SIZE), (".pt", "torchscript", 256)])
def test_files_reload_and_match(model, tmp_path, suffix, fmt, size):
    with torch.no_grad():
        result = export_model(model, tmp_path / f"micro{suffix}", image_size=size, batch_size=4)
    assert result.format == fmt and result.max_abs_diff <= 1e-5
    if fmt == "torch-export":
        program = torch.export.load(result.path)
        ops = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
        assert any("topk" in op for op in ops) and any("index_select" in op for op in ops)  # the gather backend
        loaded = program.module()
    else:
        loaded = torch.jit.load(result.path)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"micro{suffix}"]  # no temporary left behind


def fake_writer(offset=0.0, seen=None):
    """Stands in for a format writer: writes a file, returns the eager model (+ offset) as the file's runner."""

    def write(model, example, path, opset):
        if seen is not None:
            seen.append((model.training, {m.backend for m in model.modules()
                                          if isinstance(m, biformer.BiLevelRoutingAttention)}))
        path.write_bytes(b"exported")
        return lambda x: model(x) + offset

    return write


def test_exports_in_eval_mode_with_the_gather_backend_then_restores(model, tmp_path, monkeypatch):
    from biformer import export as export_module

    seen = []
    monkeypatch.setitem(export_module._WRITERS, "torchscript", fake_writer(seen=seen))
    layers = [m for m in model.modules() if isinstance(m, biformer.BiLevelRoutingAttention)]
    layers[0].backend = "sdpa"
    model.train()
    try:
        with fixed_backend(model, "reference"):
            assert {layer.backend for layer in layers} == {"reference"}
        assert [layer.backend for layer in layers] == ["sdpa"] + [None] * (len(layers) - 1)
        export_model(model, tmp_path / "m.pt", image_size=SIZE)
        assert seen == [(False, {"gather"})]
        assert model.training and [layer.backend for layer in layers] == ["sdpa"] + [None] * (len(layers) - 1)
    finally:
        layers[0].backend = None
        model.eval()


def test_failed_check_writes_nothing(model, tmp_path, monkeypatch):
    """A file that does not reproduce the model never reaches its path; an older file there is kept."""
    from biformer import export as export_module

    monkeypatch.setitem(export_module._WRITERS, "torchscript", fake_writer(offset=1e-3))
    target = tmp_path / "model.pt"
    target.write_bytes(b"previous export")
    with pytest.raises(ExportCheckError, match="differs from the eager model by 0.001"):
        export_model(model, target, image_size=SIZE)
    assert target.read_bytes() == b"previous export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(path="m.onnx", opset=16), ValueError, "opset: expected an integer >= 17"),
        (dict(path="m.onnx", batch_size=1), ValueError, "batch_size: expected an integer >= 2"),
        (dict(path="m.pt", image_size=0), ValueError, "image_size"),
        (dict(path="m.pt", image_size=(64,)), ValueError, "image_size"),
        (dict(path="m.bin"), ValueError, "cannot tell the format from suffix '.bin'"),
        (dict(path="m.pt", format="tflite"), ValueError, "format: expected one of"),
        (dict(path="m.pt", backend="auto"), ValueError, "backend: expected one of"),
        (dict(path="m.pt", atol=-1.0), ValueError, "atol: expected a number >= 0"),
        (dict(path="missing/m.pt"), FileNotFoundError, "does not exist"),
    ],
)
def test_bad_inputs(model, tmp_path, kwargs, error, match):
    kwargs = dict(kwargs, path=tmp_path / kwargs["path"])
    with pytest.raises(error, match=match):
        export_model(model, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_format_for_path():
    assert [format_for_path(p) for p in ("a.onnx", "a.PT2", "a.pt", "a.ts")] == [
        "onnx", "torch-export", "torchscript", "torchscript"]


# --- dynamic height and width ----------------------------------------------------------------------------
# Sizes none of the files was traced at (the example is chosen by export_model, checked below): square and not,
# not multiples of the region grid, the smallest accepted size and a larger one.
DYNAMIC_SIZES = [(113, 113), (160, 160), (224, 224), (150, 203), (301, 257), (416, 320)]


def dynamic_images(size, batch=2):
    return torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(sum(size)))


@pytest.fixture(scope="module")
def dynamic_files(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dynamic")
    return {fmt: export_model(model, folder / f"micro{suffix}", dynamic_size=True)
            for fmt, suffix in (("onnx", ".onnx"), ("torch-export", ".pt2"))}


def test_dynamic_size_range_follows_the_region_grid(model):
    from biformer.export import dynamic_size_range

    # n_win 7: stage 3 (stride 16) needs maps of 8 tokens (regions of 2) -> 113 px
    assert dynamic_size_range(model) == (113, 4096)
    fixed = timm.create_model("biformer_tiny", **MICRO, region_sizes=[8, 4, 2, None])
    # region_size 2 in stage 3 with topk 16: a grid of 4 x 4 regions, maps of 7 tokens -> 97 px
    assert dynamic_size_range(fixed, max_size=1024) == (97, 1024)


def test_dynamic_files_match_eager_at_sizes_not_exported(model, dynamic_files):
    onnx_result, program_result = dynamic_files["onnx"], dynamic_files["torch-export"]
    for result in (onnx_result, program_result):
        assert result.size_range == (113, 4096) and result.max_abs_diff <= 1e-4
        assert result.image_size not in DYNAMIC_SIZES and len(result.checked_sizes) == 2
    graph = onnx.load(str(onnx_result.path)).graph
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param != "" for d in dims] == [True, False, True, True]  # batch, 3, height, width
    session = onnxruntime.InferenceSession(str(onnx_result.path), providers=["CPUExecutionProvider"])
    program = torch.export.load(program_result.path).module()
    for size in DYNAMIC_SIZES:
        x = dynamic_images(size, batch=1 + size[0] % 3)
        with torch.no_grad():
            expected = model(x)
            from_program = program(x)
        assert expected.abs().max() > 0.5
        (from_onnx,) = session.run(None, {"images": x.numpy()})
        torch.testing.assert_close(torch.from_numpy(from_onnx), expected, atol=1e-4, rtol=0, msg=f"onnx at {size}")
        torch.testing.assert_close(from_program, expected, atol=1e-4, rtol=0, msg=f"pt2 at {size}")


def test_dynamic_files_outside_the_range(model, dynamic_files):
    """Below the range the .pt2 refuses the input with a message naming the bound; the ONNX graph has no such
    check and still computes the model (it has no size-specific branch), as checked here."""
    program = torch.export.load(dynamic_files["torch-export"].path).module()
    x = dynamic_images((64, 96))
    with pytest.raises(Exception, match=r"size\(\)\[2\] >= 113"):
        program(x)
    session = onnxruntime.InferenceSession(str(dynamic_files["onnx"].path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), expected,
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(path="m.pt", dynamic_size=True), ValueError, "format: dynamic_size needs one of"),
        (dict(path="m.pt2", dynamic_size=True, image_size=224), ValueError, "image_size: a file exported with "
                                                                            "dynamic_size takes every size"),
        (dict(path="m.pt2", dynamic_size=True, max_size=64), ValueError, "max_size: no image size up to 64"),
        (dict(path="m.pt2", dynamic_size="yes"), ValueError, "dynamic_size: expected True or False"),
    ],
)
def test_dynamic_bad_inputs(model, tmp_path, kwargs, error, match):
    kwargs = dict(kwargs, path=tmp_path / kwargs["path"])
    with pytest.raises(error, match=match):
        export_model(model, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_dynamic_size_needs_auto_pad_and_refuses_stl_nchw(tmp_path):
    unpadded = timm.create_model("biformer_tiny", **MICRO, auto_pad=False)
    with pytest.raises(ValueError, match="auto_pad=False"):
        export_model(unpadded, tmp_path / "m.pt2", dynamic_size=True)
    nchw = timm.create_model("biformer_stl_nchw", depth=[1, 1, 1, 1], embed_dim=[32, 64, 96, 128], num_classes=10)
    with pytest.raises(ValueError, match="biformer_stl_nchw's BRA"):
        export_model(nchw, tmp_path / "m.pt2", dynamic_size=True)
    assert list(tmp_path.iterdir()) == []


def check_dynamic_export(model, tmp_path, sizes, formats=("onnx", "torch-export")):
    """Export ``model`` with dynamic H and W, run each file at ``sizes`` and compare with eager (1e-4)."""
    model = model.eval()
    for fmt in formats:
        result = export_model(model, tmp_path / ("m.onnx" if fmt == "onnx" else "m.pt2"), dynamic_size=True)
        if fmt == "onnx":
            session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])

            def run(x, session=session):
                return [torch.from_numpy(a) for a in session.run(None, {"images": x.numpy()})]
        else:
            program = torch.export.load(result.path).module()

            def run(x, program=program):
                out = program(x)
                return list(out) if isinstance(out, (list, tuple)) else [out]
        for size in sizes:
            x = dynamic_images(size)
            with torch.no_grad():
                expected = model(x)
                expected = list(expected) if isinstance(expected, (list, tuple)) else [expected]
                got = run(x)
            assert len(got) == len(expected)
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, atol=1e-4, rtol=0, msg=f"{fmt} at {size}")


@pytest.mark.slow
def test_dynamic_region_size_policy(model, tmp_path):
    """Regions of a fixed size (the grid follows the image): the grid is symbolic, topk a constant."""
    fixed = timm.create_model("biformer_tiny", **MICRO, region_sizes=[8, 4, 2, None])
    fixed.load_state_dict(model.state_dict())
    check_dynamic_export(fixed, tmp_path, [(97, 97), (160, 160), (256, 320), (301, 419), (512, 512), (800, 608)])


@pytest.mark.slow
def test_dynamic_features_only_backbone(model, tmp_path):
    """The four stage maps (strides 4-32) of the features_only backbone, for detection and segmentation."""
    backbone = timm.create_model("biformer_tiny", **MICRO, features_only=True)
    backbone.load_state_dict(model.state_dict(), strict=False)
    check_dynamic_export(backbone, tmp_path, [(113, 120), (160, 160), (256, 320), (301, 419), (512, 512),
                                              (800, 608)])


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in timm.list_models("biformer*") if n != "biformer_stl_nchw"])
def test_dynamic_every_registered_model(name, tmp_path):
    """Every registered model (random weights) at the full list of sizes (biformer_stl_nchw: fixed sizes only)."""
    model = timm.create_model(name)
    check_dynamic_export(model, tmp_path, [(160, 160), (224, 224), (256, 320), (301, 419), (512, 512), (800, 608)])


def test_legacy_exporter_at_a_fixed_size_with_the_gather_backend(model, tmp_path):
    """The TorchScript-based exporter (dynamo=False) is not the supported one, but works at a fixed size once
    BRA runs the gather backend (the dense backend's in-place scatter_ stops it)."""
    import warnings

    path = tmp_path / "legacy.onnx"
    x = images(2)
    with warnings.catch_warnings(), fixed_backend(model, "gather"), torch.enable_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=18, input_names=["images"],
                          output_names=["output"], dynamic_axes={"images": {0: "batch"}})
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = images(3)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), model(x),
                                   atol=1e-4, rtol=0)
