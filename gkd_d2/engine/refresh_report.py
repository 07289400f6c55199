"""What a prototype refresh reports: a log line, and scalars in the EventStorage (metrics.json,
TensorBoard; not smoothed): ``gkd/refresh_seconds``, ``gkd/pgm_instances`` (the sample's size),
``gkd/pgm_classes_without_prototypes``, ``gkd/pgm_student_images`` and ``gkd/pgm_teacher_images``
(forwarded by this process), in bank mode ``gkd/pgm_harvested`` (the share of the sample's
instances harvested) and ``gkd/pgm_unplaced_images`` (sampled training images not harvested:
flipped ones unless MODEL.GKD.BANK_HARVEST_FLIPPED, or an augmentation the harvest cannot follow;
extracted instead) and, per class (``thing_classes`` of the first training set, else the index),
``gkd/pgm_instances/<class>`` (its instances in the sample) and ``gkd/pgm_picks/<class>`` (its
distinct instances picked as prototypes, all levels).
"""

from __future__ import annotations

import dataclasses
import logging
import re

import torch
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from torch import Tensor

logger = logging.getLogger(__name__)


def class_names(cfg: CfgNode, num_classes: int) -> list[str]:
    """``thing_classes`` of the first training set, else the class indices."""
    names = None
    if cfg.DATASETS.TRAIN:
        names = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).get("thing_classes", None)
    if names is None or len(names) != num_classes:
        return [str(c) for c in range(num_classes)]
    return [str(n) for n in names]


def metric_class_names(cfg: CfgNode, num_classes: int) -> list[str]:
    """:func:`class_names`, metric-safe: a "/" would nest the metric one level deeper in
    TensorBoard, and spaces read badly in tags."""
    return [re.sub(r"[\s/]+", "_", n) for n in class_names(cfg, num_classes)]


@dataclasses.dataclass
class RefreshRecord:
    """What one refresh did, as its log line and scalars report it."""

    iteration: int
    mode: str  # MODEL.GKD.REFRESH_MODE
    instances: dict[str, Tensor]  # the PGM sample
    picked: list[list[Tensor]]  # per class, per level, the (m,) sample rows picked
    # this process's "student_images", "teacher_images", "harvested" (rows), "unplaced" (images)
    counts: dict[str, int]
    seconds: float  # wall time
    harvesting: bool  # a harvest fed the refresh (bank mode)
    num_images: int = 0  # images holding the sample


def log_refresh(record: RefreshRecord, min_box_size: float, class_names: list[str]) -> None:
    """Log a refresh that picked prototypes, naming (``class_names``, per class) the classes
    without any sampled instance (their instances get r = 1)."""
    inst, counts = record.instances, record.counts
    empty = [c for c in range(len(record.picked)) if not bool((inst["cls"] == c).any())]
    if empty:
        named = ", ".join(f"{class_names[c]} ({c})" for c in empty)
        logger.warning(
            f"PGM: classes {named} have no instance larger than {min_box_size} px "
            "(MODEL.GKD.MIN_BOX_SIZE, in original pixels): no prototypes, their instances get "
            "r = 1 (unweighted knowledge)"
        )
    logger.info(
        f"PGM refresh at iteration {record.iteration} ({record.mode}): {len(inst['cls'])} "
        f"instances in {record.num_images} images; this rank forwarded "
        f"{counts['student_images']} images through the student and "
        f"{counts['teacher_images']} through the teacher"
        + (f", {counts['harvested']} instances harvested" if record.harvesting else "")
        + f"; {record.seconds:.1f}s"
    )


def refresh_scalars(record: RefreshRecord, class_names: list[str]) -> dict[str, float]:
    """The scalars of one refresh (this module's docstring); ``class_names``: per class, its
    name in the metrics (:func:`metric_class_names`)."""
    inst, picked, counts = record.instances, record.picked, record.counts
    num_classes = len(picked)
    per_class = torch.bincount(inst["cls"], minlength=num_classes).tolist()
    scalars = {
        "gkd/refresh_seconds": record.seconds,
        "gkd/pgm_instances": float(len(inst["cls"])),
        # a class without prototypes trains with r = 1 for all its instances
        "gkd/pgm_classes_without_prototypes": float(
            sum(1 for p in picked if sum(len(x) for x in p) == 0)
        ),
        "gkd/pgm_student_images": float(counts.get("student_images", 0)),
        "gkd/pgm_teacher_images": float(counts.get("teacher_images", 0)),
    }
    if record.harvesting and len(inst["cls"]):
        scalars["gkd/pgm_harvested"] = counts.get("harvested", 0) / len(inst["cls"])
        # sampled training images not harvested (flipped ones unless BANK_HARVEST_FLIPPED,
        # an augmentation the harvest cannot follow such as a crop): the refresh extracts them
        scalars["gkd/pgm_unplaced_images"] = float(counts.get("unplaced", 0))
    for c, name in enumerate(class_names):
        scalars[f"gkd/pgm_instances/{name}"] = float(per_class[c])
        # distinct instances over all levels: one instance often represents several
        distinct = torch.unique(torch.cat(picked[c])) if picked[c] else []
        scalars[f"gkd/pgm_picks/{name}"] = float(len(distinct))
    return scalars
