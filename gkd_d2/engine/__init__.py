"""Training: the GKD hooks for any detectron2 trainer, train_net.py's trainer, config set-up and
the CPU/GPU launcher."""

from .hooks import build_gkd_hooks
from .launch import launch
from .prototype_refresh import PrototypeRefresh
from .teacher_check import TeacherCheck
from .trainer import Trainer, setup_cfg
from .training_inputs import TransformRecordingMapper

__all__ = [
    "PrototypeRefresh",
    "TeacherCheck",
    "Trainer",
    "TransformRecordingMapper",
    "build_gkd_hooks",
    "launch",
    "setup_cfg",
]
