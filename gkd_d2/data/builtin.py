"""Registration of the quick-start scene dataset with detectron2 (done on ``import gkd_d2``).

Registered names: ``gkd_scenes_train`` (2000 images) and ``gkd_scenes_val`` (300), the data of
``configs/quickstart_*``. The images are generated on first use under
``$DETECTRON2_DATASETS/gkd_scenes/`` (default ``./datasets/gkd_scenes``, detectron2's own
convention) and reused afterwards; registering reads and writes nothing. Other generated splits
(other sizes of the scenes, a benchmark's own data) register with :func:`register_scene_split`
or :func:`register_generated_split`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .scenes import SHAPE_CLASSES, SceneSpec, generate_split, spec_key

# name -> (split, spec, seed). Train and val use different splits, so different per-image RNGs.
QUICKSTART_SPLITS: dict[str, tuple[str, SceneSpec, int]] = {
    "gkd_scenes_train": ("train", SceneSpec(num_images=2000), 0),
    "gkd_scenes_val": ("val", SceneSpec(num_images=300), 0),
}
# Extra per-box fields kept in the detectron2 dicts (for per-subset evaluation).
EXTRA_KEYS = ["visible_fraction", "occluded", "blurred", "source_index"]


def scenes_root() -> Path:
    """``$DETECTRON2_DATASETS/gkd_scenes`` as an absolute path (computed, not looked up)."""
    return Path(os.path.abspath(os.environ.get("DETECTRON2_DATASETS", "datasets"))) / "gkd_scenes"


def register_generated_split(
    name: str, classes: Sequence[str], folder: Path, generate: Callable[[], Path]
) -> None:
    """Register ``name`` with detectron2: the COCO json and images that ``generate()`` writes
    into ``folder`` (``annotations.json``, ``images/``) the first time the split is loaded.

    Category ids in the json are 1..K, in the order of ``classes``. A name that is already
    registered is left as it is, so registering twice is harmless.
    """
    if name in DatasetCatalog.list():
        return

    def load() -> list[dict]:
        out = generate()
        return load_coco_json(
            str(out / "annotations.json"),
            str(out / "images"),
            name,
            extra_annotation_keys=EXTRA_KEYS,
        )

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        thing_classes=list(classes),
        # ids in the json are 1..K; load_coco_json maps them to contiguous 0..K-1
        thing_dataset_id_to_contiguous_id={k + 1: k for k in range(len(classes))},
        json_file=str(folder / "annotations.json"),
        image_root=str(folder / "images"),
        evaluator_type="coco",
    )


def register_scene_split(name: str, split: str, spec: SceneSpec, seed: int = 0) -> None:
    """Register ``name``: ``spec.num_images`` generated scenes of ``split`` (its own per-image
    RNGs: train and val never share an image) under :func:`scenes_root`, written on first load."""
    root = scenes_root()
    register_generated_split(
        name,
        SHAPE_CLASSES,
        root / spec_key(spec, seed, split),
        lambda: generate_split(root, split, spec, seed),
    )


def register_quickstart_datasets() -> None:
    """Register ``gkd_scenes_train`` and ``gkd_scenes_val``; nothing is generated until loaded."""
    for name, (split, spec, seed) in QUICKSTART_SPLITS.items():
        register_scene_split(name, split, spec, seed)
