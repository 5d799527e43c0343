"""``pip install biformer`` needs torch, timm and safetensors only; tqdm, PyYAML and matplotlib come with the ``cli``
extra (docs/architecture.md). Each test runs a fresh Python in which they are not found (``blocker.py`` below
makes every import finder blind to them, as when they are not installed), and compares what the library
computes there with the same computation in this process, where everything is installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import biformer
from biformer.hub import save_pretrained
from biformer.train.checkpoints import save_weights_with_metadata
from biformer.train.classification import ClassificationTask
from biformer.train.config import load_config

BLOCKED = ("tqdm", "yaml", "matplotlib")
BLOCKER = textwrap.dedent(f"""
    import importlib.abc
    import sys

    BLOCKED = {BLOCKED!r}


    class Hide(importlib.abc.MetaPathFinder):
        \"\"\"One of the interpreter's finders, blind to the blocked packages: for them every finder answers
        None, as when they are not installed (``import`` raises ModuleNotFoundError, ``find_spec`` is None).\"\"\"

        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                return None
            return self.finder.find_spec(name, path, target)

        def invalidate_caches(self):
            getattr(self.finder, "invalidate_caches", lambda: None)()


    sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
""")
MICRO = {"depth": [1, 1, 1, 1], "embed_dim": [8, 16, 16, 16], "qk_dims": [8, 16, 16, 16], "head_dim": 8}


def run_blocked(tmp_path: Path, script: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh Python where tqdm, yaml and matplotlib cannot be imported."""
    (tmp_path / "blocker.py").write_text(BLOCKER)
    (tmp_path / "child.py").write_text("import blocker  # noqa: F401  (first: nothing optional is importable)\n"
                                       + textwrap.dedent(script))
    source = str(Path(biformer.__file__).resolve().parents[1])  # the biformer this process imported
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), source, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(tmp_path / "child.py"), *args], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)


def write_training_checkpoint(path: Path) -> torch.nn.Module:
    """A training checkpoint as the training loop writes it (weights + the run's description)."""
    values = dict(model="biformer_nano", model_kwargs=MICRO, in_chans=3, input_size=32, dataset="imagefolder",
                  data_dir=str(path.parent))
    config = load_config((values, "test"))
    info = dict(class_names=["a", "b", "c"], in_chans=3, input_size=32, mean=[0.5] * 3, std=[0.25] * 3,
                interpolation="bilinear", crop_pct=1.0)
    network = ClassificationTask(config).build_model(info).eval()
    save_weights_with_metadata(network, path, dict(config=config.to_dict(), data=info, epoch=1))
    return network


CLI_CASES = {
    # name: (arguments, the package the message names, the command it names)
    "train_config": (["train", "--config", "run.yaml"], "PyYAML", "train"),
    "train": (["train", "--epochs", "1", "--download", "--data-dir", "data"], "tqdm", "train"),
    "train_flag": (["train", "--model-kwargs", "{n_win: 2}"], "PyYAML", "train"),
    "eval": (["eval", "best.safetensors", "--output", "eval"], "tqdm", "eval"),
    "compare_flag": (["compare", "--model-kwargs", "{n_win: 2}"], "PyYAML", "compare"),
    "show_routing": (["show-routing", "picture.png", "--point", "8,8", "--model", "hub"], "matplotlib",
                     "show-routing"),
}
CHILD = f"""
    import contextlib
    import io
    import json
    import sys

    import timm
    import torch
    from safetensors.torch import load_file, save_file

    import biformer
    from biformer.cli import main
    from biformer.hub import load_model
    from biformer.hub import model_from_checkpoint

    refused = []
    for name in {BLOCKED!r}:
        try:
            __import__(name)
        except ModuleNotFoundError:
            refused.append(name)
    images = load_file("inputs.safetensors")["images"]
    torch.manual_seed(1)
    models = dict(created=timm.create_model("biformer_nano", num_classes=3, **{MICRO!r}),
                  hub=load_model("hub"), checkpoint=model_from_checkpoint("best.safetensors"))
    with torch.no_grad():
        save_file({{name: model.eval()(images) for name, model in models.items()}}, "outputs.safetensors")
    commands = {{}}
    for name, (argv, _, _) in {CLI_CASES!r}.items():
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = main(argv)  # an exception here ends the child with a traceback: the test fails
        commands[name] = [code, stderr.getvalue()]
    loaded = sorted(name for name in sys.modules if name.partition(".")[0] in {BLOCKED!r})
    print(json.dumps(dict(refused=refused, loaded=loaded, commands=commands)))
"""


@pytest.fixture(scope="module")
def blocked(tmp_path_factory):
    """One fresh Python without the optional packages: it builds, loads and runs models, then runs commands
    that need the packages. Returns its folder, the expected logits (this process) and its report."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("blocked")
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    torch.manual_seed(1)
    created = timm.create_model("biformer_nano", num_classes=3, **MICRO).eval()
    save_pretrained(created, folder / "hub")
    trained = write_training_checkpoint(folder / "best.safetensors")
    with torch.no_grad():
        expected = {"created": created(images), "hub": created(images), "checkpoint": trained(images)}
    save_file({"images": images}, str(folder / "inputs.safetensors"))
    (folder / "run.yaml").write_text("epochs: 1\n")
    Image.new("RGB", (32, 32), (120, 30, 200)).save(folder / "picture.png")
    before = sorted(path.name for path in folder.iterdir())
    result = run_blocked(folder, CHILD)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    report["written"] = sorted(set(path.name for path in folder.iterdir()) - set(before))
    return folder, expected, report


def test_models_checkpoints_and_hub_folders_work_without_the_cli_extra(blocked):
    """``import biformer``, ``timm.create_model``, a Hub folder and a training checkpoint load and give the logits
    they give with every package installed."""
    folder, expected, report = blocked
    assert report["refused"] == list(BLOCKED) and report["loaded"] == []  # the blocker works; nothing got past it
    outputs = load_file(str(folder / "outputs.safetensors"))
    for name, logits in expected.items():
        torch.testing.assert_close(outputs[name], logits, rtol=0, atol=1e-6, msg=name)


def test_commands_without_the_cli_extra_print_one_line_naming_it(blocked):
    """Each command that needs the extra fails with exit code != 0 and one line: the command, the package and
    ``pip install "biformer[cli]"``; no traceback, no run folder or picture written."""
    _, _, report = blocked
    for name, (_, package, command) in CLI_CASES.items():
        code, stderr = report["commands"][name]
        lines = stderr.strip().splitlines()
        assert code != 0 and len(lines) == 1, (name, stderr)
        assert lines[0].startswith(f"biformer {command}: error: "), (name, stderr)
        assert lines[0].endswith(f' needs {package}: pip install "biformer[cli]"'), (name, stderr)
    assert report["written"] == ["blocker.py", "child.py", "outputs.safetensors"]


def test_require_names_the_extra_only_for_the_missing_package_itself(tmp_path, monkeypatch):
    from biformer._optional import MissingDependency, require

    assert require("json", extra="cli", purpose="x") is json
    with pytest.raises(MissingDependency, match=r'^writing a plot needs no_such_pkg: pip install "biformer\[cli\]"$'):
        require("no_such_pkg.sub", extra="cli", purpose="writing a plot")
    # an installed package whose own import fails keeps its own error (it is not the extra's fault)
    (tmp_path / "broken_pkg.py").write_text("import no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as caught:
        require("broken_pkg", extra="cli", purpose="x")
    assert not isinstance(caught.value, MissingDependency) and caught.value.name == "no_such_dependency"
