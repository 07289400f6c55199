"""Models registered with detectron2 on import: backbones (and later the GKD meta-architectures)."""

from .backbone import (
    build_basic_resnet,
    build_basic_resnet_fpn_backbone,
    build_retinanet_basic_resnet_fpn_backbone,
)

__all__ = [
    "build_basic_resnet",
    "build_basic_resnet_fpn_backbone",
    "build_retinanet_basic_resnet_fpn_backbone",
]
