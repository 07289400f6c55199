"""Loss terms of GKD's RDM: robust fg/bg feature imitation, soft-label KD, global alignment.

The terms, their normalisers and weights are the official code's (hikvision-research/
DAVAR-Lab-ML, ECCV22_Distilling_Object_Detectors_with_Global_Knowledge); each function says where
it departs from it and why (overlapping boxes, batches without positives).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# how foreground_mask resolves boxes that overlap (MODEL.GKD.FG_OVERLAP)
FG_OVERLAP_RULES = ("max", "last")


def box_cells(
    boxes: torch.Tensor, stride: float, size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The cells of a level that each box marks in the foreground mask (official ranges).

    y in [floor(y1/s), min(floor(y2/s), H)), x likewise (end exclusive, start clamped into the
    map); a box whose range is empty in x or y (degenerate) marks the one cell
    (floor(y1/s), floor(x1/s)).

    Args:
        boxes: (N, 4) XYXY boxes in input pixels.
        stride: the level's stride.
        size: (H, W) of the level's maps.

    Returns:
        inside: (N, H * W) bool, the cells of each box (row-major);
        degenerate: (N,) bool, the boxes that mark their single corner cell.
    """
    H, W = size
    cells = torch.floor(boxes / stride).long()
    xs, ys = cells[:, 0].clamp(0, W - 1), cells[:, 1].clamp(0, H - 1)
    xe, ye = cells[:, 2].clamp(max=W), cells[:, 3].clamp(max=H)
    degenerate = (xe <= xs) | (ye <= ys)
    xe = torch.where(degenerate, xs + 1, xe)
    ye = torch.where(degenerate, ys + 1, ye)
    rows = torch.arange(H, device=boxes.device)
    cols = torch.arange(W, device=boxes.device)
    in_rows = (rows >= ys[:, None]) & (rows < ye[:, None])  # (N, H)
    in_cols = (cols >= xs[:, None]) & (cols < xe[:, None])  # (N, W)
    return (in_rows[:, :, None] & in_cols[:, None, :]).reshape(len(boxes), H * W), degenerate


def foreground_mask(
    boxes: torch.Tensor,
    batch_idx: torch.Tensor,
    weights: torch.Tensor,
    stride: float,
    shape: tuple[int, int, int],
    overlap: str = "max",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Robustness-weighted foreground mask of one FPN level, and the cells it covers.

    Each box marks its cells (:func:`box_cells`: the official ranges, end exclusive; a
    degenerate box marks one cell) with its weight. Pass only the boxes assigned to this level.
    Where boxes overlap (``MODEL.GKD.FG_OVERLAP``):

    * "max": the cell keeps the largest weight of the boxes covering it (order-independent);
    * "last": the official rule (``DAVAR-Lab-ML`` distiller's mask loop): boxes are written in
      row order, a box overwrites its range and a degenerate box keeps max(current, weight).
      A cell's weight is then that of the last non-degenerate box covering it, raised to the
      largest weight of the degenerate boxes that come after it.

    A covered cell is foreground whatever its weight: an instance with r = 0 gets weight 0 in
    the fg term and its cells are not imitated as background (the official code takes
    ``mask > 0`` as foreground, so there an r <= 0 instance becomes background, weight 4).

    Args:
        boxes: (N, 4) XYXY boxes in input pixels.
        batch_idx: (N,) int64 image of each box.
        weights: (N,) weight of each box (r, or ones for binary DeFeat-style masks).
        stride: the level's stride.
        shape: (B, H, W) of the level's maps.
        overlap: "max" or "last" (above); the official order is the rows' order.

    Returns:
        mask: (B, H, W) weights, 0 on background;
        covered: (B, H, W) bool, True on the cells of at least one box.
    """
    if overlap not in FG_OVERLAP_RULES:
        raise ValueError(
            f"foreground_mask: overlap must be one of {FG_OVERLAP_RULES}, not {overlap!r}"
        )
    B, H, W = shape
    mask = weights.new_zeros((B, H, W))
    if boxes.numel() == 0:
        return mask, torch.zeros((B, H, W), dtype=torch.bool, device=mask.device)
    inside, degenerate = box_cells(boxes, stride, (H, W))
    index = batch_idx[:, None].expand(-1, H * W)
    covered = torch.zeros((B, H * W), dtype=mask.dtype, device=mask.device)
    covered = covered.scatter_reduce_(0, index, inside.to(mask.dtype), "amax").view(B, H, W) > 0
    if overlap == "max":
        src = (inside * weights[:, None]).to(mask.dtype)
        mask = mask.view(B, H * W).scatter_reduce_(0, index, src, "amax").view(B, H, W)
        return mask, covered
    # "last": the row of the last non-degenerate box on each cell (-1: none) gives its weight
    rows_of = torch.arange(len(boxes), device=boxes.device)[:, None].expand(-1, H * W)
    writes = inside & ~degenerate[:, None]
    last = torch.full((B, H * W), -1, dtype=torch.long, device=boxes.device)
    last = last.scatter_reduce_(0, index, torch.where(writes, rows_of, -1), "amax")
    has_writer = last >= 0
    mask = torch.where(has_writer, weights.to(mask.dtype)[last.clamp(min=0)], mask.view(B, H * W))
    # then each degenerate box that comes after that writer raises its one cell by max
    after = inside & degenerate[:, None] & (rows_of > last.gather(0, index))
    src = (after * weights[:, None]).to(mask.dtype)
    mask = mask.scatter_reduce_(0, index, src, "amax")
    return mask.view(B, H, W), covered


def decoupled_imitation_losses(
    adapted_student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor,
    covered: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Foreground and background feature-imitation losses of one level (unweighted).

    With D = (A - T)^2 and G the background cells (not covered by any box):
    L_fg = sum(D * M) / max(1, 2 C sum M) and L_bg = sum(D * G) / max(1, 2 C sum G);
    M and G are broadcast over channels. Also L_fg with weight 1 on every covered cell (what
    L_fg would be with r = 1, without a graph): L_fg / that is how much the weights moved the
    foreground term on this batch.

    Args:
        adapted_student: (B, C, H, W) student map after the level's adapter.
        teacher: (B, C, H, W) teacher map.
        mask: (B, H, W) foreground weights from :func:`foreground_mask`.
        covered: (B, H, W) bool cells of the boxes (:func:`foreground_mask`); None: the cells
            where ``mask > 0`` (the official rule, under which a weight-0 box is background).

    Returns:
        (L_fg, L_bg, L_fg at weight 1) scalars.
    """
    C = teacher.shape[1]
    sq = (adapted_student - teacher).pow(2).sum(dim=1)  # (B, H, W): channels summed once
    fg_cells = covered if covered is not None else mask > 0
    bg = (~fg_cells).to(sq.dtype)
    fg_loss = (sq * mask).sum() / torch.clamp(2 * C * mask.sum(), min=1.0)
    bg_loss = (sq * bg).sum() / torch.clamp(2 * C * bg.sum(), min=1.0)
    with torch.no_grad():
        unit = fg_cells.to(sq.dtype)
        fg_unit = (sq * unit).sum() / torch.clamp(2 * C * unit.sum(), min=1.0)
    return fg_loss, bg_loss, fg_unit


SOFT_LABEL_FORMS = ("softmax", "sigmoid")


def soft_label_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weights: torch.Tensor,
    temperature: float = 2.0,
    form: str = "softmax",
) -> torch.Tensor:
    """Robustness-weighted soft-label distillation: mean_n w_n T^2 mean_c KL_c.

    ``form`` "softmax" (official): one K-way distribution per instance, p = softmax(z / T),
    KL_c = p_T,c (log p_T,c - log p_S,c). "sigmoid": K binary distributions, p_c =
    sigmoid(z_c / T), KL_c = the binary KL of p_T,c from p_S,c; for sigmoid classifiers with
    K = 1 (a softmax over one logit is 1 whatever the logit, so its KL is identically 0).
    Note the mean over classes (the official normalisation). Rows of the three inputs must
    describe the same instances in the same order.

    Args:
        student_logits, teacher_logits: (N, K) logits of the same N instances.
        weights: (N,) robustness weights.
        form: "softmax" or "sigmoid".

    Returns:
        scalar loss; 0 (connected to the student graph) when N = 0.
    """
    if student_logits.shape != teacher_logits.shape or weights.shape != student_logits.shape[:1]:
        raise ValueError(
            f"soft_label_kl: student logits {tuple(student_logits.shape)}, teacher logits "
            f"{tuple(teacher_logits.shape)} and weights {tuple(weights.shape)} do not align"
        )
    if form not in SOFT_LABEL_FORMS:
        raise ValueError(f"soft_label_kl: form must be one of {SOFT_LABEL_FORMS}, not {form!r}")
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    zs, zt = student_logits.float() / temperature, teacher_logits.float() / temperature
    if form == "softmax":
        log_p_s, log_p_t = F.log_softmax(zs, dim=1), F.log_softmax(zt, dim=1)
        kl = log_p_t.exp() * (log_p_t - log_p_s)
    else:
        # log p = logsigmoid(z), log(1 - p) = logsigmoid(-z): stable for large |z|
        p_t = torch.sigmoid(zt)
        kl = p_t * (F.logsigmoid(zt) - F.logsigmoid(zs)) + (1 - p_t) * (
            F.logsigmoid(-zt) - F.logsigmoid(-zs)
        )
    return (weights * kl.mean(dim=1) * temperature**2).mean()


def global_alignment_loss(
    rep_student: torch.Tensor, rep_teacher: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Explicit global-knowledge loss of one level: SmoothL1 (beta 1, mean) of r G_S vs r G_T.

    Args:
        rep_student, rep_teacher: (N, P) global representations (cosines to all prototypes).
        weights: (N,) robustness weights r.

    Returns:
        scalar loss; 0 when N = 0.
    """
    if rep_student.shape[0] == 0:
        return rep_student.sum() * 0.0
    w = weights[:, None]
    return F.smooth_l1_loss(w * rep_student, w * rep_teacher, beta=1.0, reduction="mean")


def linear_attenuation(epoch: int, num_epochs: int) -> float:
    """a(e) = 1 - e / E for the 0-based epoch e, never below 0."""
    return max(0.0, 1.0 - epoch / num_epochs)
