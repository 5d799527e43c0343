"""Optional dependencies: imported where they are used, with a one-line message naming the extra when missing.

``pip install biformer`` installs torch, timm and safetensors only: the models, checkpoint and Hub-folder
loading and export need nothing else. The commands (progress bars, YAML configurations, plots) need the
``cli`` extra (``pip install "biformer[cli]"``: tqdm, PyYAML, matplotlib).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["MissingDependency", "require"]

# import name -> the name pip installs it under
DISTRIBUTIONS = {"yaml": "PyYAML", "tqdm": "tqdm", "matplotlib": "matplotlib"}


class MissingDependency(ModuleNotFoundError):
    """An optional package is not installed; the message (one line) says what needs it and which extra to install.

    A :class:`ModuleNotFoundError` (so also an :class:`ImportError`): code that already catches those keeps working.
    """

    def __init__(self, module_name: str, extra: str, purpose: str) -> None:
        distribution = DISTRIBUTIONS.get(module_name.partition(".")[0], module_name.partition(".")[0])
        super().__init__(f'{purpose} needs {distribution}: pip install "biformer[{extra}]"',
                         name=module_name.partition(".")[0])
        self.extra = extra
        self.purpose = purpose


def require(module_name: str, *, extra: str, purpose: str) -> ModuleType:
    """Import ``module_name`` (e.g. ``"yaml"``, ``"matplotlib.pyplot"``) and return it.

    Args:
        module_name: the module to import.
        extra: the extra of ``biformer`` that installs it (``"cli"``).
        purpose: what needs it, the start of the message (``"biformer train"``, ``"writing metrics.png"``).

    Raises:
        MissingDependency: the package is not installed. Import errors inside an installed package (one of
            its own dependencies missing) propagate unchanged.
    """
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = (error.name or "").partition(".")[0]
        if missing != module_name.partition(".")[0]:
            raise  # the package is there but something it imports is broken: its own message says what
        raise MissingDependency(module_name, extra, purpose) from None
