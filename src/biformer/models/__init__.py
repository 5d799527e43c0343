"""BiFormer model families, registered with timm on import."""

from .biformer import BiFormer, Block, checkpoint_filter_fn
from .biformer_stl import BiFormerSTL, BiFormerSTLNCHW

# the authors' released models (biformer_nano, ours, is registered too but has no released weights)
MODEL_NAMES = ("biformer_tiny", "biformer_small", "biformer_base", "biformer_stl", "biformer_stl_nchw")

__all__ = ["MODEL_NAMES", "BiFormer", "BiFormerSTL", "BiFormerSTLNCHW", "Block", "checkpoint_filter_fn"]
