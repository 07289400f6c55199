"""Basic-block ResNets (R18/R34 layout) of any width, with FPN, for small CPU teachers/students.

detectron2's ``build_resnet_backbone`` fixes the width of R18/R34 at 64 channels in res2.
Distillation experiments on a CPU need narrower students (and cheap teachers), so these
builders take the width from ``MODEL.RESNETS.RES2_OUT_CHANNELS`` (doubling per stage as usual)
and the stem width from ``MODEL.RESNETS.STEM_OUT_CHANNELS``. Everything else is detectron2's
``ResNet``, ``BasicStem``, ``BasicBlock`` and ``FPN``.
"""

from __future__ import annotations

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN, Backbone, ResNet
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem
from torch import nn

from ..compat import last_level_max_pool, last_level_p6p7

BLOCKS_PER_STAGE = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


def build_basic_resnet(cfg: CfgNode, input_shape: ShapeSpec) -> ResNet:
    """Basic-block ResNet: stem, then res2..res5 of widths w, 2w, 4w, 8w (w = RES2_OUT_CHANNELS)."""
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in BLOCKS_PER_STAGE:
        raise ValueError(f"MODEL.RESNETS.DEPTH={r.DEPTH}: basic-block ResNets have depth 18 or 34")
    norm = r.NORM
    stem = BasicStem(in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS, norm=norm)
    max_stage = max({"res2": 2, "res3": 3, "res4": 4, "res5": 5}[f] for f in r.OUT_FEATURES)
    stages, in_channels, out_channels = [], r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS
    for idx, num_blocks in enumerate(BLOCKS_PER_STAGE[r.DEPTH][: max_stage - 1]):
        stride = 1 if idx == 0 else 2
        stages.append(
            ResNet.make_stage(
                BasicBlock,
                num_blocks,
                stride_per_block=[stride] + [1] * (num_blocks - 1),
                in_channels=in_channels,
                out_channels=out_channels,
                norm=norm,
            )
        )
        in_channels, out_channels = out_channels, out_channels * 2
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


def fpn_from_config(cfg: CfgNode, bottom_up: Backbone, top_block: nn.Module) -> FPN:
    """detectron2's FPN over ``bottom_up`` with ``MODEL.FPN.*`` and the given top block (P6 by
    max-pooling for Faster R-CNN, P6/P7 convs for RetinaNet)."""
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=cfg.MODEL.FPN.OUT_CHANNELS,
        norm=cfg.MODEL.FPN.NORM,
        top_block=top_block,
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )


@BACKBONE_REGISTRY.register()
def build_retinanet_basic_resnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """Basic-block ResNet + FPN with P6/P7 from res5, as RetinaNet's P3..P7."""
    bottom_up = build_basic_resnet(cfg, input_shape)
    top_block = last_level_p6p7(
        bottom_up.output_shape()["res5"].channels, cfg.MODEL.FPN.OUT_CHANNELS
    )
    return fpn_from_config(cfg, bottom_up, top_block)


@BACKBONE_REGISTRY.register()
def build_basic_resnet_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """Basic-block ResNet + FPN with P6 by max-pooling P5, as Faster R-CNN's P2..P6."""
    return fpn_from_config(cfg, build_basic_resnet(cfg, input_shape), last_level_max_pool())
