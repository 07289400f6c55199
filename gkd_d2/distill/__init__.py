"""The math of GKD as pure tensor functions (no detectron2 state): pooling, PGM, RDM."""

from .pooling import assign_levels, box_crop_mean, crop_windows
from .prototypes import (
    dense_candidates,
    density_scores,
    joint_coefficients,
    joint_matching_pursuit,
    select_prototypes,
)
from .robustness import (
    best_class_match,
    global_representation,
    prototype_class_ids,
    robustness_weights,
)

__all__ = [
    "assign_levels",
    "best_class_match",
    "box_crop_mean",
    "crop_windows",
    "dense_candidates",
    "density_scores",
    "global_representation",
    "joint_coefficients",
    "joint_matching_pursuit",
    "prototype_class_ids",
    "robustness_weights",
    "select_prototypes",
]
