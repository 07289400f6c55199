"""Basic-block ResNet-FPN backbones of any width."""

import pytest
import torch
from conftest import REPO
from detectron2.modeling import build_backbone

from gkd_d2 import load_config


def quickstart_cfg(**resnets):
    cfg = load_config(str(REPO / "configs" / "quickstart_retinanet_cpu.yaml"))
    for k, v in resnets.items():
        cfg.MODEL.RESNETS[k] = v
    return cfg


def test_width_64_equals_detectron2_r18():
    cfg = quickstart_cfg(DEPTH=18, RES2_OUT_CHANNELS=64, STEM_OUT_CHANNELS=64)
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_resnet_fpn_backbone"
    ref = build_backbone(cfg).state_dict()
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_basic_resnet_fpn_backbone"
    ours = build_backbone(cfg).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in ref.items()}


@pytest.mark.parametrize("depth", [18, 34])
def test_narrow_retinanet_backbone_shapes(depth):
    cfg = quickstart_cfg(DEPTH=depth, RES2_OUT_CHANNELS=16, STEM_OUT_CHANNELS=8)
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_basic_resnet_fpn_backbone"
    backbone = build_backbone(cfg)
    bottom = backbone.bottom_up
    assert {k: s.channels for k, s in bottom.output_shape().items()} == {
        "res3": 32,
        "res4": 64,
        "res5": 128,
    }
    assert bottom.stem.out_channels == 8
    assert [len(stage) for stage in bottom.stages] == {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}[depth]
    out = backbone(torch.rand(2, 3, 128, 128))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "p3": (2, 64, 16, 16),
        "p4": (2, 64, 8, 8),
        "p5": (2, 64, 4, 4),
        "p6": (2, 64, 2, 2),
        "p7": (2, 64, 1, 1),
    }


def test_rcnn_backbone_levels_and_freeze():
    cfg = quickstart_cfg(
        RES2_OUT_CHANNELS=16, STEM_OUT_CHANNELS=16, OUT_FEATURES=["res2", "res3", "res4", "res5"]
    )
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.BACKBONE.NAME = "build_basic_resnet_fpn_backbone"
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    backbone = build_backbone(cfg)
    out = backbone(torch.rand(1, 3, 128, 128))
    assert {k: v.shape[-1] for k, v in out.items()} == {
        "p2": 32,
        "p3": 16,
        "p4": 8,
        "p5": 4,
        "p6": 2,
    }
    frozen = [n for n, p in backbone.bottom_up.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("stem.", "res2.")) for n in frozen)
    assert all(
        p.requires_grad for n, p in backbone.bottom_up.named_parameters() if n.startswith("res3.")
    )


def test_bottleneck_depth_rejected_with_key_name():
    cfg = quickstart_cfg(DEPTH=50)
    cfg.MODEL.BACKBONE.NAME = "build_retinanet_basic_resnet_fpn_backbone"
    with pytest.raises(ValueError, match=r"MODEL.RESNETS.DEPTH=50"):
        build_backbone(cfg)
