"""Extra distillation terms that combine with GKD: a registry, and the plain FPN MSE (FitNet).

The paper notes that existing (local) distillation methods combine with global knowledge. A term
named in ``MODEL.GKD.EXTRA_LOSSES`` (weights in ``MODEL.GKD.EXTRA_LOSS_WEIGHTS``) is built from
``DISTILL_LOSS_REGISTRY`` and added to GKD's own terms, for RetinaNet and Faster R-CNN alike. A
term is an ``nn.Module`` (its parameters, e.g. adapters, are trained with the student and
checkpointed) with a ``loss_name`` and a forward that takes a :class:`DistillInputs`.

A user adds a method in their own code:

    @DISTILL_LOSS_REGISTRY.register()
    class MyLocalKD(nn.Module):
        loss_name = "loss_kd_mine"
        def __init__(self, cfg, *, strides, student_channels, teacher_channels,
                     level_reduction): ...
        def forward(self, inputs: DistillInputs) -> Tensor: ...
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from detectron2.config import CfgNode
from detectron2.utils.registry import Registry
from torch import Tensor, nn

DISTILL_LOSS_REGISTRY = Registry("DISTILL_LOSS")
DISTILL_LOSS_REGISTRY.__doc__ = """Extra distillation terms, selected by MODEL.GKD.EXTRA_LOSSES.

Each is called as ``cls(cfg, strides=..., student_channels=..., teacher_channels=...,
level_reduction="sum" | "mean")`` (the detector's resolved ``MODEL.GKD.LEVEL_REDUCTION``)."""


@dataclass
class DistillInputs:
    """What a distillation term sees of one training batch (N instances, L FPN levels).

    Attributes:
        student_feats, teacher_feats: per level (B, C_S, H, W) / (B, C_T, H, W) FPN maps;
            the teacher's are detached.
        strides: (L,) FPN strides.
        boxes: (N, 4) XYXY instance boxes (positive anchors / proposals) in input pixels.
        batch_idx, classes, levels: (N,) image, class and assigned level of each instance.
        weights: (N,) GKD's robustness weight r at each instance's level (ones when
            ``ROBUST_WEIGHTS`` is off).
        student_logits, teacher_logits: (N, K') classification logits of the instances.
        attenuation: a(e) of the current epoch.
    """

    student_feats: list[Tensor]
    teacher_feats: list[Tensor]
    strides: list[int]
    boxes: Tensor
    batch_idx: Tensor
    classes: Tensor
    levels: Tensor
    weights: Tensor
    student_logits: Tensor
    teacher_logits: Tensor
    attenuation: float


def build_extra_losses(
    cfg: CfgNode,
    *,
    strides: list[int],
    student_channels: int,
    teacher_channels: int,
    level_reduction: str,
) -> tuple[nn.ModuleList, list[float]]:
    """The terms of ``MODEL.GKD.EXTRA_LOSSES`` and their weights, checked against each other."""
    names, weights = list(cfg.MODEL.GKD.EXTRA_LOSSES), list(cfg.MODEL.GKD.EXTRA_LOSS_WEIGHTS)
    if len(names) != len(weights):
        raise ValueError(
            f"MODEL.GKD.EXTRA_LOSSES has {len(names)} names {names} but "
            f"MODEL.GKD.EXTRA_LOSS_WEIGHTS has {len(weights)} weights {weights}: give one each"
        )
    terms = nn.ModuleList()
    for name in names:
        if name not in DISTILL_LOSS_REGISTRY:
            known = sorted(k for k, _ in DISTILL_LOSS_REGISTRY)
            raise KeyError(
                f"MODEL.GKD.EXTRA_LOSSES: no distillation term named {name!r}; registered: "
                f"{known} (register your own with gkd_d2.modeling.DISTILL_LOSS_REGISTRY)"
            )
        terms.append(
            DISTILL_LOSS_REGISTRY.get(name)(
                cfg,
                strides=strides,
                student_channels=student_channels,
                teacher_channels=teacher_channels,
                level_reduction=level_reduction,
            )
        )
    loss_names = [t.loss_name for t in terms]
    if len(set(loss_names)) != len(loss_names):
        raise ValueError(f"MODEL.GKD.EXTRA_LOSSES {names}: a term is listed twice")
    return terms, [float(w) for w in weights]


def feature_mse(adapted_student: Tensor, teacher: Tensor) -> Tensor:
    """Plain feature imitation of one level: mean over all B x C x H x W of (A - T)^2 / 2.

    Args:
        adapted_student: (B, C, H, W) student map after an adapter.
        teacher: (B, C, H, W) teacher map.

    Returns:
        scalar loss.
    """
    return 0.5 * (adapted_student - teacher).pow(2).mean()


@DISTILL_LOSS_REGISTRY.register()
class FeatureMSE(nn.Module):
    """FitNet-style imitation of every FPN cell (no foreground/background split, no weights).

    Has its own 3x3 adapters (it is a separate method, not a re-weighting of GKD's imitation);
    levels are reduced like GKD's feature terms (``LEVEL_REDUCTION``) and the term is attenuated
    by a(e) like them.
    """

    loss_name = "loss_kd_feature_mse"

    def __init__(
        self,
        cfg: CfgNode,
        *,
        strides: list[int],
        student_channels: int,
        teacher_channels: int,
        level_reduction: str,
    ):
        super().__init__()
        self.adapters = nn.ModuleList(
            nn.Conv2d(student_channels, teacher_channels, 3, padding=1) for _ in strides
        )
        self.mean_over_levels = level_reduction == "mean"

    def forward(self, inputs: DistillInputs) -> Tensor:
        per_level = [
            feature_mse(adapter(s), t)
            for adapter, s, t in zip(self.adapters, inputs.student_feats, inputs.teacher_feats)
        ]
        total = torch.stack(per_level).sum()
        if self.mean_over_levels:
            total = total / len(per_level)
        return inputs.attenuation * total
