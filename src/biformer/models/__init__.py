"""BiFormer model families, registered with timm on import."""

from .biformer import BiFormer, Block, checkpoint_filter_fn
from .biformer_stl import BiFormerSTL, BiFormerSTLNCHW

# the authors' released models: their weights load unchanged (tests/reference holds their state_dict manifests)
RELEASED_MODEL_NAMES = ("biformer_tiny", "biformer_small", "biformer_base", "biformer_stl", "biformer_stl_nchw")
# every registered model: the released ones and biformer_nano (ours, for quick experiments; no released weights)
MODEL_NAMES = (*RELEASED_MODEL_NAMES, "biformer_nano")

__all__ = [
    "MODEL_NAMES", "RELEASED_MODEL_NAMES", "BiFormer", "BiFormerSTL", "BiFormerSTLNCHW", "Block",
    "checkpoint_filter_fn",
]
