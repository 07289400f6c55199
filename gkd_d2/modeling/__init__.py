"""Models registered with detectron2 on import: backbones and the GKD meta-architectures."""

from .backbone import (
    build_basic_resnet,
    build_basic_resnet_fpn_backbone,
    build_retinanet_basic_resnet_fpn_backbone,
)
from .distilled_detector import DistilledDetector
from .distiller import GKDDistiller
from .extra_losses import DISTILL_LOSS_REGISTRY, DistillInputs, FeatureMSE
from .gkd_rcnn import GKDRCNN
from .gkd_retinanet import GKDRetinaNet
from .mobilenet import (
    MobileNetV2Backbone,
    build_mobilenetv2,
    build_mobilenetv2_fpn_backbone,
    build_retinanet_mobilenetv2_fpn_backbone,
)

__all__ = [
    "DISTILL_LOSS_REGISTRY",
    "DistillInputs",
    "DistilledDetector",
    "FeatureMSE",
    "GKDDistiller",
    "GKDRCNN",
    "GKDRetinaNet",
    "MobileNetV2Backbone",
    "build_basic_resnet",
    "build_basic_resnet_fpn_backbone",
    "build_mobilenetv2",
    "build_mobilenetv2_fpn_backbone",
    "build_retinanet_basic_resnet_fpn_backbone",
    "build_retinanet_mobilenetv2_fpn_backbone",
]
