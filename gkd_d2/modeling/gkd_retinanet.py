"""GKDRetinaNet: a detectron2 RetinaNet student distilled from a frozen teacher with GKD.

Only the RetinaNet-specific part lives here: the instances are the positive anchors (their
anchor boxes, with the class of the matched ground truth) and the logits are the K-way
classification logits at those anchors. The distillation itself is ``GKDDistiller``.
"""

from __future__ import annotations

import torch
from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.structures import Boxes
from detectron2.utils.events import get_event_storage
from torch import Tensor

from ..compat import permute_to_N_HWA_K
from ..distill import assign_levels
from .distilled_detector import (
    DistilledDetector,
    StepRecord,
    gt_areas_in_original,
    matched_gt_rows,
)
from .distiller import GKDDistiller


@META_ARCH_REGISTRY.register()
class GKDRetinaNet(DistilledDetector, RetinaNet):
    """RetinaNet student + GKD distiller; its frozen teacher (a RetinaNet) is built from
    MODEL.TEACHER.* when training starts.

    Training runs detectron2's own RetinaNet forward (``super().forward()``); the positive
    anchors come from its ``label_anchors``, the logits from the head's predictions that
    ``forward_training`` receives, and the distillation losses are added to its losses.

    The teacher (a ``gkd_d2.teacher.FrozenTeacher``) is a plain attribute, not a submodule:
    it is absent from ``parameters()``, ``state_dict()``, the optimizer and DDP. Inference runs
    the student alone and needs no teacher.
    """

    plain_architecture = "RetinaNet"

    @configurable
    def __init__(
        self,
        *,
        distiller: GKDDistiller,
        anchor_own_level: bool = True,
        student_cfg: CfgNode | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.init_distillation(distiller, self.head_in_features, student_cfg)
        self.anchor_own_level = anchor_own_level
        # RetinaNet's EMA loss normaliser is a plain attribute, lost on resume; kept in a buffer
        # (hence in checkpoints) so that a resumed run normalises its losses as the original
        # one (-1: not started).
        self.register_buffer("loss_normalizer_ema", torch.tensor(-1.0, dtype=torch.float64))

    @classmethod
    def from_config(cls, cfg):
        ret = RetinaNet.from_config(cfg)
        ret["distiller"] = cls.build_distiller(
            cfg,
            ret["backbone"].output_shape(),
            ret["head_in_features"],
            cfg.MODEL.RETINANET.NUM_CLASSES,
            two_stage=False,
        )
        ret["anchor_own_level"] = cfg.MODEL.GKD.ANCHOR_OWN_LEVEL
        ret["student_cfg"] = cfg
        return ret

    def check_teacher(self, teacher) -> None:
        super().check_teacher(teacher)
        if not hasattr(teacher.model, "head") or not hasattr(teacher.model, "anchor_generator"):
            raise ValueError(
                f"GKDRetinaNet distils the logits of a RetinaNet teacher; the teacher is a "
                f"{type(teacher.model).__name__} ({teacher.cfg.MODEL.META_ARCHITECTURE})"
            )

    def forward(self, batched_inputs: list[dict]):
        if not self.training:
            return super().forward(batched_inputs)
        with self.recording_step(batched_inputs):
            return super().forward(batched_inputs)

    def label_anchors(self, anchors: list[Boxes], gt_instances: list):
        # detectron2's labelling, recorded: its positive anchors are GKD's instances
        gt_labels, gt_boxes = super().label_anchors(anchors, gt_instances)
        step = self.current_step
        if step is not None:
            step.anchors, step.gt_labels, step.matched_gt_boxes = anchors, gt_labels, gt_boxes
        return gt_labels, gt_boxes

    def forward_training(self, images, features, predictions, gt_instances):
        if self.loss_normalizer_ema >= 0:
            self.loss_normalizer = float(self.loss_normalizer_ema)
        losses = super().forward_training(images, features, predictions, gt_instances)
        self.loss_normalizer_ema.fill_(self.loss_normalizer)
        step = self.current_step
        pred_logits = [permute_to_N_HWA_K(x, self.num_classes) for x in predictions[0]]
        losses.update(
            self.distillation_losses(
                step.batched_inputs,
                features,
                pred_logits,
                step.anchors,
                step.gt_labels,
                None
                if step.descriptors is None
                else [step.descriptors[f] for f in self.head_in_features],
                (step.matched_gt_boxes, gt_instances),
                step,
            )
        )
        # after the distillation: the teacher's features of this batch are known then
        self.harvest_features(step, dict(zip(self.head_in_features, features)), images.image_sizes)
        return losses

    def distillation_losses(
        self,
        batched_inputs: list[dict],
        features: list[Tensor],
        pred_logits: list[Tensor],
        anchors: list[Boxes],
        gt_labels: list[Tensor],
        descriptor_feats: list[Tensor] | None = None,
        ground_truth: tuple[list[Tensor], list] | None = None,
        step: StepRecord | None = None,
    ) -> dict[str, Tensor]:
        """GKD losses of the positive anchors; ``ground_truth``: ``label_anchors``' matched
        ground-truth boxes and the batch's ground-truth ``Instances`` (for r by size group);
        ``step``: the step's record, which gets the teacher's features (bank mode's harvest)."""
        teacher_all, _ = self.teacher.features(batched_inputs)
        if step is not None:
            step.teacher_features = teacher_all
        teacher_features = [teacher_all[f] for f in self.distill_in_features]
        teacher_logits = [
            permute_to_N_HWA_K(x, self.num_classes)
            for x in self.teacher.head_logits(teacher_features)
        ]
        labels = torch.stack(gt_labels)  # (B, R)
        positive = (labels >= 0) & (labels != self.num_classes)
        # image-major rows, the same for logits, boxes and weights (the official code mixes a
        # level-major logit order with image-major weights when the batch has several images)
        batch_idx, anchor_idx = positive.nonzero(as_tuple=True)
        boxes = Boxes.cat(anchors).tensor[anchor_idx]
        anchor_level = torch.cat(
            [
                torch.full((len(a),), i, dtype=torch.long, device=boxes.device)
                for i, a in enumerate(anchors)
            ]
        )
        levels = (
            anchor_level[anchor_idx]
            if self.anchor_own_level
            else assign_levels(boxes, len(features))
        )
        instance_gt = gt_areas = None
        if ground_truth is not None:
            matched, gt_instances = ground_truth
            instance_gt = matched_gt_rows(
                torch.stack(matched)[batch_idx, anchor_idx],
                batch_idx,
                [g.gt_boxes.tensor for g in gt_instances],
            )
            gt_areas = gt_areas_in_original(gt_instances, batched_inputs).to(boxes.device)
        losses, stats = self.distiller(
            features,
            teacher_features,
            boxes,
            batch_idx,
            labels[batch_idx, anchor_idx],
            levels,
            torch.cat(pred_logits, dim=1)[batch_idx, anchor_idx],
            torch.cat(teacher_logits, dim=1)[batch_idx, anchor_idx],
            attenuation=self.attenuation(),
            descriptor_feats=descriptor_feats,
            instance_gt=instance_gt,
            gt_areas=gt_areas,
        )
        get_event_storage().put_scalars(**stats)
        return losses
