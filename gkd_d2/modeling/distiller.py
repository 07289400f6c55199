"""The GKD distiller: prototype bank, adapters and the RDM losses, shared by all detectors.

Detector-specific code only says which instances (boxes, classes, levels) and which logits;
everything else happens here, through the pure functions of ``gkd_d2.distill``.
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
from .extra_losses import DistillInputs, build_extra_losses

# COCO's size groups of an instance, by the area of its ground truth in original pixels:
# small < 32^2 <= medium < 96^2 <= large
SIZE_GROUPS = {
    "small": (0.0, 32.0**2),
    "medium": (32.0**2, 96.0**2),
    "large": (96.0**2, float("inf")),
}


@dataclasses.dataclass
class InstanceRecord:
    """What one distiller forward weighted, instance by instance (for diagnostics: the r that
    trained, :meth:`GKDDistiller.recording_instances`).

    Rows are the forward's instances (positive anchors / positive proposals), image-major.
    """

    boxes: Tensor  # (N, 4) XYXY in input pixels
    batch_idx: Tensor  # (N,) image of each
    classes: Tensor  # (N,)
    levels: Tensor  # (N,) level of each for the feature mask
    r: Tensor  # (N,) r of the feature mask (1 without prototypes)
    weights: Tensor  # (N,) the fg-mask weights: r, ones (local-only KD), or r shuffled
    soft_r: Tensor | None  # (N,) r of the soft labels when it has its own descriptors
    instance_gt: Tensor | None  # (N,) the matched ground truth's row in the batch, or None
    map_shapes: list[tuple[int, int, int]]  # (B, H, W) of each level's maps


class GKDDistiller(nn.Module):
    """Per-level adapters (student -> teacher channels) and the prototype bank, as model state.

    The bank is stored in fixed-shape buffers, so it lives in every checkpoint and loads
    strictly: ``protos_s`` (L, K, M, C_S), ``protos_t`` (L, K, M, C_T) and ``proto_counts``
    (L, K), the number of valid prototypes of each (level, class). ``proto_index`` (L, K, M)
    int64 says which instance each prototype is: its row in the PGM instance sample (the
    ``PrototypeRefresh`` hook's ``instances``, kept in the checkpoint's hook state), -1 for an
    empty slot or an unknown instance (banks set without an index, checkpoints saved before
    the index existed). ``bank_iter`` is the training iteration whose refresh produced the bank
    (-1: none yet).
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
        super().__init__()
        if level_reduction not in ("sum", "mean"):
            raise ValueError(
                f"MODEL.GKD.LEVEL_REDUCTION must be 'sum' or 'mean', not {level_reduction!r}"
            )
        self.strides = list(strides)
        L, K, M = len(strides), num_classes, num_prototypes
        if adapter_kernel not in (1, 3):
            raise ValueError(f"MODEL.GKD.ADAPTER_KERNEL must be 1 or 3, not {adapter_kernel}")
        # 3x3, padding 1, no activation: keeps the map size (the official adapter);
        # 1x1 is the cheaper option (about a quarter of a Faster R-CNN step goes to 3x3
        # adapters on P2 at 256 channels on the CPU: docs/performance.md)
        self.adapters = nn.ModuleList(
            nn.Conv2d(
                student_channels, teacher_channels, adapter_kernel, padding=adapter_kernel // 2
            )
            for _ in range(L)
        )
        self.register_buffer("protos_s", torch.zeros(L, K, M, student_channels))
        self.register_buffer("protos_t", torch.zeros(L, K, M, teacher_channels))
        self.register_buffer("proto_counts", torch.zeros(L, K, dtype=torch.long))
        self.register_buffer("proto_index", torch.full((L, K, M), -1, dtype=torch.long))
        self.register_buffer("bank_iter", torch.tensor(-1, dtype=torch.long))
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

    # ---- the bank ------------------------------------------------------------------------------
    @torch.no_grad()
    def set_bank(
        self,
        level: int,
        cls: int,
        feats_s: Tensor,
        feats_t: Tensor,
        index: Tensor | None = None,
    ) -> None:
        """Store the prototypes of one (level, class).

        Args:
            level, cls: the slot.
            feats_s, feats_t: (m, C_S) / (m, C_T) prototype features, m <= M.
            index: optional (m,) int64 row of each prototype in the PGM instance sample (what
                the pictures of ``tools/visualize_prototypes.py`` show); None stores -1.
        """
        m = feats_s.shape[0]
        if index is not None and index.shape != (m,):
            raise ValueError(f"set_bank: {m} prototypes but an index of shape {tuple(index.shape)}")
        self.protos_s[level, cls].zero_()
        self.protos_t[level, cls].zero_()
        self.proto_index[level, cls].fill_(-1)
        self.protos_s[level, cls, :m] = feats_s
        self.protos_t[level, cls, :m] = feats_t
        if index is not None:
            self.proto_index[level, cls, :m] = index.to(self.proto_index)
        self.proto_counts[level, cls] = m

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints saved before proto_index existed still load (strictly too): their
        # prototypes are real, only which instances they are is unknown (-1)
        key = prefix + "proto_index"
        if key not in state_dict and prefix + "protos_s" in state_dict:
            state_dict[key] = torch.full_like(self.proto_index, -1)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def bank(self, level: int) -> tuple[Tensor, Tensor, Tensor]:
        """Valid prototypes of a level: (P, C_S), (P, C_T) in class blocks, starts (K + 1,)."""
        counts = self.proto_counts[level]
        M = self.protos_s.shape[2]
        valid = torch.arange(M, device=counts.device)[None, :] < counts[:, None]  # (K, M)
        starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return self.protos_s[level][valid], self.protos_t[level][valid], starts

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
        boxes = boxes.float()
        student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
        if soft_descriptors is not None:
            s_desc, t_desc, soft_levels = soft_descriptors
            soft_descriptors = (s_desc.float(), t_desc.float(), soft_levels)
        L, N = len(self.strides), len(boxes)
        if len(student_feats) != L or len(teacher_feats) != L:
            raise ValueError(
                f"GKD distiller: {len(student_feats)} student and {len(teacher_feats)} teacher "
                f"FPN levels, configured for {L}"
            )
        zero = student_feats[0].sum() * 0.0
        use_global = self.global_weight > 0
        # r of every instance at its own level (and, for the global loss, every instance at
        # every level), from box-crop means of the raw (un-adapted) maps, the student's in the
        # normalisation its prototypes were extracted with
        r = boxes.new_ones(N)
        global_total = zero
        if self.needs_prototypes:
            for lvl in range(L):
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
        weights = r if self.robust else torch.ones_like(r)
        perm = self._shuffle_permutation(N, r.device) if self.shuffle_r else None
        if perm is not None:
            weights = weights[perm]

        losses: dict[str, Tensor] = {}
        effects: dict[str, Tensor] = {}  # each term with the weights / with weight 1
        if self.fg_weight != 0 or self.bg_weight != 0:
            fg_total = bg_total = fg_unit_total = zero
            for lvl in range(L):
                sel = levels == lvl
                a_map, t_map = self.adapters[lvl](student_feats[lvl]), teacher_feats[lvl]
                if a_map.shape != t_map.shape:
                    raise ValueError(
                        f"GKD distiller, level {lvl}: adapted student map {tuple(a_map.shape)} "
                        f"and teacher map {tuple(t_map.shape)} differ"
                    )
                B, _, H, W = t_map.shape
                mask, covered = foreground_mask(
                    boxes[sel],
                    batch_idx[sel],
                    weights[sel],
                    self.strides[lvl],
                    (B, H, W),
                    self.fg_overlap,
                )
                fg, bg, fg_unit = decoupled_imitation_losses(a_map, t_map, mask, covered)
                fg_total, bg_total = fg_total + fg, bg_total + bg
                fg_unit_total = fg_unit_total + fg_unit
            effects["fg"] = fg_total.detach() / fg_unit_total.clamp(min=1e-12)
            if self.level_reduction == "mean":
                fg_total, bg_total = fg_total / L, bg_total / L
            if self.fg_weight != 0:
                losses["loss_gkd_fg"] = self.fg_weight * attenuation * fg_total
            if self.bg_weight != 0:
                losses["loss_gkd_bg"] = self.bg_weight * attenuation * bg_total
        soft_r = None
        if self.soft_weight != 0:
            soft_w = weights
            if soft_descriptors is not None and self.robust:
                soft_r = self.robustness_at(*soft_descriptors[:2], classes, soft_descriptors[2])
                soft_w = soft_r if perm is None else soft_r[perm]
            soft = soft_label_kl(
                student_logits, teacher_logits, soft_w, self.temperature, self.soft_label
            )
            losses["loss_gkd_soft"] = self.soft_weight * soft
            with torch.no_grad():
                soft_unit = soft_label_kl(
                    student_logits,
                    teacher_logits,
                    torch.ones_like(soft_w),
                    self.temperature,
                    self.soft_label,
                )
            effects["soft"] = soft.detach() / soft_unit.clamp(min=1e-12)
        if use_global:
            losses["loss_gkd_global"] = self.global_weight * attenuation * global_total
        if len(self.extra_terms):
            inputs = DistillInputs(
                student_feats=student_feats,
                teacher_feats=teacher_feats,
                strides=self.strides,
                boxes=boxes,
                batch_idx=batch_idx,
                classes=classes,
                levels=levels,
                weights=weights,
                student_logits=student_logits,
                teacher_logits=teacher_logits,
                attenuation=attenuation,
            )
            for term, w in zip(self.extra_terms, self.extra_weights):
                if w != 0:
                    losses[term.loss_name] = w * term(inputs)

        if self.instance_sink is not None:
            self.instance_sink(
                InstanceRecord(
                    boxes=boxes,
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
        stats = {"gkd/num_instances": float(N)}
        if self.needs_prototypes:
            stats.update(_r_stats("gkd/r", r))
            if instance_gt is not None and gt_areas is not None:
                stats.update(_r_by_size("gkd/r_mean", r, instance_gt, gt_areas))
            if self.robust and N > 0:
                # one transfer for both ratios
                names = sorted(effects)
                values = torch.stack([effects[k] for k in names]).tolist() if names else []
                stats.update({f"gkd/r_effect_{k}": v for k, v in zip(names, values)})
        if soft_r is not None:
            stats.update(_r_stats("gkd/r_soft", soft_r))
        return losses, stats

    def _shuffle_permutation(self, n: int, device: torch.device) -> Tensor:
        """(n,) a random permutation of a batch's instances, the same on every rank for a given
        call (its own generator: torch's global RNG, which samples RoIs, is not touched)."""
        g = torch.Generator().manual_seed(self.shuffle_seed + int(self.shuffle_calls))
        self.shuffle_calls += 1
        return torch.randperm(n, generator=g).to(device)


def _r_by_size(prefix: str, r: Tensor, instance_gt: Tensor, gt_areas: Tensor) -> dict[str, float]:
    """Mean r of the instances of each COCO size group (by their ground truth's area in
    original pixels), for the groups present: ``{prefix}_small`` etc.

    Args:
        r: (N,) robustness weights.
        instance_gt: (N,) int64 row of each instance's ground truth in ``gt_areas``; -1 (no
            ground truth found) puts the instance in no group, rather than indexing from the end.
        gt_areas: (G,) areas of the batch's ground truths.
    """
    if len(r) == 0:
        return {}
    known = instance_gt >= 0
    areas = gt_areas.float()[instance_gt.clamp(min=0)] if len(gt_areas) else r.new_zeros(len(r))
    lows = r.new_tensor([lo for lo, _ in SIZE_GROUPS.values()])
    group = (areas[:, None] >= lows[None, :]).sum(dim=1) - 1  # (N,) 0 small .. 2 large
    unknown = len(SIZE_GROUPS)  # an extra bin for instances without ground truth, then dropped
    group = torch.where(known, group, torch.full_like(group, unknown))
    counts = torch.bincount(group, minlength=unknown + 1).to(r.dtype)[:unknown]
    sums = torch.zeros(unknown + 1, dtype=r.dtype, device=r.device).index_add_(0, group, r)
    counts_l, sums_l = torch.stack([counts, sums[:unknown]]).tolist()  # one transfer
    return {f"{prefix}_{name}": s / c for name, c, s in zip(SIZE_GROUPS, counts_l, sums_l) if c > 0}


def _r_stats(prefix: str, r: Tensor) -> dict[str, float]:
    """Mean, min, 10th percentile, median and fraction below 0.5 of robustness weights
    (1, 1, 1, 1, 0 when empty)."""
    if len(r) == 0:
        return {
            f"{prefix}_mean": 1.0,
            f"{prefix}_min": 1.0,
            f"{prefix}_p10": 1.0,
            f"{prefix}_median": 1.0,
            f"{prefix}_below_0.5": 0.0,
        }
    p10, median = torch.quantile(r.detach().float(), r.new_tensor([0.1, 0.5]).float()).tolist()
    return {
        f"{prefix}_mean": float(r.mean()),
        f"{prefix}_min": float(r.min()),
        f"{prefix}_p10": p10,
        f"{prefix}_median": median,
        f"{prefix}_below_0.5": float((r < 0.5).float().mean()),
    }
