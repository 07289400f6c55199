"""Training entry points: the trainer, config set-up and the CPU/GPU launcher."""

from .launch import launch
from .prototype_refresh import PrototypeRefresh
from .trainer import Trainer, setup_cfg

__all__ = ["PrototypeRefresh", "Trainer", "launch", "setup_cfg"]
