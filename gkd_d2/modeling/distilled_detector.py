"""What every GKD student detector shares: the teacher slot, a(e), and building its distiller.

A GKD meta-architecture is ``class GKDX(DistilledDetector, X)``: it only says which instances
(boxes, classes, levels) and which logits go to the shared :class:`GKDDistiller`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.utils.events import get_event_storage
from torch import Tensor, nn

from ..distill import linear_attenuation
from ..rng import preserved_rng
from ..schedule import attenuation_schedule
from .distiller import GKDDistiller

if TYPE_CHECKING:
    from ..teacher import FrozenTeacher

logger = logging.getLogger(__name__)


def batch_statistics_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``module`` (BN, SyncBN, detectron2's NaiveSyncBN: every
    ``_BatchNorm``), whose output depends on the batch when they are in train mode.

    GN, FrozenBN and layers without norm compute the same in train and eval mode.
    """
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def running_statistics(norms: list[nn.modules.batchnorm._BatchNorm]) -> Iterator[None]:
    """Put ``norms`` in eval mode (running statistics, no update of them) and restore each
    layer's own mode afterwards; nothing else of the model changes mode."""
    modes = [m.training for m in norms]
    try:
        for m in norms:
            m.train(False)
        yield
    finally:
        for m, mode in zip(norms, modes):
            m.train(mode)


def matched_gt_rows(matched_boxes: Tensor, batch_idx: Tensor, gt_boxes: list[Tensor]) -> Tensor:
    """The row of each instance's matched ground truth among a batch's ground truths.

    detectron2's labelling hands over the matched ground truth's box (RetinaNet's
    ``label_anchors``, the sampled proposals' ``gt_boxes``), not its index; the box is a copy,
    so it equals its ground truth exactly. Of equal ground-truth boxes, the first is taken.

    Args:
        matched_boxes: (N, 4) matched ground-truth box of each instance.
        batch_idx: (N,) int64 image of each instance.
        gt_boxes: per image, its (G_i, 4) ground-truth boxes.

    Returns:
        (N,) int64 rows into the image-major concatenation of ``gt_boxes``; -1 where no
        ground truth of the instance's image has its box.
    """
    out = torch.full_like(batch_idx, -1)
    offset = 0
    for i, g in enumerate(gt_boxes):
        if len(g) == 0:  # an image without ground truth has no positives
            continue
        g = g.to(matched_boxes)
        equal = (matched_boxes[:, None, :] == g[None, :, :]).all(dim=2)  # (N, G_i)
        found = equal.any(dim=1) & (batch_idx == i)
        first = equal.to(torch.uint8).argmax(dim=1)
        out = torch.where(found, first + offset, out)
        offset += len(g)
    return out


def gt_areas_in_original(gt_instances: list, batched_inputs: list[dict]) -> Tensor:
    """(G,) area of each ground-truth box of a batch (image-major) in its original image's
    pixels (COCO's size groups), from the resized boxes and each input's ``height``/``width``
    (the resized size when absent)."""
    areas = []
    for inst, x in zip(gt_instances, batched_inputs):
        h, w = inst.image_size
        scale = (x.get("height", h) * x.get("width", w)) / float(h * w)
        areas.append(inst.gt_boxes.area() * scale)
    return torch.cat(areas) if areas else torch.zeros(0)


@dataclasses.dataclass
class StepRecord:
    """What one training forward of detectron2's detector hands to the distillation."""

    batched_inputs: list[dict]
    # the student's backbone features in its prototypes' normalisation, or None when they are
    # the training forward's own (DistilledDetector.descriptor_features)
    descriptors: dict[str, Tensor] | None = None
    backbone_seen: bool = False
    # RetinaNet: label_anchors' anchors, labels and matched ground-truth boxes
    anchors: list | None = None
    gt_labels: list[Tensor] | None = None
    matched_gt_boxes: list[Tensor] | None = None
    # Faster R-CNN: the backbone's features and ground truth as the ROI heads receive them,
    # the sampled proposals, their pooled RoI features and the box predictor's outputs
    features: dict[str, Tensor] | None = None
    gt_instances: list | None = None
    proposals: list | None = None
    pooled: Tensor | None = None
    predictions: tuple | None = None
    # the teacher's backbone features of the same inputs, once the distillation computed them
    teacher_features: dict[str, Tensor] | None = None


class DistilledDetector:
    """Mixin for a detectron2 detector with a ``distiller`` and a frozen teacher.

    Subclasses call :meth:`init_distillation` in ``__init__`` with the names of the FPN levels
    distilled (the same names in the teacher's backbone). The teacher is built from the config
    when training starts (:meth:`require_teacher`), or attached with :meth:`attach_teacher`.
    """

    distill_in_features: list[str]
    # the detectron2 meta-architecture of the student alone (export, controls)
    plain_architecture: str

    def init_distillation(
        self,
        distiller: GKDDistiller,
        distill_in_features: list[str],
        student_cfg: CfgNode | None = None,
    ) -> None:
        """Set up the distillation state; ``student_cfg`` (the config the model was built
        from) is what :meth:`require_teacher` builds the teacher and a(e) from."""
        self.distiller = distiller
        self.distill_in_features = list(distill_in_features)
        # the teacher is a plain attribute, not a submodule: absent from parameters(),
        # state_dict(), the optimizer and DDP (attach_teacher)
        object.__setattr__(self, "teacher", None)
        self.student_cfg = student_cfg
        # (iterations per epoch, epochs) for a(e); None: a = 1 (require_teacher sets it)
        self.attenuation_schedule: tuple[int, int] | None = None
        # what detectron2's training forward hands over during one step (recording_step)
        self.current_step: StepRecord | None = None
        # bank mode: called with each training forward's inputs, the features r is computed
        # from and the inputs' sizes (the refresh hook's FeatureHarvest); None: nothing harvested
        self.feature_harvest: Callable[..., None] | None = None
        # BN layers of the distilled path (the backbone, FPN included): in train mode they make
        # the training forward's features differ from the eval-mode ones the prototypes are
        # extracted with (PrototypeRefresh), so r needs an eval-mode pass (descriptor_features)
        self._distilled_path_norms = batch_statistics_norms(self.backbone)
        self._descriptor_pass_logged = False
        unusable = [m for m in self._distilled_path_norms if not m.track_running_stats]
        if unusable:
            raise ValueError(
                f"{type(self).__name__}: {len(unusable)} BatchNorm layers of the backbone keep "
                "no running statistics (track_running_stats=False), so even in eval mode an "
                "instance's features, and r, depend on the other images of its batch; use a "
                "norm with running statistics (BN, SyncBN), GN, FrozenBN or none"
            )

    @staticmethod
    def build_distiller(
        cfg: CfgNode,
        shapes: dict[str, ShapeSpec],
        in_features: list[str],
        num_classes: int,
        two_stage: bool,
    ) -> GKDDistiller:
        """The distiller for the student levels ``in_features`` of a backbone with ``shapes``;
        the teacher's FPN width comes from its config, "auto" level reduction is "mean" for
        two-stage detectors (official) and "sum" for one-stage ones (official); "auto" soft
        labels are the official softmax, and no soft term for a one-class RetinaNet."""
        reduction = cfg.MODEL.GKD.LEVEL_REDUCTION
        if reduction == "auto":
            reduction = "mean" if two_stage else "sum"
        soft_label, soft_weight = cfg.MODEL.GKD.SOFT_LABEL, cfg.MODEL.GKD.SOFT_WEIGHT
        if soft_label == "auto":
            soft_label = "softmax"  # official
            if not two_stage and num_classes == 1 and soft_weight != 0:
                # the official softmax over one sigmoid logit is constant, so its KL is 0: no
                # soft term, as in the official code. The sigmoid form is an opt-in: at weight
                # 1 it cost a one-class ImageNet student AP (docs/benchmarks.md, "One-class
                # soft labels")
                soft_weight = 0.0
                logger.info(
                    "GKD soft labels: one class, so no soft-label term (the official softmax "
                    "over one logit is identically 0; MODEL.GKD.SOFT_LABEL 'auto'). To distil "
                    "the sigmoid probabilities: MODEL.GKD.SOFT_LABEL sigmoid with "
                    "MODEL.GKD.SOFT_WEIGHT 0.01 (about the size of the many-class softmax term)"
                )
        student_channels = shapes[in_features[0]].channels
        teacher_channels = student_channels
        if cfg.MODEL.TEACHER.CONFIG_FILE:
            from ..teacher import load_teacher_cfg

            teacher_channels = load_teacher_cfg(cfg).MODEL.FPN.OUT_CHANNELS
        return GKDDistiller.from_config(
            cfg,
            strides=[shapes[f].stride for f in in_features],
            student_channels=student_channels,
            teacher_channels=teacher_channels,
            num_classes=num_classes,
            level_reduction=reduction,
            soft_label=soft_label,
            soft_weight=soft_weight,
        )

    def needs_descriptor_pass(self) -> bool:
        """True when r needs its own eval-mode student pass: a BN layer of the distilled path
        is in train mode and the distiller uses prototypes."""
        return self.distiller.needs_prototypes and any(
            m.training for m in self._distilled_path_norms
        )

    def descriptor_features(self, images: Tensor) -> dict[str, Tensor] | None:
        """The student's backbone features in the normalisation of its prototypes, from which
        r (and the global loss) are computed; None when they are those of the training
        forward itself.

        The prototypes are extracted in eval mode (running statistics: an instance's features
        then depend only on the model and the image). With train-mode BN in the backbone the
        training forward's features are normalised by the batch's statistics instead, a
        different space: a student that is its own teacher would see r < 1. Then the backbone
        runs once more on ``images`` with its BN layers on running statistics, without
        gradients unless the global loss needs them (its gradient then flows through this
        pass). Call it before the training forward, which updates the running statistics
        with the batch's (r would then depend on the other images of the batch). Without
        train-mode BN (FrozenBN, GN, no norm, or BN put in eval mode) this costs nothing.

        Args:
            images: (B, 3, H, W) the normalised, padded batch of the training forward.
        """
        if not self.needs_descriptor_pass():
            return None
        start = time.perf_counter()
        with running_statistics(self._distilled_path_norms):
            with torch.set_grad_enabled(
                torch.is_grad_enabled() and self.distiller.global_weight > 0
            ):
                out = self.backbone(images)
        if not self._descriptor_pass_logged:
            self._descriptor_pass_logged = True
            n = sum(m.training for m in self._distilled_path_norms)
            logger.info(
                f"GKD: {n} BatchNorm layers of the student's backbone are in train mode, so r "
                "is computed from an extra eval-mode pass of the student backbone (as its "
                f"prototypes are): {time.perf_counter() - start:.3f}s at the first step, "
                "logged as gkd/descriptor_pass_seconds; freeze BN (FrozenBN) or use GN to skip "
                "it (docs/performance.md gives the step cost)"
            )
        get_event_storage().put_scalar("gkd/descriptor_pass_seconds", time.perf_counter() - start)
        return out

    def check_teacher(self, teacher) -> None:
        """Raise ValueError when the teacher cannot serve this student (overridden per
        detector for the heads it needs); here: the distilled FPN levels and their strides."""
        shapes = teacher.model.backbone.output_shape()
        theirs = {k: v.stride for k, v in shapes.items()}
        ours = dict(zip(self.distill_in_features, self.distiller.strides))
        bad = {k: s for k, s in ours.items() if theirs.get(k) != s}
        if bad:
            raise ValueError(
                f"The teacher's backbone gives levels {theirs} (name: stride) but the student "
                f"distils {ours}: {sorted(bad)} missing or at another stride in the teacher; use "
                "a teacher whose FPN outputs these levels (its MODEL.FPN.IN_FEATURES, top block "
                "and head IN_FEATURES), of the student's detector family"
            )

    def attach_teacher(self, teacher) -> None:
        """Attach a ``gkd_d2.teacher.FrozenTeacher`` (kept out of the module tree on purpose)."""
        self.check_teacher(teacher)
        object.__setattr__(self, "teacher", teacher)

    def require_teacher(self) -> FrozenTeacher:
        """The frozen teacher (a ``gkd_d2.teacher.FrozenTeacher``): the attached one, else built
        from the student's MODEL.TEACHER.* at the first call, with a(e)'s schedule from the
        training set; at most once.

        The one place a student is prepared for distillation. Whoever needs the teacher first
        builds it: train_net.py's Trainer when it is built (so that a bad teacher fails at once),
        the teacher check or the prototype refresh before iteration 0 in any other trainer, or
        else the first training forward. Inference and export never call it: they need no
        teacher.

        Raises:
            RuntimeError: no teacher is attached and the model was not built from a config.
            TeacherLoadError, ValueError: the teacher cannot be built or does not fit.
        """
        if self.teacher is not None:
            return self.teacher
        cfg = self.student_cfg
        if cfg is None:
            raise RuntimeError(
                f"{type(self).__name__} is training without a teacher and was not built from "
                "a config: attach one with attach_teacher(FrozenTeacher(...)), or build the "
                "model from a config with MODEL.TEACHER.CONFIG_FILE and MODEL.TEACHER.WEIGHTS"
            )
        from ..teacher import build_teacher

        # fails here, before training, on missing weights or mismatching keys/classes; off the
        # global RNGs (its random initialisation is overwritten), so that training draws the
        # same numbers whichever caller builds the teacher first
        with preserved_rng():
            teacher = build_teacher(cfg)
        self.attach_teacher(teacher)
        self.attenuation_schedule = attenuation_schedule(cfg)
        return self.teacher

    @contextlib.contextmanager
    def recording_step(self, batched_inputs: list[dict]) -> Iterator[StepRecord]:
        """Around detectron2's own training forward (``super().forward()``): collect what GKD
        needs from it in :attr:`current_step`.

        A forward pre-hook on the backbone runs the descriptor pass
        (:meth:`descriptor_features`) on the normalised batch just before the training
        forward's backbone pass, whose train-mode BN would update the running statistics
        first. The detector records the rest (instances, logits) from detectron2's public
        methods it overrides or from forward hooks.
        """
        # the teacher this step distils from, built here when no trainer or hook built it
        # before: ahead of the student's forward, so that a bad teacher fails first
        self.require_teacher()
        step = StepRecord(batched_inputs)

        def before_backbone(module: nn.Module, args: tuple) -> None:
            if step.backbone_seen:  # the descriptor pass itself runs the backbone
                return
            step.backbone_seen = True
            step.descriptors = self.descriptor_features(args[0])

        handle = self.backbone.register_forward_pre_hook(before_backbone)
        self.current_step = step
        try:
            yield step
        finally:
            handle.remove()
            self.current_step = None

    def harvest_features(
        self, step: StepRecord, features: dict[str, Tensor], image_sizes: list[tuple[int, int]]
    ) -> None:
        """Hand the features r is computed from (the descriptor pass's, else the training
        forward's ``features``), and the teacher's of the same inputs, to
        :attr:`feature_harvest`, when one is set (bank mode)."""
        if self.feature_harvest is not None:
            descriptors = features if step.descriptors is None else step.descriptors
            self.feature_harvest(
                step.batched_inputs, descriptors, image_sizes, step.teacher_features
            )

    def attenuation(self) -> float:
        """a(e) of the current iteration's epoch (1 without a schedule)."""
        if self.attenuation_schedule is None:
            return 1.0
        epoch_len, num_epochs = self.attenuation_schedule
        return linear_attenuation(get_event_storage().iter // epoch_len, num_epochs)
