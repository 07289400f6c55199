"""The tiny scene splits of the tests (``tests/configs/tiny_*.yaml``): ``gkd_scenes_tiny_train``
(32 images of 128 px) and ``gkd_scenes_tiny_val`` (16), generated on first load like the
quick-start splits that ``import gkd_d2`` registers."""

from gkd_d2.data import SceneSpec, register_scene_split

# name -> (split, spec, seed); train and val draw from different per-image RNGs
TINY_SPLITS = {
    "gkd_scenes_tiny_train": ("train", SceneSpec(num_images=32, image_size=128), 0),
    "gkd_scenes_tiny_val": ("val", SceneSpec(num_images=16, image_size=128), 0),
}


def register_tiny_datasets() -> None:
    """Register the tiny splits with detectron2 (again is harmless)."""
    for name, (split, spec, seed) in TINY_SPLITS.items():
        register_scene_split(name, split, spec, seed)
