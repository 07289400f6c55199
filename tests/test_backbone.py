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


@pytest.mark.parametrize(
    "ours, detectron2s, levels",
    [
        (
            "build_retinanet_basic_resnet_fpn_backbone",
            "build_retinanet_resnet_fpn_backbone",
            ["res3", "res4", "res5"],
        ),
        (
            "build_basic_resnet_fpn_backbone",
            "build_resnet_fpn_backbone",
            ["res2", "res3", "res4", "res5"],
        ),
    ],
)
def test_width_64_is_detectron2s_r18_fpn_same_state_and_outputs(ours, detectron2s, levels):
    """At R18's own widths (stem and res2 64), gkd_d2's builder makes the ResNet-18-FPN that
    detectron2's own builder makes from the same config: the same state-dict keys and shapes,
    the same frozen parameters (FREEZE_AT 2), and, with the same weights loaded into both
    (random, BN statistics included), the same output at every level."""
    cfg = quickstart_cfg(DEPTH=18, RES2_OUT_CHANNELS=64, STEM_OUT_CHANNELS=64, OUT_FEATURES=levels)
    cfg.MODEL.FPN.IN_FEATURES = levels
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    cfg.MODEL.BACKBONE.NAME = detectron2s
    ref = build_backbone(cfg).eval()
    cfg.MODEL.BACKBONE.NAME = ours
    mine = build_backbone(cfg).eval()

    state = ref.state_dict()
    assert {k: v.shape for k, v in mine.state_dict().items()} == {
        k: v.shape for k, v in state.items()
    }
    assert {n: p.requires_grad for n, p in mine.named_parameters()} == {
        n: p.requires_grad for n, p in ref.named_parameters()
    }
    g = torch.Generator().manual_seed(0)
    for k, v in state.items():
        if v.is_floating_point():  # move every weight and statistic off its initial value
            noise = 0.1 * torch.randn(v.shape, generator=g)
            state[k] = (v + noise).abs() if k.endswith("running_var") else v + noise
    ref.load_state_dict(state)
    mine.load_state_dict(state)
    x = torch.rand(2, 3, 96, 128, generator=g)
    with torch.no_grad():
        expected, got = ref(x), mine(x)
    assert list(got) == list(expected)
    for level in expected:
        torch.testing.assert_close(got[level], expected[level], rtol=0, atol=0)


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
