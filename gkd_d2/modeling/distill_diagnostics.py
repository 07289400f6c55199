"""What a distiller forward reports besides its losses: statistics of r, r by COCO size group,
how much r shrinks each weighted term, and the instance-by-instance record for tools.

Nothing here feeds a loss: every function reads detached values after the losses are computed.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

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


@dataclasses.dataclass
class WeightedTerms:
    """The r-weighted sums of one forward that ``gkd/r_effect_<term>`` compares with the same
    sums at weight 1; None where the term is off."""

    fg: Tensor | None = None  # () the fg imitation term over the levels, before the reduction
    fg_unit: Tensor | None = None  # () the same with weight 1 (computed along with it)
    soft: Tensor | None = None  # () the weighted soft-label KL, before SOFT_WEIGHT


def r_effects(terms: WeightedTerms, soft_unit: Tensor | None) -> dict[str, float]:
    """``gkd/r_effect_fg`` / ``gkd/r_effect_soft``: each term with the weights divided by the
    same term with weight 1 on this batch, for the terms present.

    Args:
        soft_unit: () the soft-label KL with weight 1 (with ``terms.soft``).
    """
    effects: dict[str, Tensor] = {}
    if terms.fg is not None:
        effects["fg"] = terms.fg.detach() / terms.fg_unit.clamp(min=1e-12)
    if terms.soft is not None:
        effects["soft"] = terms.soft.detach() / soft_unit.clamp(min=1e-12)
    names = sorted(effects)
    # one transfer for both ratios
    values = torch.stack([effects[k] for k in names]).tolist() if names else []
    return {f"gkd/r_effect_{k}": v for k, v in zip(names, values)}


def r_by_size(prefix: str, r: Tensor, instance_gt: Tensor, gt_areas: Tensor) -> dict[str, float]:
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


def r_stats(prefix: str, r: Tensor) -> dict[str, float]:
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


def distillation_stats(
    r: Tensor | None,
    soft_r: Tensor | None,
    effects: dict[str, float],
    num_instances: int,
    instance_gt: Tensor | None = None,
    gt_areas: Tensor | None = None,
) -> dict[str, float]:
    """The scalars of one forward (docs/usage.md "Logged scalars"): ``gkd/num_instances``;
    with prototypes (``r`` not None) r's statistics, its mean per COCO size group present
    (with ``instance_gt`` and ``gt_areas``) and the ``effects`` of :func:`r_effects`; the soft
    labels' own r's statistics (``soft_r``).

    Args:
        r, soft_r: (N,) r of the feature mask and of the soft labels.
        instance_gt, gt_areas: see :func:`r_by_size`.
    """
    stats = {"gkd/num_instances": float(num_instances)}
    if r is not None:
        stats.update(r_stats("gkd/r", r))
        if instance_gt is not None and gt_areas is not None:
            stats.update(r_by_size("gkd/r_mean", r, instance_gt, gt_areas))
        stats.update(effects)
    if soft_r is not None:
        stats.update(r_stats("gkd/r_soft", soft_r))
    return stats
