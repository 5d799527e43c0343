"""torch.hub entry points, one per model: ``torch.hub.load(CLONE, "biformer_tiny", source="local")``.

Keyword arguments: ``weights=PATH`` (the authors' .pth file, a .safetensors file or a folder in the Hugging Face
Hub layout) and anything ``timm.create_model`` takes (``num_classes=10`` ...). Without ``weights`` the model has
random weights (the authors' download links are broken). The package is imported from this clone's ``src/``.
"""

import sys as _sys
from pathlib import Path as _Path

_SOURCE = str(_Path(__file__).resolve().parent / "src")
if _SOURCE not in _sys.path:
    _sys.path.insert(0, _SOURCE)

from biformer.hub import hub_entry_point as _hub_entry_point  # noqa: E402 (needs the path above)

dependencies = ["torch", "timm", "safetensors"]

biformer_tiny = _hub_entry_point("biformer_tiny")
biformer_small = _hub_entry_point("biformer_small")
biformer_base = _hub_entry_point("biformer_base")
biformer_stl = _hub_entry_point("biformer_stl")
biformer_stl_nchw = _hub_entry_point("biformer_stl_nchw")
biformer_nano = _hub_entry_point("biformer_nano")
