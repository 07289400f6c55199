"""Datasets of gkd_d2: the embedded scene generator and its detectron2 registration."""

from .builtin import (
    EMBEDDED_SPLITS,
    FASHION_SPLITS,
    ensure_split,
    register_embedded_datasets,
    split_dir,
)
from .fashion_scenes import (
    FASHION_CLASSES,
    FashionSceneSpec,
    generate_fashion_split,
    render_fashion_scene,
)
from .scenes import SHAPE_CLASSES, SceneSpec, generate_split, render_scene

__all__ = [
    "EMBEDDED_SPLITS",
    "FASHION_CLASSES",
    "FASHION_SPLITS",
    "FashionSceneSpec",
    "SHAPE_CLASSES",
    "SceneSpec",
    "ensure_split",
    "generate_fashion_split",
    "generate_split",
    "register_embedded_datasets",
    "render_fashion_scene",
    "render_scene",
    "split_dir",
]
