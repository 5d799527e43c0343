"""Shared test helpers. Ground truth made by running the authors' code lives in tests/reference (see its README).

The suite is hermetic: :func:`pytest_configure` points the dataset search path (``$BIFORMER_DATA_PATH``), torch's
and Hugging Face's caches and matplotlib's configuration at empty temporary folders for the whole session, and an
audit hook makes opening a file under the machine's dataset folders (``/usr/share/datasets``,
``~/.cache/biformer``) or a weights cache, or connecting to another host, fail the test that tries. Tests that
need Fashion-MNIST pixels use the session's lookalike (:func:`fashion_mnist_dir`, or
:func:`fashion_mnist_on_search_path` for the commands' default lookup); tests of the lookup build their own trees.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import random
import shutil
import socket
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

REFERENCE = Path(__file__).resolve().parent / "reference"
DATA_PATH_ENV = "BIFORMER_DATA_PATH"  # biformer.train.data.DATA_PATH_ENV, spelled out: the tests pin the name
# the session's temporary folders (pytest_configure), the environment variables pointed at them
_SESSION: dict[str, Path] = {}
_REDIRECTED = {"TORCH_HOME": "torch", "HF_HOME": "huggingface", "MPLCONFIGDIR": "matplotlib",
               DATA_PATH_ENV: "no-datasets", "TORCH_EXTENSIONS_DIR": "torch_extensions"}
_GUARD = {"on": False, "forbidden": ()}
_LOCAL_HOSTS = {None, "", "localhost", "ip6-localhost", socket.gethostname()}


def _forbidden_places() -> tuple[str, ...]:
    """What no test may open: the machine's dataset folders and weights caches (real home folder)."""
    home = Path(os.path.expanduser("~"))
    places = [Path("/usr/share/datasets"), home / ".cache" / "biformer", home / ".cache" / "torch",
              home / ".cache" / "huggingface"]
    return tuple(str(place) + os.sep for place in places)


def _is_local(host: object) -> bool:
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if host in _LOCAL_HOSTS:
        return True
    try:
        address = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def _audit(event: str, args: tuple) -> None:
    """Refuse, while the guard is on, to open the machine's data or to reach another host."""
    if not _GUARD["on"]:
        return
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        path = os.fsdecode(args[0])
        if path.startswith(_GUARD["forbidden"]) or path + os.sep in _GUARD["forbidden"]:
            raise PermissionError(f"hermetic tests: a test opened {path}; make the data in tmp_path instead")
    elif event == "socket.getaddrinfo" and not _is_local(args[0]):
        raise ConnectionRefusedError(f"hermetic tests: a test looked up the host {args[0]!r} (no network)")
    elif event == "socket.connect":
        sock, address = args
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address[0]):
            raise ConnectionRefusedError(f"hermetic tests: a test connected to {address!r} (no network)")


def pytest_configure(config: pytest.Config) -> None:
    """Point the machine-dependent places at empty temporary folders, before any test module is imported."""
    root = Path(tempfile.mkdtemp(prefix="biformer-tests-"))
    _SESSION["root"] = root
    for variable, name in _REDIRECTED.items():
        (root / name).mkdir()
        os.environ[variable] = str(root / name)  # inherited by the commands the tests start
    os.environ.pop("BIFORMER_FASHION_MNIST", None)  # the scenes' older single-folder setting
    _GUARD["forbidden"] = _forbidden_places()
    if not getattr(sys, "_biformer_audit_hook", False):  # an audit hook cannot be removed: add it once
        sys.addaudithook(_audit)
        sys._biformer_audit_hook = True
    _GUARD["on"] = True


def pytest_unconfigure(config: pytest.Config) -> None:
    _GUARD["on"] = False
    if "root" in _SESSION:
        shutil.rmtree(_SESSION.pop("root"), ignore_errors=True)


def write_fashion_mnist_lookalike(folder: Path, train: int = 300, test: int = 100, seed: int = 0) -> Path:
    """The four Fashion-MNIST files as the Debian package has them (gzip'd idx3 images uint8 (N, 28, 28) and
    idx1 labels uint8 (N,): ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
    ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``) in ``folder``. Class k is a bright shape of
    its own (bar, disc, ring, cross ...) at a jittered place and size on a dark noisy background, so a
    model can learn the classes and the scenes' masks (pixels brighter than 10%) are the shapes."""
    from train.synthetic import write_idx

    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:28, 0:28].astype(np.float32)
    shapes = (
        lambda dy, dx, r: (abs(dy) <= 2) & (abs(dx) <= r),  # 0 horizontal bar
        lambda dy, dx, r: (abs(dx) <= 2) & (abs(dy) <= r),  # 1 vertical bar
        lambda dy, dx, r: dy**2 + dx**2 <= r**2,  # 2 disc
        lambda dy, dx, r: abs(np.hypot(dy, dx) - r) <= 1.5,  # 3 ring
        lambda dy, dx, r: abs(np.maximum(abs(dy), abs(dx)) - r) <= 1.0,  # 4 square outline
        lambda dy, dx, r: np.maximum(abs(dy), abs(dx)) <= 0.7 * r,  # 5 filled square
        lambda dy, dx, r: ((abs(dy) <= 1.5) | (abs(dx) <= 1.5)) & (np.maximum(abs(dy), abs(dx)) <= r),  # 6 plus
        lambda dy, dx, r: ((abs(dy - dx) <= 1.5) | (abs(dy + dx) <= 1.5)) & (np.maximum(abs(dy), abs(dx)) <= r),
        lambda dy, dx, r: (abs(dy) <= r) & (abs(dx) <= (dy + r) / 2),  # 8 triangle
        lambda dy, dx, r: abs(dy) + abs(dx) <= r,  # 9 diamond
    )
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", train), ("t10k", test)):
        labels = rng.permutation(np.arange(count) % 10).astype(np.uint8)
        images = rng.integers(0, 25, (count, 28, 28)).astype(np.uint8)
        for image, label in zip(images, labels):
            centre_y, centre_x = 13.5 + rng.uniform(-3, 3, size=2)
            inside = shapes[label](rows - centre_y, cols - centre_x, rng.uniform(6.0, 10.0))
            image[inside] = rng.integers(150, 256)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


@pytest.fixture(scope="session")
def fashion_mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DATASETS/fashion-mnist: the session's Fashion-MNIST lookalike (300 train, 100 test images; see
    :func:`write_fashion_mnist_lookalike`). Read-only: copy it to change it."""
    return write_fashion_mnist_lookalike(tmp_path_factory.mktemp("datasets") / "fashion-mnist")


@pytest.fixture
def fashion_mnist_on_search_path(fashion_mnist_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The lookalike where the commands look by default: ``$BIFORMER_DATA_PATH`` is its parent for this test."""
    monkeypatch.setenv(DATA_PATH_ENV, str(fashion_mnist_dir.parent))
    return fashion_mnist_dir


def load_fixture(name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and JSON sidecar of a reference fixture (``bra_layer``, ``biformer_micro``, ...)."""
    tensors_path, meta_path = REFERENCE / f"{name}.safetensors", REFERENCE / f"{name}.json"
    if not tensors_path.is_file():
        pytest.fail(f"reference fixture missing: {tensors_path} (see tests/reference/README.md)")
    return load_file(str(tensors_path)), json.loads(meta_path.read_text())


def fixture_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "state_dict."
    return {key[len(prefix) :]: value for key, value in tensors.items() if key.startswith(prefix)}


def load_manifest(name: str) -> dict:
    return json.loads((REFERENCE / f"{name}.keys.json").read_text())


def assert_same_routing(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Routed region indices equal as sets per query region."""
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert torch.equal(actual.sort(dim=-1).values, expected.sort(dim=-1).values)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    """Seed every test (torch, NumPy's and Python's global generators), whatever ran before it; give the thread
    count, the working folder and the attention backend default back (training tests set ``threads: 1``)."""
    from biformer.ops import get_default_backend

    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    threads, folder, backend = torch.get_num_threads(), os.getcwd(), get_default_backend()
    yield
    torch.set_num_threads(threads)
    os.chdir(folder)
    assert get_default_backend() == backend, "a test left another default attention backend behind"


@pytest.fixture
def without_cpu_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """``BIFORMER_CPU_KERNELS=0`` for the test: ``auto`` follows its rule for a machine where the fused CPU kernels
    do not build (the PyTorch backends only)."""
    monkeypatch.setenv("BIFORMER_CPU_KERNELS", "0")


@pytest.fixture
def with_cpu_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` sees the fused CPU kernels as built (for the tests of its choices; nothing is run or built)."""
    import dataclasses

    from biformer.ops.backends import registry

    backend = registry._BACKENDS["cpu_fused"]
    monkeypatch.setitem(registry._BACKENDS, "cpu_fused", dataclasses.replace(backend, available=lambda: True))


# --- the scripts of benchmarks/, loaded as modules for the tests of their pure parts (tests/benchmarks) -------
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@contextmanager
def _loaded_benchmark(name: str) -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]


@pytest.fixture(scope="module")
def load_benchmark() -> Iterator[Callable[[str], ModuleType]]:
    """``load_benchmark("bench_gpu")``: the script as a module, registered in ``sys.modules`` until the test
    module's last test has run."""
    with ExitStack() as stack:
        yield lambda name: stack.enter_context(_loaded_benchmark(name))
