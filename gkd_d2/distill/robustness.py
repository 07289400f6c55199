"""Global knowledge of the RDM: representation by prototypes, and the robustness weight r.

As in the official code (hikvision-research/DAVAR-Lab-ML,
ECCV22_Distilling_Object_Detectors_with_Global_Knowledge, ``template_box_distance``): plain
cosines to every prototype of a level, and r from the best match of the instance's own class in
each space.
Prototypes of one level are stored as a (K * M, C) matrix with class blocks in class order and
``starts`` (K + 1,) such that class c owns rows starts[c]:starts[c + 1] (a block may be empty).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def global_representation(feats: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of each instance to every prototype of the level, all classes.

    Args:
        feats: (N, C) raw pooled instance features.
        prototypes: (P, C) raw prototype features of the same space and level.

    Returns:
        (N, P) cosines; differentiable with respect to ``feats``.
    """
    return F.normalize(feats, dim=1) @ F.normalize(prototypes, dim=1).T


def prototype_class_ids(starts: torch.Tensor) -> torch.Tensor:
    """(P,) class id of each prototype row, from the (K + 1,) block starts."""
    sizes = starts[1:] - starts[:-1]
    return torch.repeat_interleave(torch.arange(len(sizes), device=starts.device), sizes)


def best_class_match(
    cos: torch.Tensor, classes: torch.Tensor, starts: torch.Tensor
) -> torch.Tensor:
    """Max cosine of each instance over the prototypes of its own class.

    Args:
        cos: (N, P) cosines to all prototypes of a level.
        classes: (N,) int64 class of each instance.
        starts: (K + 1,) block starts.

    Returns:
        (N,) max cosines; -inf where the class has no prototype.
    """
    own = prototype_class_ids(starts).unsqueeze(0) == classes.unsqueeze(1)  # (N, P)
    if cos.shape[1] == 0:
        return cos.new_full((cos.shape[0],), float("-inf"))
    return cos.masked_fill(~own, float("-inf")).max(dim=1).values


def robustness_weights(
    feats_s: torch.Tensor,
    feats_t: torch.Tensor,
    protos_s: torch.Tensor,
    protos_t: torch.Tensor,
    classes: torch.Tensor,
    starts: torch.Tensor,
    clamp: bool = True,
) -> torch.Tensor:
    """r = 1 - |max cos to own-class student prototypes - max cos to own-class teacher ones|.

    Detached (a weight, not a loss). Clamped to [0, 1] unless ``clamp`` is False (the official
    code does not clamp; it practically never matters). Instances of a class without prototypes
    get r = 1: their knowledge is used unweighted.

    Args:
        feats_s, feats_t: (N, C_S), (N, C_T) raw pooled student / teacher instance features.
        protos_s, protos_t: (P, C_S), (P, C_T) prototypes of the level.
        classes: (N,) int64 instance classes.
        starts: (K + 1,) block starts.

    Returns:
        (N,) robustness weights.
    """
    with torch.no_grad():
        best_s = best_class_match(global_representation(feats_s, protos_s), classes, starts)
        best_t = best_class_match(global_representation(feats_t, protos_t), classes, starts)
        r = 1.0 - (best_s - best_t).abs()
        r = torch.where(torch.isfinite(best_s) & torch.isfinite(best_t), r, torch.ones_like(r))
        return r.clamp(0.0, 1.0) if clamp else r
