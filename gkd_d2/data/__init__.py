"""Datasets of gkd_d2: the quick-start scene generator and its detectron2 registration."""

from .builtin import (
    QUICKSTART_SPLITS,
    register_generated_split,
    register_quickstart_datasets,
    register_scene_split,
    scenes_root,
)
from .scenes import SHAPE_CLASSES, SceneSpec, generate_split, render_scene

__all__ = [
    "QUICKSTART_SPLITS",
    "SHAPE_CLASSES",
    "SceneSpec",
    "generate_split",
    "register_generated_split",
    "register_quickstart_datasets",
    "register_scene_split",
    "render_scene",
    "scenes_root",
]
