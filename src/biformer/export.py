"""Exporting BiFormer for deployment: ONNX, ``torch.export`` programs and TorchScript traces.

By default an export fixes the image size and keeps the batch size dynamic. With ``dynamic_size=True`` the
ONNX and torch.export files take any height and width in a stated range as well (:func:`dynamic_size_range`):
BRA's padding amounts, region sizes and region grids are then computed in the graph from the input shape, and
``topk`` stays a constant. BRA layers are exported with the ``gather`` attention backend (``index_select`` on
the flattened region axis + matmul/softmax/matmul: plain operators every exporter and runtime handles),
whatever backend they use in eager mode. Each written file is checked by running it on a batch of another
size than the one it was exported with (and, with ``dynamic_size``, at other image sizes) and comparing with
the eager model; the file appears at its path only if the check passes.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .ops import available_backends
from .routing import ROUTED_LAYERS

__all__ = [
    "EXPORT_BACKEND",
    "FORMATS",
    "ExportCheckError",
    "ExportResult",
    "check_export_options",
    "export_model",
    "export_program",
    "fixed_backend",
    "dynamic_size_range",
    "format_for_path",
]

EXPORT_BACKEND = "gather"
MIN_OPSET = 17
DEFAULT_OPSET = 18
# the largest height and width a file exported with dynamic_size accepts (memory is the practical limit)
DEFAULT_MAX_SIZE = 4096
DYNAMIC_FORMATS = ("onnx", "torch-export")
# format name -> file suffix
FORMATS: dict[str, str] = {"onnx": ".onnx", "torch-export": ".pt2", "torchscript": ".pt"}
# a written file, loaded back as a function images (N, C, H, W) -> output
Runner = Callable[[torch.Tensor], torch.Tensor]


class ExportCheckError(RuntimeError):
    """The exported file does not reproduce the eager model within the tolerance."""


@dataclass
class ExportResult:
    """What :func:`export_model` wrote and how well it matched the eager model.

    ``max_abs_diff`` is the largest absolute difference between the file's and the eager model's outputs on
    ``check_batch_size`` random images (``None`` when not checked), over every size in ``checked_sizes``.
    ``image_size`` is the size the example input had; ``size_range`` is ``(smallest, largest)`` height and
    width the file takes when exported with ``dynamic_size`` (``None``: the file takes ``image_size`` only).
    """

    path: Path
    format: str
    image_size: tuple[int, int]
    export_batch_size: int
    check_batch_size: int | None
    max_abs_diff: float | None
    size_range: tuple[int, int] | None = None
    checked_sizes: tuple[tuple[int, int], ...] = ()


@contextlib.contextmanager
def fixed_backend(model: nn.Module, backend: str = EXPORT_BACKEND) -> Iterator[nn.Module]:
    """Run every BRA layer of ``model`` with attention backend ``backend`` inside the block (restored after),
    set through each layer's ``backend`` property."""
    if backend not in available_backends() or backend == "auto":
        raise ValueError(f"backend: expected one of {available_backends()[1:]}, got {backend!r}")
    layers = [module for module in model.modules() if isinstance(module, ROUTED_LAYERS)]
    previous = [layer.backend for layer in layers]
    for layer in layers:
        layer.backend = backend
    try:
        yield model
    finally:
        for layer, name in zip(layers, previous):
            layer.backend = name


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def format_for_path(path: str | os.PathLike) -> str:
    """The export format a file suffix asks for (``.onnx``, ``.pt2``, ``.pt`` / ``.ts``)."""
    suffix = Path(path).suffix.lower()
    for name, known in FORMATS.items():
        if suffix == known:
            return name
    if suffix == ".ts":
        return "torchscript"
    raise ValueError(f"output: cannot tell the format from suffix {suffix!r}; use .onnx, .pt2 or .pt, or pass a format")


def _image_size(model: nn.Module, image_size: int | tuple[int, int] | None) -> tuple[int, int]:
    if image_size is None:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        image_size = tuple(cfg.get("input_size", (3, 224, 224))[-2:])
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    minimum = getattr(model, "min_input_size", 1)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= minimum for s in size):
        raise ValueError(f"image_size: expected an int or (height, width) of ints >= {minimum}, got {image_size!r}")
    return size


def _pyramid(model: nn.Module) -> nn.Module | None:
    """The BiFormer inside ``model`` (itself, or the network a timm feature wrapper holds)."""
    for module in model.modules():
        if hasattr(module, "downsample_layers") and hasattr(module, "stages"):
            return module
    return None


def _conv_output(size: int, conv: nn.Conv2d) -> int:
    kernel, stride, padding, dilation = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0]
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _fits(network: nn.Module, size: int) -> bool:
    """Whether every routed stage of ``network`` has regions of >= 2 tokens per side and >= 2 regions per side
    (fewer would make the traced graph special-case a size of 1), and >= topk regions, for images of ``size``."""
    from .layers import BiLevelRoutingAttention, BiLevelRoutingAttentionNCHW

    for downsample, stage in zip(network.downsample_layers, network.stages):
        for conv in downsample.modules():
            if isinstance(conv, nn.Conv2d):
                size = _conv_output(size, conv)
        if size < 2:
            return False
        for layer in stage.modules():
            if isinstance(layer, BiLevelRoutingAttention) and layer.region_size is not None:
                grid = -(-size // layer.region_size)
                if grid < 2 or grid * grid < layer.topk:
                    return False
            elif isinstance(layer, (BiLevelRoutingAttention, BiLevelRoutingAttentionNCHW)):
                if -(-size // layer.n_win) < 2:
                    return False
    return True


def dynamic_size_range(model: nn.Module, max_size: int = DEFAULT_MAX_SIZE) -> tuple[int, int]:
    """``(smallest, largest)`` height and width a file exported with ``dynamic_size=True`` takes.

    The smallest size is the first one at which, in every BRA stage, regions have at least 2 tokens per side
    and the grid at least 2 regions per side (with a fixed ``region_size``: at least ``topk`` regions too);
    the largest is ``max_size``. Example: 113 px for the ``n_win=7`` BiFormers (stage 3 maps of 8 tokens,
    regions of 2), 128 px for the STL models.

    Raises:
        ValueError: ``model`` is not a BiFormer, a BRA layer needs sizes that are multiples of ``n_win``
            (``auto_pad=False``), or no size up to ``max_size`` fits.
    """
    from .layers import BiLevelRoutingAttention, BiLevelRoutingAttentionNCHW

    network = _pyramid(model)
    if network is None:
        raise ValueError(
            f"dynamic_size: expected a BiFormer (or a timm feature wrapper of one), got {type(model).__name__}"
        )
    if any(isinstance(layer, BiLevelRoutingAttentionNCHW) for layer in network.modules()):
        raise ValueError(
            "dynamic_size: biformer_stl_nchw's BRA (the authors' nchwBRA) averages regions with a pooling kernel "
            "whose size follows the image, which torch.export fixes; export it at a fixed image_size"
        )
    fixed = [layer for layer in network.modules() if isinstance(layer, BiLevelRoutingAttention)
             and layer.region_size is None and not layer.auto_pad]
    if fixed:
        raise ValueError(
            f"dynamic_size: the model's BRA layers take only multiples of n_win={fixed[0].n_win} (auto_pad=False); "
            f"build it with auto_pad=True (the named variants' default) to export any size"
        )
    smallest = next((size for size in range(2, max_size + 1) if _fits(network, size)), None)
    if smallest is None:
        raise ValueError(f"max_size: no image size up to {max_size} fits the model's region grids")
    return smallest, max_size


def _check_batch_size(batch_size: object) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size: expected an integer >= 2 (a batch of 1 cannot stay dynamic), got {batch_size!r}")


def _example(model: nn.Module, batch_size: int, image_size: tuple[int, int]) -> torch.Tensor:
    parameter = next(model.parameters())
    generator = torch.Generator().manual_seed(batch_size)
    images = torch.randn(batch_size, getattr(model, "in_chans", 3), *image_size, generator=generator)
    return images.to(device=parameter.device, dtype=parameter.dtype)


def _batch_dim() -> dict[int, torch.export.Dim]:
    return {0: torch.export.Dim("batch", min=1, max=4096)}


def _size_dims(size_range: tuple[int, int]) -> dict[int, torch.export.Dim]:
    smallest, largest = size_range
    return {
        0: torch.export.Dim("batch", min=1, max=4096),
        2: torch.export.Dim("height", min=smallest, max=largest),
        3: torch.export.Dim("width", min=smallest, max=largest),
    }


def _dynamic_example_size(size_range: tuple[int, int]) -> tuple[int, int]:
    """The traced example's H and W: well inside the range, not square, so that no stage has a region of
    1 token or an equal height and width the trace could take for a rule."""
    smallest, largest = size_range
    return min(2 * smallest + 13, largest), min(2 * smallest + 45, largest)


def _check_sizes(size_range: tuple[int, int], example: tuple[int, int]) -> list[tuple[int, int]]:
    """Sizes the written file is run at: the smallest accepted (non-square) and one larger than the example."""
    smallest, largest = size_range
    return [(smallest, min(smallest + 3, largest)), (min(example[0] + 37, largest), min(example[1] + 19, largest))]


def _trace(model: nn.Module, example: torch.Tensor, size_range: tuple[int, int] | None) -> torch.export.ExportedProgram:
    """``torch.export.export`` with a dynamic batch (and H, W within ``size_range`` when given)."""
    if size_range is None:
        return torch.export.export(model, (example,), dynamic_shapes=(_batch_dim(),))
    # Shape facts that hold for every size but that torch cannot prove symbolically (e.g. H <= the padded H)
    # become run-time assertions of the program instead of export errors.
    return torch.export.export(
        model, (example,), dynamic_shapes=(_size_dims(size_range),), prefer_deferred_runtime_asserts_over_guards=True
    )


def export_program(
    model: nn.Module,
    image_size: int | tuple[int, int] | None = None,
    batch_size: int = 2,
    backend: str = EXPORT_BACKEND,
    dynamic_size: bool = False,
    max_size: int = DEFAULT_MAX_SIZE,
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` (eval mode) for images (N, C, H, W) with a dynamic batch size N.

    Args:
        image_size: H and W (an int for square), default the model's pretrained input size; with
            ``dynamic_size`` leave it unset.
        batch_size: batch of the example input (>= 2: torch.export specialises a size-1 dimension).
        backend: attention backend used while exporting.
        dynamic_size: H and W dynamic too, within :func:`dynamic_size_range` (``max_size`` the largest).
    """
    _check_batch_size(batch_size)
    size, size_range = _sizes(model, image_size, dynamic_size, max_size)
    with _eval_mode(model), fixed_backend(model, backend), torch.enable_grad():  # see export_model
        return _trace(model, _example(model, batch_size, size), size_range)


def _sizes(
    model: nn.Module, image_size: int | tuple[int, int] | None, dynamic_size: bool, max_size: int
) -> tuple[tuple[int, int], tuple[int, int] | None]:
    """The example's H and W and, with ``dynamic_size``, the accepted range."""
    if not isinstance(dynamic_size, bool):
        raise ValueError(f"dynamic_size: expected True or False, got {dynamic_size!r}")
    if not dynamic_size:
        return _image_size(model, image_size), None
    if image_size is not None:
        raise ValueError(
            f"image_size: a file exported with dynamic_size takes every size in its range; leave image_size unset "
            f"(got {image_size!r})"
        )
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 2:
        raise ValueError(f"max_size: expected an integer >= 2, got {max_size!r}")
    size_range = dynamic_size_range(model, max_size)
    return _dynamic_example_size(size_range), size_range


def _write_onnx(
    model: nn.Module, example: torch.Tensor, path: Path, opset: int, size_range: tuple[int, int] | None = None
) -> Runner:
    try:
        import onnxruntime
        import onnxscript  # noqa: F401 - needed by torch's dynamo ONNX exporter
    except ImportError as error:
        raise ImportError(
            f"ONNX export needs onnx, onnxscript and onnxruntime: pip install 'biformer[export]' ({error})"
        ) from error
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        if size_range is None:
            program = torch.onnx.export(
                model, (example,), dynamo=True, opset_version=opset, dynamic_shapes=(_batch_dim(),),
                input_names=["images"], output_names=["output"], verbose=False,
            )
        else:  # from our own torch.export program (see _trace); its run-time assertions are not ONNX ops
            exported = _trace(model, example, size_range)
            outputs = len(exported.graph_signature.user_outputs)
            names = ["output"] if outputs == 1 else [f"stage{i + 1}" for i in range(outputs)]  # features_only
            program = torch.onnx.export(
                exported, dynamo=True, opset_version=opset, input_names=["images"], output_names=names, verbose=False,
            )
    program.save(str(path), external_data=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(images: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        outputs = [torch.from_numpy(array) for array in session.run(None, {"images": images.cpu().numpy()})]
        return outputs[0] if len(outputs) == 1 else outputs

    return run


def _write_program(
    model: nn.Module, example: torch.Tensor, path: Path, opset: int, size_range: tuple[int, int] | None = None
) -> Runner:
    program = _trace(model, example, size_range)
    torch.export.save(program, str(path))
    return torch.export.load(str(path)).module()


def _write_torchscript(
    model: nn.Module, example: torch.Tensor, path: Path, opset: int, size_range: tuple[int, int] | None = None
) -> Runner:
    with warnings.catch_warnings():
        # Shape checks become constants in the trace: right for the fixed image size, and the file is checked.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # check_trace=False: torch's own check re-traces under no_grad (see export_model); ours runs the file.
        traced = torch.jit.trace(model, example, check_trace=False)
    torch.jit.save(traced, str(path))
    return torch.jit.load(str(path))


_WRITERS = {"onnx": _write_onnx, "torch-export": _write_program, "torchscript": _write_torchscript}


def check_export_options(
    path: str | os.PathLike, format: str | None = None, batch_size: int = 2, opset: int = DEFAULT_OPSET,
    atol: float = 1e-4, dynamic_size: bool = False,
) -> tuple[Path, str]:
    """The checks of :func:`export_model` that need no model (the command runs them before building one);
    returns the output path and the format (from the suffix when ``format`` is None).

    Raises:
        ValueError: a bad argument; FileNotFoundError: the output folder does not exist.
    """
    path = Path(path)
    format = format or format_for_path(path)
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {tuple(FORMATS)}, got {format!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset: expected an integer >= {MIN_OPSET}, got {opset!r}")
    _check_batch_size(batch_size)
    if isinstance(atol, bool) or not isinstance(atol, (int, float)) or not atol >= 0:
        raise ValueError(f"atol: expected a number >= 0, got {atol!r}")
    if dynamic_size is True and format not in DYNAMIC_FORMATS:
        raise ValueError(
            f"format: dynamic_size needs one of {DYNAMIC_FORMATS}; a {format} trace fixes the image size, "
            f"got {format!r}"
        )
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output: the folder {path.parent} does not exist")
    return path, format


def export_model(
    model: nn.Module,
    path: str | os.PathLike,
    format: str | None = None,
    image_size: int | tuple[int, int] | None = None,
    batch_size: int = 2,
    opset: int = DEFAULT_OPSET,
    backend: str = EXPORT_BACKEND,
    check: bool = True,
    atol: float = 1e-4,
    dynamic_size: bool = False,
    max_size: int = DEFAULT_MAX_SIZE,
) -> ExportResult:
    """Export ``model`` to ``path`` and check the file against the eager model.

    Args:
        model: a BiFormer (or any module taking (N, C, H, W) images and returning one tensor; with
            ``dynamic_size`` a BiFormer or a timm ``features_only`` wrapper of one, whose output is then the
            list of stage maps). Exported in eval mode; its mode and backends are restored afterwards.
        path: output file; its folder must exist. Written to a temporary name and renamed once checked.
        format: ``"onnx"`` (dynamo exporter, needs ``biformer[export]``), ``"torch-export"`` (a ``.pt2``
            ``torch.export`` program) or ``"torchscript"`` (``torch.jit.trace``); default from the suffix.
        image_size: H and W (an int for square), default the model's pretrained input size. Not with
            ``dynamic_size``.
        batch_size: batch of the example input (>= 2); the batch size stays dynamic in every format.
        opset: ONNX opset (>= 17).
        backend: attention backend used while exporting (default ``gather``).
        check: run the written file on ``batch_size + 1`` images and compare with the eager model (with
            ``dynamic_size``: at the smallest accepted size and at a larger non-square one).
        atol: largest absolute difference accepted by the check.
        dynamic_size: make height and width dynamic too (ONNX and torch-export): the file takes every size in
            :func:`dynamic_size_range` (``ExportResult.size_range``).
        max_size: the largest height and width of a ``dynamic_size`` file.

    Raises:
        ValueError: a bad argument; FileNotFoundError: the output folder does not exist; ImportError: the ONNX
        packages are missing; ExportCheckError: the file does not reproduce the model (nothing is written).
    """
    path, format = check_export_options(path, format, batch_size, opset, atol, dynamic_size)
    size, size_range = _sizes(model, image_size, dynamic_size, max_size)
    check_sizes = [size] if size_range is None else _check_sizes(size_range, size)
    temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
    options = {} if size_range is None else {"size_range": size_range}
    try:
        with _eval_mode(model), fixed_backend(model, backend):
            # Traced with autograd on: the models' no-grad inference path splits batches into groups whose
            # number depends on the batch size, which a trace would record as a constant.
            with torch.enable_grad():
                run_file = _WRITERS[format](model, _example(model, batch_size, size), temporary, opset, **options)
            difference = None
            if check:
                with torch.no_grad():
                    difference = max(_difference(model, run_file, _example(model, batch_size + 1, checked))
                                     for checked in check_sizes)
        if difference is not None and not difference <= atol:
            sizes = ", ".join(f"{h}x{w}" for h, w in check_sizes)
            raise ExportCheckError(
                f"{format} export of {type(model).__name__} differs from the eager model by {difference:.3g} "
                f"(tolerance {atol:g}) on a batch of {batch_size + 1} at {sizes}; nothing was written to {path}"
            )
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return ExportResult(
        path, format, size, batch_size, batch_size + 1 if check else None, difference, size_range,
        tuple(check_sizes) if check else (),
    )


def _flat(output: object) -> list[torch.Tensor]:
    """The output tensors of a model (one tensor, or a list / tuple of stage maps) as a flat list."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [tensor for item in output for tensor in _flat(item)]
    if isinstance(output, dict):
        return [tensor for item in output.values() for tensor in _flat(item)]
    raise TypeError(f"model output: expected tensors, got {type(output).__name__}")


def _difference(model: nn.Module, run_file: Runner, images: torch.Tensor) -> float:
    """Largest absolute difference between the file's and the eager model's outputs on ``images``."""
    expected, got = _flat(model(images)), _flat(run_file(images))
    if len(expected) != len(got):
        return float("inf")
    return max((g.to(e) - e).abs().max().item() for g, e in zip(got, expected))
