"""Training recipes shipped with the package: ``biformer train --config imagenet/biformer_small``.

The YAML files live in ``biformer/configs/GROUP/NAME.yaml`` (package data): the authors' ImageNet-1k recipes
(``imagenet/biformer_tiny``, ``_small``, ``_base``, ``_stl``) and their dense-prediction settings
(``coco/maskrcnn_1x_biformer_small``, ``coco/retinanet_1x_biformer_small``, ``ade20k/upernet_160k_biformer_small``).
Each file says where every value comes from and what differs from the authors' code. ``--config`` takes a
shipped name or a path; a path to an existing file wins over a name.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

from .errors import ConfigError

__all__ = ["config_description", "list_configs", "resolve_config"]


def _configs_root() -> Path:
    return Path(str(resources.files("biformer") / "configs"))


def list_configs() -> list[str]:
    """Names of the shipped recipes (``GROUP/NAME``), sorted."""
    root = _configs_root()
    if not root.is_dir():
        return []
    return sorted(path.relative_to(root).with_suffix("").as_posix() for path in root.rglob("*.yaml"))


def config_description(name: str) -> str:
    """The first comment line of a shipped recipe (what it trains)."""
    for line in (_configs_root() / f"{name}.yaml").read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def resolve_config(value: str | os.PathLike) -> Path:
    """The file ``--config VALUE`` means: an existing path, else a shipped recipe's name (``.yaml`` optional);
    a missing ``.yaml`` / ``.yml`` or absolute path is returned as it is (reading it then names the file).

    Raises:
        ConfigError: a name that is not a shipped recipe; the message lists them.
    """
    path = Path(value).expanduser()
    if path.is_file():
        return path
    name = Path(value).as_posix().removesuffix(".yaml")
    if name in list_configs():
        return _configs_root() / f"{name}.yaml"
    if path.suffix in (".yaml", ".yml") or path.is_absolute():
        return path  # meant as a file: load_yaml says "--config: no such file: PATH"
    raise ConfigError(f"--config: {str(value)!r} is neither a file nor a shipped recipe; shipped recipes "
                      f"(biformer train --list-configs): {', '.join(list_configs())}")
