"""The GKD distiller: prototype bank, adapters and the RDM losses, shared by all detectors.

Detector-specific code only says which instances (boxes, classes, levels) and which logits;
everything else happens here, through the pure functions of ``gkd_d2.distill``.
"""

from __future__ import annotations

import torch
from detectron2.config import CfgNode
from torch import Tensor, nn

from ..distill import (
    box_crop_mean,
    decoupled_imitation_losses,
    foreground_mask,
    global_alignment_loss,
    global_representation,
    robustness_weights,
    soft_label_kl,
)


class GKDDistiller(nn.Module):
    """Per-level adapters (student -> teacher channels) and the prototype bank, as model state.

    The bank is stored in fixed-shape buffers, so it lives in every checkpoint and loads
    strictly: ``protos_s`` (L, K, M, C_S), ``protos_t`` (L, K, M, C_T) and ``proto_counts``
    (L, K), the number of valid prototypes of each (level, class). ``bank_iter`` is the training
    iteration whose refresh produced the bank (-1: none yet).
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
        clamp_r: bool = True,
        temperature: float = 2.0,
        fg_weight: float = 1.0,
        bg_weight: float = 4.0,
        soft_weight: float = 1.0,
        global_weight: float = 0.0,
        level_reduction: str = "sum",
    ):
        super().__init__()
        if level_reduction not in ("sum", "mean"):
            raise ValueError(
                f"MODEL.GKD.LEVEL_REDUCTION must be 'sum' or 'mean', not {level_reduction!r}"
            )
        self.strides = list(strides)
        L, K, M = len(strides), num_classes, num_prototypes
        # 3x3, padding 1, no activation: keeps the map size (spec section 4.3, pitfall 11).
        self.adapters = nn.ModuleList(
            nn.Conv2d(student_channels, teacher_channels, 3, padding=1) for _ in range(L)
        )
        self.register_buffer("protos_s", torch.zeros(L, K, M, student_channels))
        self.register_buffer("protos_t", torch.zeros(L, K, M, teacher_channels))
        self.register_buffer("proto_counts", torch.zeros(L, K, dtype=torch.long))
        self.register_buffer("bank_iter", torch.tensor(-1, dtype=torch.long))
        self.robust, self.clamp_r, self.temperature = robust, clamp_r, temperature
        self.fg_weight, self.bg_weight = fg_weight, bg_weight
        self.soft_weight, self.global_weight = soft_weight, global_weight
        self.level_reduction = level_reduction

    @classmethod
    def from_config(
        cls,
        cfg: CfgNode,
        strides: list[int],
        student_channels: int,
        teacher_channels: int,
        num_classes: int,
    ) -> GKDDistiller:
        g = cfg.MODEL.GKD
        return cls(
            strides=strides,
            student_channels=student_channels,
            teacher_channels=teacher_channels,
            num_classes=num_classes,
            num_prototypes=g.NUM_PROTOTYPES,
            robust=g.ROBUST_WEIGHTS,
            clamp_r=g.CLAMP_R,
            temperature=g.TEMPERATURE,
            fg_weight=g.FG_WEIGHT,
            bg_weight=g.BG_WEIGHT,
            soft_weight=g.SOFT_WEIGHT,
            global_weight=g.GLOBAL_WEIGHT,
            level_reduction=g.LEVEL_REDUCTION,
        )

    # ---- the bank ------------------------------------------------------------------------------
    @torch.no_grad()
    def set_bank(self, level: int, cls: int, feats_s: Tensor, feats_t: Tensor) -> None:
        """Store the (m, C_S) / (m, C_T) prototypes of one (level, class), m <= M."""
        m = feats_s.shape[0]
        self.protos_s[level, cls].zero_()
        self.protos_t[level, cls].zero_()
        self.protos_s[level, cls, :m] = feats_s
        self.protos_t[level, cls, :m] = feats_t
        self.proto_counts[level, cls] = m

    def bank(self, level: int) -> tuple[Tensor, Tensor, Tensor]:
        """Valid prototypes of a level: (P, C_S), (P, C_T) in class blocks, starts (K + 1,)."""
        counts = self.proto_counts[level]
        M = self.protos_s.shape[2]
        valid = torch.arange(M, device=counts.device)[None, :] < counts[:, None]  # (K, M)
        starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        return self.protos_s[level][valid], self.protos_t[level][valid], starts

    # ---- the losses ----------------------------------------------------------------------------
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
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """Distillation losses of one batch.

        Args:
            student_feats, teacher_feats: per level (B, C_S, H, W) / (B, C_T, H, W) FPN maps.
            boxes: (N, 4) XYXY instance boxes (positive anchors / proposals) in input pixels.
            batch_idx, classes, levels: (N,) image, class and assigned level of each instance.
            student_logits, teacher_logits: (N, K') classification logits of the same instances.
            attenuation: a(e), applied to the feature and global terms (not to soft labels).

        Returns:
            losses: ``loss_gkd_fg``, ``loss_gkd_bg``, ``loss_gkd_soft`` and, with a global
            weight, ``loss_gkd_global``; stats: r mean / min / fraction below 0.5 (floats).
        """
        L = len(self.strides)
        if len(student_feats) != L or len(teacher_feats) != L:
            raise ValueError(
                f"GKD distiller: {len(student_feats)} student and {len(teacher_feats)} teacher "
                f"FPN levels, configured for {L}"
            )
        # robustness of every instance at every level, from the raw (un-adapted) maps
        r_all, pooled = [], []
        for lvl in range(L):
            s = box_crop_mean(student_feats[lvl], boxes, batch_idx, self.strides[lvl])
            with torch.no_grad():
                t = box_crop_mean(teacher_feats[lvl], boxes, batch_idx, self.strides[lvl])
            ps, pt, starts = self.bank(lvl)
            r_all.append(robustness_weights(s, t, ps, pt, classes, starts, clamp=self.clamp_r))
            pooled.append((s, t, ps, pt))
        r_all = torch.stack(r_all) if L else boxes.new_zeros((0, len(boxes)))  # (L, N)
        r = r_all[levels, torch.arange(len(boxes), device=boxes.device)]  # (N,) at own level
        weights = r if self.robust else torch.ones_like(r)

        fg_total = bg_total = student_feats[0].sum() * 0.0
        for lvl in range(L):
            sel = levels == lvl
            a_map, t_map = self.adapters[lvl](student_feats[lvl]), teacher_feats[lvl]
            if a_map.shape != t_map.shape:
                raise ValueError(
                    f"GKD distiller, level {lvl}: adapted student map {tuple(a_map.shape)} and "
                    f"teacher map {tuple(t_map.shape)} differ"
                )
            B, _, H, W = t_map.shape
            mask = foreground_mask(
                boxes[sel], batch_idx[sel], weights[sel], self.strides[lvl], (B, H, W)
            )
            fg, bg = decoupled_imitation_losses(a_map, t_map, mask)
            fg_total, bg_total = fg_total + fg, bg_total + bg
        if self.level_reduction == "mean":
            fg_total, bg_total = fg_total / L, bg_total / L
        losses = {
            "loss_gkd_fg": self.fg_weight * attenuation * fg_total,
            "loss_gkd_bg": self.bg_weight * attenuation * bg_total,
            "loss_gkd_soft": self.soft_weight
            * soft_label_kl(student_logits, teacher_logits, weights, self.temperature),
        }
        if self.global_weight > 0:
            total = student_feats[0].sum() * 0.0
            for lvl, (s, t, ps, pt) in enumerate(pooled):
                if ps.shape[0] == 0:
                    continue
                with torch.no_grad():
                    rep_t = global_representation(t, pt)
                total = total + global_alignment_loss(
                    global_representation(s, ps), rep_t, r_all[lvl]
                )
            losses["loss_gkd_global"] = self.global_weight * attenuation * total
        stats = {
            "gkd/r_mean": float(r.mean()) if len(r) else 1.0,
            "gkd/r_min": float(r.min()) if len(r) else 1.0,
            "gkd/r_below_0.5": float((r < 0.5).float().mean()) if len(r) else 0.0,
            "gkd/num_instances": float(len(r)),
        }
        return losses, stats
