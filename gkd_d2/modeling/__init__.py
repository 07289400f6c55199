"""Models registered with detectron2 on import: backbones and the GKD meta-architectures."""

from .backbone import (
    build_basic_resnet,
    build_basic_resnet_fpn_backbone,
    build_retinanet_basic_resnet_fpn_backbone,
)
from .distiller import GKDDistiller
from .gkd_retinanet import GKDRetinaNet

__all__ = [
    "GKDDistiller",
    "GKDRetinaNet",
    "build_basic_resnet",
    "build_basic_resnet_fpn_backbone",
    "build_retinanet_basic_resnet_fpn_backbone",
]
