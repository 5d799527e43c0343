"""Dense prediction with BiFormer: a backbone API, torchvision detectors, segmentation heads, data and metrics.

``biformer.dense.BiFormerBackbone`` gives the four stage maps (the authors' ``BiFormer_mm``);
``biformer.dense.detection`` builds torchvision Mask R-CNN / RetinaNet on it; ``biformer.dense.segmentation``
builds Semantic FPN / UperNet; ``SceneDataset`` is an offline dataset of real Fashion-MNIST crops;
``biformer.dense.tasks`` holds loss and metrics, and ``biformer.dense.engine_tasks`` the ``segmentation`` and
``detection`` tasks of ``biformer train``.
"""

from ..models.backbone import BiFormerBackbone, LoadReport, auto_n_win, load_backbone_weights
from .detection import (
    BiFormerFPN,
    maskrcnn_biformer,
    maskrcnn_biformer_base,
    maskrcnn_biformer_small,
    maskrcnn_biformer_tiny,
    retinanet_biformer,
    retinanet_biformer_base,
    retinanet_biformer_small,
    retinanet_biformer_tiny,
)
from .scenes import FASHION_MNIST_CLASSES, SceneDataset, compose_scene, load_fashion_mnist, read_idx
from .segmentation import (
    AuxiliaryFCNHead,
    SemanticFPNHead,
    SemanticSegmentor,
    UperNetHead,
    semantic_fpn_biformer,
    semantic_fpn_biformer_base,
    semantic_fpn_biformer_small,
    semantic_fpn_biformer_tiny,
    upernet_biformer,
    upernet_biformer_base,
    upernet_biformer_small,
    upernet_biformer_tiny,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "AuxiliaryFCNHead",
    "BiFormerBackbone",
    "BiFormerFPN",
    "LoadReport",
    "SceneDataset",
    "SemanticFPNHead",
    "SemanticSegmentor",
    "UperNetHead",
    "auto_n_win",
    "compose_scene",
    "load_backbone_weights",
    "load_fashion_mnist",
    "maskrcnn_biformer",
    "maskrcnn_biformer_base",
    "maskrcnn_biformer_small",
    "maskrcnn_biformer_tiny",
    "read_idx",
    "retinanet_biformer",
    "retinanet_biformer_base",
    "retinanet_biformer_small",
    "retinanet_biformer_tiny",
    "semantic_fpn_biformer",
    "semantic_fpn_biformer_base",
    "semantic_fpn_biformer_small",
    "semantic_fpn_biformer_tiny",
    "upernet_biformer",
    "upernet_biformer_base",
    "upernet_biformer_small",
    "upernet_biformer_tiny",
]
