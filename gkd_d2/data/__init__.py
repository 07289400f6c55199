"""Datasets of gkd_d2: the embedded scene generator and its detectron2 registration."""

from .builtin import EMBEDDED_SPLITS, ensure_split, register_embedded_datasets, split_dir
from .scenes import SHAPE_CLASSES, SceneSpec, generate_split, render_scene

__all__ = [
    "EMBEDDED_SPLITS",
    "SHAPE_CLASSES",
    "SceneSpec",
    "ensure_split",
    "generate_split",
    "register_embedded_datasets",
    "render_scene",
    "split_dir",
]
