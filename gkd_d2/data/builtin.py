"""Registration of the embedded scene dataset with detectron2 (done on ``import gkd_d2``).

Registered names: ``gkd_scenes_train`` and ``gkd_scenes_val`` (and ``gkd_scenes_tiny_train`` /
``gkd_scenes_tiny_val``, small splits for tests), and the Fashion-MNIST-on-photos benchmark
``gkd_fashion_train`` / ``gkd_fashion_val`` (with ``gkd_fashion_tiny_train`` /
``gkd_fashion_tiny_val``, and ``gkd_fashion_train_120`` / ``_160`` / ``_240``, the first images of
``gkd_fashion_train``; see :mod:`gkd_d2.data.fashion_scenes`). The images are generated on
first use under ``$DETECTRON2_DATASETS/gkd_scenes/`` (default ``./datasets/gkd_scenes``,
detectron2's own convention) and reused afterwards; registering costs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .fashion_scenes import (
    FASHION_CLASSES,
    FashionSceneSpec,
    fashion_spec_key,
    generate_fashion_split,
)
from .scenes import SHAPE_CLASSES, SceneSpec, generate_split, spec_key

# name -> (split, spec, seed). Train and val use different splits, so different per-image RNGs.
EMBEDDED_SPLITS: dict[str, tuple[str, SceneSpec, int]] = {
    "gkd_scenes_train": ("train", SceneSpec(num_images=2000), 0),
    "gkd_scenes_val": ("val", SceneSpec(num_images=300), 0),
    "gkd_scenes_tiny_train": ("train", SceneSpec(num_images=32, image_size=128), 0),
    "gkd_scenes_tiny_val": ("val", SceneSpec(num_images=16, image_size=128), 0),
}
# name -> (split, spec, seed) of the Fashion-MNIST benchmark; "train" takes products from the 60k
# file, "val" from t10k. Generated once: ~34 s for train, ~4 s for val (2 cores).
FASHION_SPLITS: dict[str, tuple[str, FashionSceneSpec, int]] = {
    "gkd_fashion_train": ("train", FashionSceneSpec(num_images=3000), 0),
    "gkd_fashion_val": ("val", FashionSceneSpec(num_images=500), 0),
    "gkd_fashion_tiny_train": ("train", FashionSceneSpec(16, image_size=128, max_side=64), 0),
    "gkd_fashion_tiny_val": ("val", FashionSceneSpec(8, image_size=128, max_side=64), 0),
    # the first n images of gkd_fashion_train (a scene's RNG is its split, seed and index), for
    # the accuracy benchmark's distillation epochs (protocol P: epochs of 30 iterations, --quick 15)
    **{
        f"gkd_fashion_train_{n}": ("train", FashionSceneSpec(num_images=n), 0)
        for n in (120, 160, 240)
    },
}
# Extra per-box fields kept in the detectron2 dicts (for per-subset evaluation).
EXTRA_KEYS = ["visible_fraction", "occluded", "blurred", "source_index"]


def scenes_root() -> Path:
    return (Path(os.environ.get("DETECTRON2_DATASETS", "datasets")) / "gkd_scenes").resolve()


def split_dir(name: str) -> Path:
    """Folder that holds (or will hold) the images and json of a registered embedded split."""
    if name in FASHION_SPLITS:
        split, fspec, seed = FASHION_SPLITS[name]
        return scenes_root() / fashion_spec_key(fspec, seed, split)
    split, spec, seed = EMBEDDED_SPLITS[name]
    return scenes_root() / spec_key(spec, seed, split)


def ensure_split(name: str) -> Path:
    """Generate the split ``name`` if it is not on disk yet; return its folder."""
    if name in FASHION_SPLITS:
        split, fspec, seed = FASHION_SPLITS[name]
        return generate_fashion_split(scenes_root(), split, fspec, seed)
    split, spec, seed = EMBEDDED_SPLITS[name]
    return generate_split(scenes_root(), split, spec, seed)


def _load(name: str) -> list[dict]:
    folder = ensure_split(name)
    return load_coco_json(
        str(folder / "annotations.json"),
        str(folder / "images"),
        name,
        extra_annotation_keys=EXTRA_KEYS,
    )


def register_embedded_datasets() -> None:
    """Register every embedded split; nothing is generated until a split is first loaded."""
    names = [(n, SHAPE_CLASSES) for n in EMBEDDED_SPLITS]
    names += [(n, FASHION_CLASSES) for n in FASHION_SPLITS]
    for name, classes in names:
        if name in DatasetCatalog.list():
            continue
        DatasetCatalog.register(name, lambda name=name: _load(name))
        folder = split_dir(name)
        MetadataCatalog.get(name).set(
            thing_classes=list(classes),
            # ids in the json are 1..K; load_coco_json maps them to contiguous 0..K-1
            thing_dataset_id_to_contiguous_id={k + 1: k for k in range(len(classes))},
            json_file=str(folder / "annotations.json"),
            image_root=str(folder / "images"),
            evaluator_type="coco",
        )
