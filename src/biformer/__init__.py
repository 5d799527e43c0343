"""biformer: Bi-Level Routing Attention and the BiFormer models (CVPR 2023), timm-native.

``import biformer`` registers ``biformer_tiny``, ``biformer_small``, ``biformer_base``, ``biformer_stl``,
``biformer_stl_nchw`` (the authors' released models) and ``biformer_nano`` (a small one for quick experiments)
with ``timm.create_model`` (:data:`MODEL_NAMES`; :data:`RELEASED_MODEL_NAMES` are the released ones).
"""

from importlib.metadata import PackageNotFoundError, version

from .checkpoint import load_checkpoint, read_state_dict, save_weights
from .layers import (
    AttentionLePE,
    AttentionLePENCHW,
    BiLevelRoutingAttention,
    BiLevelRoutingAttentionNCHW,
)
from .models import MODEL_NAMES, RELEASED_MODEL_NAMES, BiFormer, BiFormerSTL, BiFormerSTLNCHW
from .ops import attention_backend, available_backends
from .routing import chosen_backends, record_routing

try:
    __version__ = version("biformer")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = [
    "MODEL_NAMES",
    "RELEASED_MODEL_NAMES",
    "AttentionLePE",
    "AttentionLePENCHW",
    "BiFormer",
    "BiFormerSTL",
    "BiFormerSTLNCHW",
    "BiLevelRoutingAttention",
    "BiLevelRoutingAttentionNCHW",
    "attention_backend",
    "available_backends",
    "chosen_backends",
    "load_checkpoint",
    "read_state_dict",
    "record_routing",
    "save_weights",
]
