"""Epochs of the training set: what a(e), the prototype refresh and the sampler count in."""

from __future__ import annotations

import functools

from detectron2.config import CfgNode
from detectron2.data import get_detection_dataset_dicts


def train_dataset_dicts(cfg: CfgNode) -> list[dict]:
    """The training set as the loader sees it (detectron2's filtering); loaded once per process."""
    return _train_dataset_dicts(
        tuple(cfg.DATASETS.TRAIN),
        cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0,
        tuple(cfg.DATASETS.PROPOSAL_FILES_TRAIN) if cfg.MODEL.LOAD_PROPOSALS else None,
    )


@functools.lru_cache(maxsize=2)
def _train_dataset_dicts(names, filter_empty, min_keypoints, proposal_files) -> list[dict]:
    return get_detection_dataset_dicts(
        list(names),
        filter_empty=filter_empty,
        min_keypoints=min_keypoints,
        proposal_files=list(proposal_files) if proposal_files else None,
    )


def epoch_length(cfg: CfgNode) -> int:
    """Iterations of one epoch of the training set (at least 1)."""
    return max(1, len(train_dataset_dicts(cfg)) // cfg.SOLVER.IMS_PER_BATCH)


def refresh_period(cfg: CfgNode) -> int:
    """Iterations between prototype refreshes: MODEL.GKD.REFRESH_PERIOD, or one epoch (the
    official PGM hook refreshes once per epoch)."""
    if cfg.MODEL.GKD.REFRESH_PERIOD > 0:
        return cfg.MODEL.GKD.REFRESH_PERIOD
    return epoch_length(cfg)


def num_epochs(cfg: CfgNode) -> int:
    """E of a(e) = 1 - e / E: MODEL.GKD.NUM_EPOCHS, or the epochs that MAX_ITER spans."""
    if cfg.MODEL.GKD.NUM_EPOCHS > 0:
        return cfg.MODEL.GKD.NUM_EPOCHS
    return max(1, -(-cfg.SOLVER.MAX_ITER // epoch_length(cfg)))


def attenuation_schedule(cfg: CfgNode) -> tuple[int, int] | None:
    """(iterations per epoch, epochs) of a(e) (paper section 3.3), or None (a = 1) when
    MODEL.GKD.ATTENUATION is off."""
    if not cfg.MODEL.GKD.ATTENUATION:
        return None
    return epoch_length(cfg), num_epochs(cfg)
