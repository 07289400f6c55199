"""What every GKD student detector shares: the teacher slot, a(e), and building its distiller.

A GKD meta-architecture is ``class GKDX(DistilledDetector, X)``: it only says which instances
(boxes, classes, levels) and which logits go to the shared :class:`GKDDistiller`.
"""

from __future__ import annotations

from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.utils.events import get_event_storage

from ..distill import linear_attenuation
from .distiller import GKDDistiller


class DistilledDetector:
    """Mixin for a detectron2 detector with a ``distiller`` and a frozen teacher.

    Subclasses call :meth:`_init_distillation` in ``__init__`` and set ``distill_in_features``,
    the names of the FPN levels distilled (the same names in the teacher's backbone).
    """

    distill_in_features: list[str]
    # the detectron2 meta-architecture of the student alone (export, controls)
    plain_architecture: str

    def _init_distillation(self, distiller: GKDDistiller, distill_in_features: list[str]) -> None:
        self.distiller = distiller
        self.distill_in_features = list(distill_in_features)
        # the teacher is a plain attribute, not a submodule: absent from parameters(),
        # state_dict(), the optimizer and DDP (attach_teacher)
        object.__setattr__(self, "teacher", None)
        # (iterations per epoch, epochs) for a(e); set by the trainer. None: a = 1.
        self.attenuation_schedule: tuple[int, int] | None = None

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
        two-stage detectors (official) and "sum" for one-stage ones (official)."""
        reduction = cfg.MODEL.GKD.LEVEL_REDUCTION
        if reduction == "auto":
            reduction = "mean" if two_stage else "sum"
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
        )

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

    def require_teacher(self) -> None:
        if self.teacher is None:
            raise RuntimeError(
                f"{type(self).__name__} is training without a teacher: attach one with "
                "attach_teacher(), as gkd_d2.engine.Trainer does from MODEL.TEACHER.*"
            )

    def attenuation(self) -> float:
        """a(e) of the current iteration's epoch (1 without a schedule)."""
        if self.attenuation_schedule is None:
            return 1.0
        epoch_len, num_epochs = self.attenuation_schedule
        return linear_attenuation(get_event_storage().iter // epoch_len, num_epochs)
