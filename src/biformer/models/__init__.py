"""BiFormer model families, registered with timm on import."""

# RELEASED_MODEL_NAMES: the authors' released models, whose weights load unchanged (tests/reference holds their
# state_dict manifests); MODEL_NAMES: every registered model, the released ones and biformer_nano (ours, for quick
# experiments; no released weights). Both come from the one table of pretrained configs (models/_base.py).
from ._base import MODEL_NAMES, RELEASED_MODEL_NAMES
from .backbone import BiFormerBackbone
from .biformer import BiFormer, Block, checkpoint_filter_fn
from .biformer_stl import BiFormerSTL, BiFormerSTLNCHW

__all__ = [
    "MODEL_NAMES", "RELEASED_MODEL_NAMES", "BiFormer", "BiFormerBackbone", "BiFormerSTL", "BiFormerSTLNCHW", "Block",
    "checkpoint_filter_fn",
]
