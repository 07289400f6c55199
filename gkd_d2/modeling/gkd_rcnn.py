"""GKDRCNN: a detectron2 Faster R-CNN (FPN) student distilled from a frozen teacher with GKD.

Only the Faster R-CNN-specific part lives here: the instances are
the student's positive sampled proposals (proposal coordinates, with the class of the matched
ground truth); the logits are the (K + 1)-way box-head logits of those RoIs, the teacher's from
its own box head on its own FPN with the same RoIs; the soft-label r comes from the RoI features
averaged over the pooled grid, at the box pooler's level. The distillation itself is
``GKDDistiller``, the same as for RetinaNet.
"""

from __future__ import annotations

import torch
from detectron2.config import CfgNode, configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.modeling.roi_heads import StandardROIHeads
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import get_event_storage
from torch import Tensor

from ..compat import assign_boxes_to_levels
from ..distill import assign_levels
from .distilled_detector import (
    DistilledDetector,
    StepRecord,
    gt_areas_in_original,
    matched_gt_rows,
)
from .distiller import GKDDistiller
from .recorders import forward_inputs, forward_outputs, method_outputs


def positive_proposals(
    proposals: list[Instances], num_classes: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The positive sampled proposals of a batch, image-major.

    Args:
        proposals: per image, the RoI sampler's output (``proposal_boxes``, ``gt_classes``;
            ``gt_classes == num_classes`` marks background).
        num_classes: K.

    Returns:
        rows: (N,) int64 indices into the concatenation of all images' proposals;
        batch_idx: (N,) image of each; boxes: (N, 4) proposal boxes (XYXY, input pixels);
        classes: (N,) the matched ground-truth class.
    """
    device = proposals[0].proposal_boxes.tensor.device if proposals else torch.device("cpu")
    if not proposals:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty, torch.zeros(0, 4, device=device), empty
    classes = torch.cat([p.gt_classes for p in proposals])
    boxes = torch.cat([p.proposal_boxes.tensor for p in proposals])
    image = torch.cat(
        [torch.full((len(p),), i, dtype=torch.long, device=device) for i, p in enumerate(proposals)]
    )
    rows = torch.nonzero((classes >= 0) & (classes < num_classes)).flatten()
    return rows, image[rows], boxes[rows], classes[rows]


def record_roi_heads_inputs(step, args: tuple) -> None:
    """Keep what detectron2's ``GeneralizedRCNN`` hands its ROI heads positionally, ``(images,
    features, proposals, targets)``: the backbone features and the ground truth it already moved
    to the device."""
    step.features = args[1]
    step.gt_instances = args[3] if len(args) > 3 else None


def boxes_per_image(boxes: Tensor, batch_idx: Tensor, num_images: int) -> list[Boxes]:
    """Split image-major (N, 4) boxes into one ``Boxes`` per image (a pooler's input)."""
    counts = torch.bincount(batch_idx, minlength=num_images).tolist()
    return [Boxes(b) for b in boxes.split(counts)]


@META_ARCH_REGISTRY.register()
class GKDRCNN(DistilledDetector, GeneralizedRCNN):
    """Faster R-CNN (FPN, ``StandardROIHeads``) student + GKD distiller; its frozen teacher (a
    Faster R-CNN) is built from MODEL.TEACHER.* when training starts.

    Training runs detectron2's own forward (``super().forward()``) and records, for the
    distillation, the backbone features the ROI heads receive, the sampled proposals
    (``label_and_sample_proposals``), their pooled features and the box predictor's outputs.

    All FPN levels of the backbone are distilled (P2-P6 for detectron2's FPN); the level of a
    proposal for the feature mask follows the official rule (``assign_levels``). Training runs
    one box-head pass over the sampled RoIs, whose positive rows give both the detection loss
    and the soft-label logits (the official code runs a second pass over the positives; the
    logits are the same for box heads without batch statistics). Inference is the student's.
    """

    plain_architecture = "GeneralizedRCNN"

    @configurable
    def __init__(
        self,
        *,
        distiller: GKDDistiller,
        distill_in_features: list[str],
        student_cfg: CfgNode | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.init_distillation(distiller, distill_in_features, student_cfg)
        heads = self.roi_heads
        unknown = [f for f in heads.box_in_features if f not in distill_in_features]
        if unknown:
            raise ValueError(
                f"GKDRCNN: box-head features {unknown} are not FPN levels of the backbone "
                f"{distill_in_features}"
            )
        # the box pooler's level k is distiller level box_level_index[k]
        self.register_buffer(
            "box_level_index",
            torch.tensor([distill_in_features.index(f) for f in heads.box_in_features]),
            persistent=False,
        )

    @classmethod
    def from_config(cls, cfg):
        ret = GeneralizedRCNN.from_config(cfg)
        heads = ret["roi_heads"]
        if not isinstance(heads, StandardROIHeads) or heads.box_pooler is None:
            raise ValueError(
                f"GKDRCNN needs detectron2's StandardROIHeads with a box head "
                f"(MODEL.ROI_HEADS.NAME), not {type(heads).__name__}"
            )
        if heads.train_on_pred_boxes:
            raise ValueError("GKDRCNN does not support MODEL.ROI_BOX_HEAD.TRAIN_ON_PRED_BOXES")
        if ret["proposal_generator"] is None:
            raise ValueError("GKDRCNN needs an RPN (MODEL.PROPOSAL_GENERATOR.NAME)")
        shapes = ret["backbone"].output_shape()
        in_features = sorted(shapes, key=lambda f: shapes[f].stride)
        ret["distill_in_features"] = in_features
        ret["distiller"] = cls.build_distiller(
            cfg, shapes, in_features, cfg.MODEL.ROI_HEADS.NUM_CLASSES, two_stage=True
        )
        ret["student_cfg"] = cfg
        return ret

    def check_teacher(self, teacher) -> None:
        super().check_teacher(teacher)
        heads = getattr(teacher.model, "roi_heads", None)
        if getattr(heads, "box_pooler", None) is None:
            raise ValueError(
                f"GKDRCNN distils the box-head logits of a Faster R-CNN teacher; the teacher is "
                f"a {type(teacher.model).__name__} ({teacher.cfg.MODEL.META_ARCHITECTURE})"
            )

    def forward(self, batched_inputs: list[dict]):
        if not self.training:
            return super().forward(batched_inputs)
        heads = self.roi_heads
        with (
            self.recording_step(batched_inputs) as step,
            forward_inputs(heads, lambda args: record_roi_heads_inputs(step, args)),
            method_outputs(
                heads, "label_and_sample_proposals", lambda p: setattr(step, "proposals", p)
            ),
            forward_outputs(heads.box_pooler, lambda x: setattr(step, "pooled", x)),
            forward_outputs(heads.box_predictor, lambda x: setattr(step, "predictions", x)),
        ):
            losses = super().forward(batched_inputs)
        losses.update(
            self.distillation_losses(
                batched_inputs,
                step.features,
                step.proposals,
                step.pooled,
                step.predictions[0],
                step.descriptors,
                step.gt_instances,
                step,
            )
        )
        # after the distillation: the teacher's features of this batch are known then
        self.harvest_features(step, step.features, [p.image_size for p in step.proposals])
        return losses

    def distillation_losses(
        self,
        batched_inputs: list[dict],
        features: dict[str, Tensor],
        proposals: list[Instances],
        pooled: Tensor,
        logits: Tensor,
        descriptors: dict[str, Tensor] | None = None,
        gt_instances: list[Instances] | None = None,
        step: StepRecord | None = None,
    ) -> dict[str, Tensor]:
        """GKD losses from the sampled proposals, their pooled (R, C, h, w) features and their
        (R, K + 1) logits (rows in the proposals' image-major order); ``descriptors``: the
        backbone features r is computed from when they are not ``features``
        (``descriptor_features``); ``gt_instances``: the batch's ground truth on the model's
        device (default: the inputs' own, moved there); ``step``: the step's record, which gets
        the teacher's features (bank mode's harvest)."""
        heads = self.roi_heads
        rows, batch_idx, boxes, classes = positive_proposals(proposals, heads.num_classes)
        # each positive's matched ground truth (r by size group): the sampler's gt_boxes
        if gt_instances is None:
            gt_instances = [x["instances"].to(boxes.device) for x in batched_inputs]
        matched = torch.cat(
            [
                p.gt_boxes.tensor
                if p.has("gt_boxes")
                else p.proposal_boxes.tensor.new_zeros(len(p), 4)
                for p in proposals
            ]
        )
        instance_gt = matched_gt_rows(
            matched[rows], batch_idx, [g.gt_boxes.tensor for g in gt_instances]
        )
        gt_areas = gt_areas_in_original(gt_instances, batched_inputs).to(boxes.device)
        teacher_all, _ = self.teacher.features(batched_inputs)
        if step is not None:
            step.teacher_features = teacher_all
        per_image = boxes_per_image(boxes, batch_idx, len(proposals))
        teacher_logits, teacher_pooled = self.teacher.roi_logits(teacher_all, per_image)
        if len(heads.box_in_features) > 1:
            pooler = heads.box_pooler
            pooler_level = assign_boxes_to_levels(
                per_image,
                pooler.min_level,
                pooler.max_level,
                pooler.canonical_box_size,
                pooler.canonical_level,
            )
        else:
            pooler_level = torch.zeros(len(rows), dtype=torch.long, device=boxes.device)
        # for r only: no graph
        if descriptors is None:
            student_pooled = pooled.detach()[rows].mean(dim=(2, 3))
        else:
            with torch.no_grad():
                student_pooled = heads.box_pooler(
                    [descriptors[f] for f in heads.box_in_features], per_image
                ).mean(dim=(2, 3))
        losses, stats = self.distiller(
            [features[f] for f in self.distill_in_features],
            [teacher_all[f] for f in self.distill_in_features],
            boxes,
            batch_idx,
            classes,
            assign_levels(boxes, len(self.distill_in_features)),
            logits[rows],
            teacher_logits,
            attenuation=self.attenuation(),
            soft_descriptors=(
                student_pooled,
                teacher_pooled,
                self.box_level_index[pooler_level],
            ),
            descriptor_feats=(
                None if descriptors is None else [descriptors[f] for f in self.distill_in_features]
            ),
            instance_gt=instance_gt,
            gt_areas=gt_areas,
        )
        get_event_storage().put_scalars(**stats)
        return losses
