"""Instance descriptors on FPN maps: box-crop mean pooling and the box-to-level rule.

Both are the official code's (hikvision-research/DAVAR-Lab-ML,
ECCV22_Distilling_Object_Detectors_with_Global_Knowledge): an integer-aligned crop, not RoIAlign
(a 1x1 RoIAlign is close but not equal). One addition: the crop's indices are clamped into the
map, so that a box at the border of a coarse level still has a cell instead of an empty mean.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def crop_windows(
    boxes: torch.Tensor, stride: float, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer cell window of each box on a map of the given stride, as in the official code.

    The window is rows [ys, ye) and columns [xs, xe) with ys = floor(|y1| / s),
    ye = floor(|y2| / s) + 1 (the crop is inclusive of the end cell), likewise in x, clamped to
    the map so that every window holds at least one cell (boxes at or past the border of a
    coarse level would otherwise be empty).

    Args:
        boxes: (N, 4) XYXY boxes in input-image pixels.
        stride: the level's stride s.
        height, width: the level's map size.

    Returns:
        ys, ye, xs, xe: (N,) int64 each, with 0 <= ys < ye <= height and 0 <= xs < xe <= width.
    """
    cells = torch.floor(boxes.abs() / stride).long()
    xs = cells[:, 0].clamp(0, width - 1)
    ys = cells[:, 1].clamp(0, height - 1)
    xe = torch.maximum((cells[:, 2] + 1).clamp(max=width), xs + 1)
    ye = torch.maximum((cells[:, 3] + 1).clamp(max=height), ys + 1)
    return ys, ye, xs, xe


def box_crop_mean(
    features: torch.Tensor, boxes: torch.Tensor, batch_idx: torch.Tensor, stride: float
) -> torch.Tensor:
    """Mean of each box's cell window on one FPN level, for all boxes at once.

    Uses a summed-area table (one cumulative sum per map), so the cost does not grow with box
    size and there is no Python loop over boxes. Differentiable with respect to ``features``.

    Args:
        features: (B, C, H, W) FPN map of one level.
        boxes: (N, 4) XYXY boxes in input-image pixels.
        batch_idx: (N,) int64 image index of each box in the batch.
        stride: the level's stride.

    Returns:
        (N, C) pooled descriptors (un-normalised), in the dtype of ``features`` (fp32 sums for
        half-precision maps).
    """
    B, C, H, W = features.shape
    if boxes.numel() == 0:
        return features.new_zeros((0, C))
    dtype = features.dtype
    acc = features.float() if dtype in (torch.float16, torch.bfloat16) else features
    # table[b, c, i, j] = sum of acc[b, c, :i, :j]
    table = torch.nn.functional.pad(acc.cumsum(2).cumsum(3), (1, 0, 1, 0))
    ys, ye, xs, xe = crop_windows(boxes, stride, H, W)
    flat = table.permute(0, 2, 3, 1)  # (B, H+1, W+1, C): corner gathers give (N, C) directly
    total = flat[batch_idx, ye, xe] - flat[batch_idx, ys, xe] - flat[batch_idx, ye, xs]
    total = total + flat[batch_idx, ys, xs]
    area = ((ye - ys) * (xe - xs)).to(total.dtype).unsqueeze(1)
    return (total / area).to(dtype)


def pool_at_levels(
    features: Sequence[torch.Tensor],
    boxes: torch.Tensor,
    batch_idx: torch.Tensor,
    strides: Sequence[float],
    levels: torch.Tensor,
) -> torch.Tensor:
    """Each instance's descriptor: its box's crop mean (:func:`box_crop_mean`) on its level.

    Args:
        features: L maps (B, C, H_l, W_l), finest first.
        boxes: (N, 4) XYXY boxes in input-image pixels.
        batch_idx: (N,) int64 image index of each box.
        strides: the L levels' strides.
        levels: (N,) int64 level index of each box, in [0, L - 1].

    Returns:
        (N, C) descriptors, differentiable with respect to ``features``.
    """
    out = features[0].new_zeros((len(boxes), features[0].shape[1]))
    for lvl, (feats, stride) in enumerate(zip(features, strides)):
        sel = levels == lvl
        if bool(sel.any()):
            out[sel] = box_crop_mean(feats, boxes[sel], batch_idx[sel], stride)
    return out


def assign_levels(
    boxes: torch.Tensor, num_levels: int, canonical_size: float = 56.0
) -> torch.Tensor:
    """Level index of each box for the foreground masks (the official code's helper).

    level = clamp(floor(log2(sqrt((w + 1) * (h + 1)) / canonical_size + 1e-6)), 0, L - 1), with
    index 0 the finest level used (P2 for Faster R-CNN, P3 for RetinaNet).

    Args:
        boxes: (N, 4) XYXY boxes in input-image pixels.
        num_levels: L.
        canonical_size: 56 in the official code.

    Returns:
        (N,) int64 level indices in [0, L - 1].
    """
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    scale = torch.sqrt((w + 1) * (h + 1))
    level = torch.floor(torch.log2(scale / canonical_size + 1e-6))
    return level.clamp(0, num_levels - 1).long()
