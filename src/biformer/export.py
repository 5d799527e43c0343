"""Exporting BiFormer for deployment: ONNX, ``torch.export`` programs and TorchScript traces.

Every export fixes the image size (BRA's padding and region layout depend on it) and keeps the batch size
dynamic. BRA layers are exported with the ``gather`` attention backend (``index_select`` on the flattened
region axis + matmul/softmax/matmul: plain operators every exporter and runtime handles), whatever backend
they use in eager mode. Each written file is checked by running it on a batch of another size than the one
it was exported with and comparing with the eager model; the file appears at its path only if the check
passes.
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
    "format_for_path",
]

EXPORT_BACKEND = "gather"
MIN_OPSET = 17
DEFAULT_OPSET = 18
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
    ``check_batch_size`` random images (``None`` when not checked).
    """

    path: Path
    format: str
    image_size: tuple[int, int]
    export_batch_size: int
    check_batch_size: int | None
    max_abs_diff: float | None


@contextlib.contextmanager
def fixed_backend(model: nn.Module, backend: str = EXPORT_BACKEND) -> Iterator[nn.Module]:
    """Run every BRA layer of ``model`` with attention backend ``backend`` inside the block (restored after)."""
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


def export_program(
    model: nn.Module,
    image_size: int | tuple[int, int] | None = None,
    batch_size: int = 2,
    backend: str = EXPORT_BACKEND,
) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` (eval mode) for images (N, C, H, W) with a dynamic batch size N.

    Args:
        image_size: H and W (an int for square), default the model's pretrained input size.
        batch_size: batch of the example input (>= 2: torch.export specialises a size-1 dimension).
        backend: attention backend used while exporting.
    """
    size = _image_size(model, image_size)
    _check_batch_size(batch_size)
    with _eval_mode(model), fixed_backend(model, backend), torch.enable_grad():  # see export_model
        return torch.export.export(model, (_example(model, batch_size, size),), dynamic_shapes=(_batch_dim(),))


def _write_onnx(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> Runner:
    try:
        import onnxruntime
        import onnxscript  # noqa: F401 - needed by torch's dynamo ONNX exporter
    except ImportError as error:
        raise ImportError(
            f"ONNX export needs onnx, onnxscript and onnxruntime: pip install 'biformer[export]' ({error})"
        ) from error
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        program = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=opset, dynamic_shapes=(_batch_dim(),),
            input_names=["images"], output_names=["output"], verbose=False,
        )
    program.save(str(path), external_data=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: torch.from_numpy(session.run(None, {"images": images.cpu().numpy()})[0])


def _write_program(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> Runner:
    program = torch.export.export(model, (example,), dynamic_shapes=(_batch_dim(),))
    torch.export.save(program, str(path))
    return torch.export.load(str(path)).module()


def _write_torchscript(model: nn.Module, example: torch.Tensor, path: Path, opset: int) -> Runner:
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
    atol: float = 1e-4,
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
) -> ExportResult:
    """Export ``model`` to ``path`` and check the file against the eager model.

    Args:
        model: a BiFormer (or any module taking (N, C, H, W) images and returning one tensor). Exported in eval
            mode; its mode and backends are restored afterwards.
        path: output file; its folder must exist. Written to a temporary name and renamed once checked.
        format: ``"onnx"`` (dynamo exporter, needs ``biformer[export]``), ``"torch-export"`` (a ``.pt2``
            ``torch.export`` program) or ``"torchscript"`` (``torch.jit.trace``); default from the suffix.
        image_size: H and W (an int for square), default the model's pretrained input size.
        batch_size: batch of the example input (>= 2); the batch size stays dynamic in every format.
        opset: ONNX opset (>= 17).
        backend: attention backend used while exporting (default ``gather``).
        check: run the written file on ``batch_size + 1`` images and compare with the eager model.
        atol: largest absolute difference accepted by the check.

    Raises:
        ValueError: a bad argument; FileNotFoundError: the output folder does not exist; ImportError: the ONNX
        packages are missing; ExportCheckError: the file does not reproduce the model (nothing is written).
    """
    path, format = check_export_options(path, format, batch_size, opset, atol)
    size = _image_size(model, image_size)
    temporary = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        with _eval_mode(model), fixed_backend(model, backend):
            # Traced with autograd on: the models' no-grad inference path splits batches into groups whose
            # number depends on the batch size, which a trace would record as a constant.
            with torch.enable_grad():
                run_file = _WRITERS[format](model, _example(model, batch_size, size), temporary, opset)
            difference = None
            if check:
                with torch.no_grad():
                    images = _example(model, batch_size + 1, size)
                    expected = model(images)
                    difference = (run_file(images).to(expected) - expected).abs().max().item()
        if difference is not None and not difference <= atol:
            raise ExportCheckError(
                f"{format} export of {type(model).__name__} differs from the eager model by {difference:.3g} "
                f"(tolerance {atol:g}) on a batch of {batch_size + 1}; nothing was written to {path}"
            )
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return ExportResult(path, format, size, batch_size, batch_size + 1 if check else None, difference)
