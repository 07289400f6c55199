"""The PGM's instance sample: which training instances the prototypes are picked from.

As the official code (hikvision-research/DAVAR-Lab-ML, ECCV22 GKD project,
prototype_generation_module.py): a fixed sample of up to MAX_IMAGES_PER_CLASS images per class,
drawn once (seed 1), of the boxes larger than MIN_BOX_SIZE.
"""

from __future__ import annotations

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.structures import BoxMode
from torch import Tensor


def sample_instances(
    dataset_dicts: list[dict],
    num_classes: int,
    min_size: float = 30.0,
    max_images_per_class: int = 800,
    seed: int = 1,
) -> dict[str, Tensor]:
    """The PGM's instance sample, drawn once: per class, up to ``max_images_per_class`` images
    with a box of that class wider and taller than ``min_size`` (original pixels, strict), and
    every such box of the class in those images.

    Args:
        dataset_dicts: detectron2 dataset dicts (the training set, in loader order).

    Returns:
        ``image`` (N,) int64 index into ``dataset_dicts``, ``cls`` (N,) int64 contiguous class,
        ``box`` (N, 4) float32 XYXY in original pixels; ordered by class, image, annotation.
    """
    per_class: list[dict[int, list[list[float]]]] = [{} for _ in range(num_classes)]
    for i, d in enumerate(dataset_dicts):
        for a in d.get("annotations", []):
            if a.get("iscrowd", 0):
                continue
            x1, y1, x2, y2 = BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS)
            if x2 - x1 > min_size and y2 - y1 > min_size:
                per_class[a["category_id"]].setdefault(i, []).append([x1, y1, x2, y2])
    rng = np.random.RandomState(seed)
    image, cls, box = [], [], []
    for c, by_image in enumerate(per_class):
        ids = sorted(by_image)
        if len(ids) > max_images_per_class:
            ids = sorted(rng.choice(ids, max_images_per_class, replace=False).tolist())
        for i in ids:
            for b in by_image[i]:
                image.append(i)
                cls.append(c)
                box.append(b)
    return {
        "image": torch.tensor(image, dtype=torch.long),
        "cls": torch.tensor(cls, dtype=torch.long),
        "box": torch.tensor(box, dtype=torch.float32).reshape(-1, 4),
    }


def configured_sample(
    cfg: CfgNode, dataset_dicts: list[dict], num_classes: int
) -> dict[str, Tensor]:
    """:func:`sample_instances` with MODEL.GKD.MIN_BOX_SIZE, MAX_IMAGES_PER_CLASS and
    SAMPLE_SEED: the same sample on every rank and in every run of the config."""
    g = cfg.MODEL.GKD
    return sample_instances(
        dataset_dicts, num_classes, g.MIN_BOX_SIZE, g.MAX_IMAGES_PER_CLASS, g.SAMPLE_SEED
    )
