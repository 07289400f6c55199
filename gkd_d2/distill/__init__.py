"""The math of GKD as pure tensor functions (no detectron2 state): pooling, PGM, RDM, losses."""

from .losses import (
    FG_OVERLAP_RULES,
    SOFT_LABEL_FORMS,
    box_cells,
    decoupled_imitation_losses,
    foreground_mask,
    global_alignment_loss,
    linear_attenuation,
    soft_label_kl,
)
from .pooling import assign_levels, box_crop_mean, crop_windows, pool_at_levels
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
    "FG_OVERLAP_RULES",
    "SOFT_LABEL_FORMS",
    "box_cells",
    "decoupled_imitation_losses",
    "foreground_mask",
    "global_alignment_loss",
    "linear_attenuation",
    "soft_label_kl",
    "assign_levels",
    "best_class_match",
    "box_crop_mean",
    "crop_windows",
    "dense_candidates",
    "density_scores",
    "global_representation",
    "joint_coefficients",
    "joint_matching_pursuit",
    "pool_at_levels",
    "prototype_class_ids",
    "robustness_weights",
    "select_prototypes",
]
