"""The GKD distiller: adapters and the RDM losses over the prototype bank, shared by all
detectors.

Detector-specific code only says which instances (boxes, classes, levels) and which logits;
everything else happens here, through the pure functions of ``gkd_d2.distill``. A forward
computes its losses in one path (r, the instances' weights, each term); what it reports besides
(statistics of r, the instance record) comes after, from ``distill_diagnostics``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator

import torch
from detectron2.config import CfgNode
from torch import Tensor, nn

from ..distill import (
    FG_OVERLAP_RULES,
    SOFT_LABEL_FORMS,
    box_crop_mean,
    decoupled_imitation_losses,
    foreground_mask,
    global_alignment_loss,
    global_representation,
    robustness_weights,
    soft_label_kl,
)
from .distill_diagnostics import (
    SIZE_GROUPS,
    InstanceRecord,
    WeightedTerms,
    distillation_stats,
    r_by_size,
    r_effects,
    r_stats,
)
from .extra_losses import DistillInputs, build_extra_losses
from .prototype_bank import PrototypeBank

# the diagnostics' names as tools and tests import them from this module
__all__ = ["SIZE_GROUPS", "GKDDistiller", "InstanceBatch", "InstanceRecord"]
_r_stats, _r_by_size = r_stats, r_by_size


@dataclasses.dataclass
class InstanceBatch:
    """One batch's instances as a distiller forward weighs them (rows image-major, fp32)."""

    boxes: Tensor  # (N, 4) XYXY in input pixels
    batch_idx: Tensor  # (N,) image of each
    classes: Tensor  # (N,)
    levels: Tensor  # (N,) assigned FPN level of each
    student_logits: Tensor  # (N, K')
    teacher_logits: Tensor  # (N, K')
    # (N, C_S) student, (N, C_T) teacher descriptors and (N,) levels of the soft-label r, or None
    soft_descriptors: tuple[Tensor, Tensor, Tensor] | None = None

    def __len__(self) -> int:
        return len(self.boxes)


class GKDDistiller(PrototypeBank):
    """Per-level adapters (student -> teacher channels) and the RDM losses, over the prototype
    bank it carries as model state (:class:`PrototypeBank`: its buffers, the PGM instance
    sample, the refresh iteration).
    """

    def __init__(
        self,
        *,
        strides: list[int],
        student_channels: int,
        teacher_channels: int,
        num_classes: int,
        num_prototypes: int,
        robust: bool = True,
        adapter_kernel: int = 3,
        clamp_r: bool = True,
        temperature: float = 2.0,
        soft_label: str = "softmax",
        fg_weight: float = 1.0,
        bg_weight: float = 4.0,
        soft_weight: float = 1.0,
        global_weight: float = 0.0,
        level_reduction: str = "sum",
        extra_terms: nn.ModuleList | None = None,
        extra_weights: list[float] | None = None,
        shuffle_r: bool = False,
        shuffle_seed: int = 0,
        fg_overlap: str = "max",
    ):
        if level_reduction not in ("sum", "mean"):
            raise ValueError(
                f"MODEL.GKD.LEVEL_REDUCTION must be 'sum' or 'mean', not {level_reduction!r}"
            )
        super().__init__(
            len(strides), num_classes, num_prototypes, student_channels, teacher_channels
        )
        self.strides = list(strides)
        if adapter_kernel not in (1, 3):
            raise ValueError(f"MODEL.GKD.ADAPTER_KERNEL must be 1 or 3, not {adapter_kernel}")
        # 3x3, padding 1, no activation: keeps the map size (the official adapter);
        # 1x1 is the cheaper option (about a quarter of a Faster R-CNN step goes to 3x3
        # adapters on P2 at 256 channels on the CPU: docs/performance.md)
        self.adapters = nn.ModuleList(
            nn.Conv2d(
                student_channels, teacher_channels, adapter_kernel, padding=adapter_kernel // 2
            )
            for _ in self.strides
        )
        self.robust, self.clamp_r, self.temperature = robust, clamp_r, temperature
        if soft_label not in SOFT_LABEL_FORMS:
            raise ValueError(
                f"MODEL.GKD.SOFT_LABEL must be 'auto' or one of {SOFT_LABEL_FORMS}, not "
                f"{soft_label!r}"
            )
        self.soft_label = soft_label
        if fg_overlap not in FG_OVERLAP_RULES:
            raise ValueError(
                f"MODEL.GKD.FG_OVERLAP must be one of {FG_OVERLAP_RULES}, not {fg_overlap!r}"
            )
        self.fg_overlap = fg_overlap
        # diagnostics: called with an InstanceRecord by every forward (recording_instances)
        self.instance_sink: Callable[[InstanceRecord], None] | None = None
        self.fg_weight, self.bg_weight = fg_weight, bg_weight
        self.soft_weight, self.global_weight = soft_weight, global_weight
        self.level_reduction = level_reduction
        # terms of other methods combined with GKD (MODEL.GKD.EXTRA_LOSSES)
        self.extra_terms = extra_terms if extra_terms is not None else nn.ModuleList()
        self.extra_weights = list(extra_weights or [1.0] * len(self.extra_terms))
        # the shuffled-r control (MODEL.GKD.SHUFFLE_R): r's values permuted among a batch's
        # instances before they weight anything; the permutation's seed advances with a
        # counter kept in the state dict, so that a resumed run draws what it would have
        self.shuffle_r, self.shuffle_seed = shuffle_r, shuffle_seed
        if shuffle_r:
            if not robust or global_weight > 0:
                raise ValueError(
                    "MODEL.GKD.SHUFFLE_R is the control of GKD's r weights: it needs "
                    f"ROBUST_WEIGHTS True and GLOBAL_WEIGHT 0 (got {robust}, {global_weight})"
                )
            self.register_buffer("shuffle_calls", torch.tensor(0, dtype=torch.long))
        if len(self.extra_weights) != len(self.extra_terms):
            raise ValueError(
                f"GKD distiller: {len(self.extra_terms)} extra terms, "
                f"{len(self.extra_weights)} weights"
            )

    @classmethod
    def from_config(
        cls,
        cfg: CfgNode,
        strides: list[int],
        student_channels: int,
        teacher_channels: int,
        num_classes: int,
        level_reduction: str,
        soft_label: str,
        soft_weight: float,
    ) -> GKDDistiller:
        """The distiller of ``MODEL.GKD.*``; ``level_reduction``, ``soft_label`` and
        ``soft_weight`` are the detector's resolved ``LEVEL_REDUCTION``, ``SOFT_LABEL`` and
        ``SOFT_WEIGHT`` ("auto" resolved)."""
        g = cfg.MODEL.GKD
        extra_terms, extra_weights = build_extra_losses(
            cfg,
            strides=strides,
            student_channels=student_channels,
            teacher_channels=teacher_channels,
            level_reduction=level_reduction,
        )
        return cls(
            strides=strides,
            student_channels=student_channels,
            teacher_channels=teacher_channels,
            num_classes=num_classes,
            num_prototypes=g.NUM_PROTOTYPES,
            robust=g.ROBUST_WEIGHTS,
            adapter_kernel=g.ADAPTER_KERNEL,
            clamp_r=g.CLAMP_R,
            temperature=g.TEMPERATURE,
            soft_label=soft_label,
            fg_weight=g.FG_WEIGHT,
            bg_weight=g.BG_WEIGHT,
            soft_weight=soft_weight,
            global_weight=g.GLOBAL_WEIGHT,
            level_reduction=level_reduction,
            extra_terms=extra_terms,
            extra_weights=extra_weights,
            shuffle_r=g.SHUFFLE_R,
            shuffle_seed=g.SAMPLE_SEED,
            fg_overlap=g.FG_OVERLAP,
        )

    @property
    def loss_names(self) -> list[str]:
        """The names of the losses that :meth:`forward` returns (its terms of nonzero weight)."""
        names = [
            name
            for name, weight in (
                ("loss_gkd_fg", self.fg_weight),
                ("loss_gkd_bg", self.bg_weight),
                ("loss_gkd_soft", self.soft_weight),
                ("loss_gkd_global", self.global_weight),
            )
            if weight != 0
        ]
        return names + [t.loss_name for t, w in zip(self.extra_terms, self.extra_weights) if w != 0]

    @property
    def needs_prototypes(self) -> bool:
        """False for the local-only baseline (no r, no global loss): no PGM needed."""
        return self.robust or self.global_weight > 0

    def robustness_at(
        self, feats_s: Tensor, feats_t: Tensor, classes: Tensor, levels: Tensor
    ) -> Tensor:
        """r of N instance descriptors, each against the prototypes of its own level.

        Args:
            feats_s, feats_t: (N, C_S), (N, C_T) raw student / teacher descriptors.
            classes, levels: (N,) class and level index of each.

        Returns:
            (N,) detached robustness weights.
        """
        r = feats_s.new_ones(len(classes))
        for lvl in torch.unique(levels).tolist():
            sel = levels == lvl
            ps, pt, starts = self.bank(lvl)
            r[sel] = robustness_weights(
                feats_s[sel], feats_t[sel], ps, pt, classes[sel], starts, clamp=self.clamp_r
            )
        return r.detach()

    @contextlib.contextmanager
    def recording_instances(self, sink: Callable[[InstanceRecord], None]) -> Iterator[None]:
        """Call ``sink`` with the :class:`InstanceRecord` of every forward inside the context:
        each instance's r and weight exactly as that forward computed them."""
        previous, self.instance_sink = self.instance_sink, sink
        try:
            yield
        finally:
            self.instance_sink = previous

    # ---- the losses ----------------------------------------------------------------------------
    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(
        self,
        student_feats: list[Tensor],
        teacher_feats: list[Tensor],
        boxes: Tensor,
        batch_idx: Tensor,
        classes: Tensor,
        levels: Tensor,
        student_logits: Tensor,
        teacher_logits: Tensor,
        attenuation: float = 1.0,
        soft_descriptors: tuple[Tensor, Tensor, Tensor] | None = None,
        descriptor_feats: list[Tensor] | None = None,
        instance_gt: Tensor | None = None,
        gt_areas: Tensor | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Distillation losses of one batch.

        Args:
            student_feats, teacher_feats: per level (B, C_S, H, W) / (B, C_T, H, W) FPN maps.
            boxes: (N, 4) XYXY instance boxes (positive anchors / proposals) in input pixels.
            batch_idx, classes, levels: (N,) image, class and assigned level of each instance.
            student_logits, teacher_logits: (N, K') classification logits of the same instances.
            attenuation: a(e), applied to the feature and global terms (not to soft labels).
            soft_descriptors: optional (N, C_S) student, (N, C_T) teacher descriptors and (N,)
                level indices from which the soft-label r is computed (Faster R-CNN: the RoI
                features averaged over the pooled grid, at the pooler's level); default: the
                box-crop r at the instance's own level, as for the feature mask.
            descriptor_feats: per level (B, C_S, H, W) student maps from which r and the
                global loss are pooled, in the normalisation of the student's prototypes
                (an eval-mode pass when the student has train-mode BatchNorm:
                ``DistilledDetector.descriptor_features``); default: ``student_feats``.
            instance_gt: optional (N,) int64 row of each instance's matched ground truth among
                the batch's ground truths (image-major), for r by size group.
            gt_areas: (G,) area of each of the batch's ground truths in original image pixels
                (COCO's size groups), with ``instance_gt``.

        Returns:
            losses: ``loss_gkd_fg``, ``loss_gkd_bg``, ``loss_gkd_soft``, ``loss_gkd_global``
            and the extra terms' losses, each only when its weight is not 0; stats (floats,
            docs/usage.md "Logged scalars"): the instance count; with r: its mean / min /
            p10 / median / share below 0.5, its mean per COCO size group present in the batch
            (with ``instance_gt``), and ``gkd/r_effect_fg`` / ``gkd/r_effect_soft``, each term
            with the weights divided by the same term with weight 1 on this batch.
            Computed in fp32 whatever the inputs' dtype or autocast (AMP) says.
        """
        # the math in fp32 under AMP (autocast is off for this method: see the decorators):
        # fp16 squared feature differences, cosines and KLs overflow or lose the small terms;
        # the adapters then run in fp32 too (cheap). .float() of an fp32 tensor is itself.
        student_feats = [f.float() for f in student_feats]
        teacher_feats = [f.float() for f in teacher_feats]
        descriptor_feats = (
            student_feats if descriptor_feats is None else [f.float() for f in descriptor_feats]
        )
        if soft_descriptors is not None:
            s_desc, t_desc, soft_levels = soft_descriptors
            soft_descriptors = (s_desc.float(), t_desc.float(), soft_levels)
        batch = InstanceBatch(
            boxes.float(),
            batch_idx,
            classes,
            levels,
            student_logits.float(),
            teacher_logits.float(),
            soft_descriptors,
        )
        L = len(self.strides)
        if len(student_feats) != L or len(teacher_feats) != L:
            raise ValueError(
                f"GKD distiller: {len(student_feats)} student and {len(teacher_feats)} teacher "
                f"FPN levels, configured for {L}"
            )
        zero = student_feats[0].sum() * 0.0
        r, global_total = self.robustness_and_global_loss(
            descriptor_feats, teacher_feats, batch, zero
        )
        weights = r if self.robust else torch.ones_like(r)
        perm = self._shuffle_permutation(len(batch), r.device) if self.shuffle_r else None
        if perm is not None:
            weights = weights[perm]

        losses: dict[str, Tensor] = {}
        terms = WeightedTerms()  # the weighted sums the diagnostics compare with weight 1
        if self.fg_weight != 0 or self.bg_weight != 0:
            terms.fg, bg_total, terms.fg_unit = self.imitation_sums(
                student_feats, teacher_feats, batch, weights, zero
            )
            fg_total = terms.fg
            if self.level_reduction == "mean":
                fg_total, bg_total = fg_total / L, bg_total / L
            if self.fg_weight != 0:
                losses["loss_gkd_fg"] = self.fg_weight * attenuation * fg_total
            if self.bg_weight != 0:
                losses["loss_gkd_bg"] = self.bg_weight * attenuation * bg_total
        soft_r = None
        if self.soft_weight != 0:
            soft_w, soft_r = self.soft_label_weights(batch, weights, perm)
            terms.soft = soft_label_kl(
                batch.student_logits,
                batch.teacher_logits,
                soft_w,
                self.temperature,
                self.soft_label,
            )
            losses["loss_gkd_soft"] = self.soft_weight * terms.soft
        if self.global_weight > 0:
            losses["loss_gkd_global"] = self.global_weight * attenuation * global_total
        losses.update(self.extra_losses(student_feats, teacher_feats, batch, weights, attenuation))

        # what the forward reports besides its losses: read from them, feeding none
        if self.instance_sink is not None:
            self.instance_sink(
                InstanceRecord(
                    boxes=batch.boxes,
                    batch_idx=batch_idx,
                    classes=classes,
                    levels=levels,
                    r=r,
                    weights=weights.detach(),
                    soft_r=soft_r,
                    instance_gt=instance_gt,
                    map_shapes=[(f.shape[0], f.shape[2], f.shape[3]) for f in teacher_feats],
                )
            )
        return losses, self.diagnostics(batch, r, soft_r, terms, instance_gt, gt_areas)

    def robustness_and_global_loss(
        self,
        descriptor_feats: list[Tensor],
        teacher_feats: list[Tensor],
        batch: InstanceBatch,
        zero: Tensor,
    ) -> tuple[Tensor, Tensor]:
        """r of every instance at its own level and the global loss, from box-crop means of
        the raw (un-adapted) maps (paper section 3.3, eqs. 5-8), the student's in the
        normalisation its prototypes were extracted with.

        With the global loss, every instance is pooled at every level (its representation on
        each level's prototypes); else each only at its own level.

        Args:
            descriptor_feats, teacher_feats: per level (B, C_S, H, W) / (B, C_T, H, W) maps.
            zero: () the loss sums' start, in the graph of the student's maps.

        Returns:
            r: (N,) detached weights (1 without prototypes); the global loss, summed over
            the levels (``zero`` without it).
        """
        boxes, batch_idx, classes, levels = (
            batch.boxes,
            batch.batch_idx,
            batch.classes,
            batch.levels,
        )
        use_global = self.global_weight > 0
        r = boxes.new_ones(len(boxes))
        global_total = zero
        if not self.needs_prototypes:
            return r, global_total
        for lvl in range(len(self.strides)):
            sel = torch.ones_like(levels, dtype=torch.bool) if use_global else levels == lvl
            if not bool(sel.any()):
                continue
            ps, pt, starts = self.bank(lvl)
            # the instances of this level (with the global loss: every instance, here)
            at = (boxes[sel], batch_idx[sel], self.strides[lvl])
            with torch.set_grad_enabled(use_global and torch.is_grad_enabled()):
                s = box_crop_mean(descriptor_feats[lvl], *at)
            with torch.no_grad():
                t = box_crop_mean(teacher_feats[lvl], *at)
            r_lvl = robustness_weights(s, t, ps, pt, classes[sel], starts, clamp=self.clamp_r)
            own = levels[sel] == lvl
            r[sel.nonzero().flatten()[own]] = r_lvl[own]
            if use_global and ps.shape[0] > 0:
                with torch.no_grad():
                    rep_t = global_representation(t, pt)
                global_total = global_total + global_alignment_loss(
                    global_representation(s, ps), rep_t, r_lvl
                )
        return r, global_total

    def imitation_sums(
        self,
        student_feats: list[Tensor],
        teacher_feats: list[Tensor],
        batch: InstanceBatch,
        weights: Tensor,
        zero: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The decoupled feature imitation of the adapted student maps, summed over the levels
        (paper section 3.3, eq. 9; each instance masks its own level's map with its weight).

        Args:
            weights: (N,) each instance's weight in the foreground mask.

        Returns:
            () fg and bg sums, and the fg sum with weight 1 (for ``gkd/r_effect_fg``).
        """
        fg_total = bg_total = fg_unit_total = zero
        for lvl in range(len(self.strides)):
            sel = batch.levels == lvl
            a_map, t_map = self.adapters[lvl](student_feats[lvl]), teacher_feats[lvl]
            if a_map.shape != t_map.shape:
                raise ValueError(
                    f"GKD distiller, level {lvl}: adapted student map {tuple(a_map.shape)} "
                    f"and teacher map {tuple(t_map.shape)} differ"
                )
            B, _, H, W = t_map.shape
            mask, covered = foreground_mask(
                batch.boxes[sel],
                batch.batch_idx[sel],
                weights[sel],
                self.strides[lvl],
                (B, H, W),
                self.fg_overlap,
            )
            fg, bg, fg_unit = decoupled_imitation_losses(a_map, t_map, mask, covered)
            fg_total, bg_total = fg_total + fg, bg_total + bg
            fg_unit_total = fg_unit_total + fg_unit
        return fg_total, bg_total, fg_unit_total

    def soft_label_weights(
        self, batch: InstanceBatch, weights: Tensor, perm: Tensor | None
    ) -> tuple[Tensor, Tensor | None]:
        """The soft labels' instance weights and their own r: the feature mask's ``weights``,
        or with soft descriptors (Faster R-CNN's RoI features) r computed from those (shuffled
        as ``weights`` are, by ``perm``).

        Returns:
            (N,) weights; (N,) the soft labels' own r, or None.
        """
        if batch.soft_descriptors is None or not self.robust:
            return weights, None
        s_desc, t_desc, soft_levels = batch.soft_descriptors
        soft_r = self.robustness_at(s_desc, t_desc, batch.classes, soft_levels)
        return (soft_r if perm is None else soft_r[perm]), soft_r

    def extra_losses(
        self,
        student_feats: list[Tensor],
        teacher_feats: list[Tensor],
        batch: InstanceBatch,
        weights: Tensor,
        attenuation: float,
    ) -> dict[str, Tensor]:
        """The losses of the extra terms of nonzero weight (MODEL.GKD.EXTRA_LOSSES)."""
        if not len(self.extra_terms):
            return {}
        inputs = DistillInputs(
            student_feats=student_feats,
            teacher_feats=teacher_feats,
            strides=self.strides,
            boxes=batch.boxes,
            batch_idx=batch.batch_idx,
            classes=batch.classes,
            levels=batch.levels,
            weights=weights,
            student_logits=batch.student_logits,
            teacher_logits=batch.teacher_logits,
            attenuation=attenuation,
        )
        return {
            term.loss_name: w * term(inputs)
            for term, w in zip(self.extra_terms, self.extra_weights)
            if w != 0
        }

    # ---- what a forward reports ----------------------------------------------------------------
    def diagnostics(
        self,
        batch: InstanceBatch,
        r: Tensor,
        soft_r: Tensor | None,
        terms: WeightedTerms,
        instance_gt: Tensor | None,
        gt_areas: Tensor | None,
    ) -> dict[str, float]:
        """The scalars of a forward (:func:`distill_diagnostics.distillation_stats`), from the
        detached values of its loss path; the r effects need the soft-label KL at weight 1."""
        effects = {}
        if self.robust and len(batch) > 0:
            soft_unit = None
            if terms.soft is not None:
                with torch.no_grad():
                    soft_unit = soft_label_kl(
                        batch.student_logits,
                        batch.teacher_logits,
                        torch.ones_like(r),
                        self.temperature,
                        self.soft_label,
                    )
            effects = r_effects(terms, soft_unit)
        return distillation_stats(
            r if self.needs_prototypes else None,
            soft_r,
            effects,
            len(batch),
            instance_gt,
            gt_areas,
        )

    def _shuffle_permutation(self, n: int, device: torch.device) -> Tensor:
        """(n,) a random permutation of a batch's instances, the same on every rank for a given
        call (its own generator: torch's global RNG, which samples RoIs, is not touched)."""
        g = torch.Generator().manual_seed(self.shuffle_seed + int(self.shuffle_calls))
        self.shuffle_calls += 1
        return torch.randperm(n, generator=g).to(device)
