"""Which model GKD trains: whether a config builds a GKD student, and the student a trainer
trains. Shared by the hooks and the trainer, and importing none of them."""

from __future__ import annotations

from detectron2.config import CfgNode
from detectron2.engine import TrainerBase
from detectron2.modeling import META_ARCH_REGISTRY
from torch import nn

from ..modeling import DistilledDetector


def is_gkd_architecture(cfg: CfgNode) -> bool:
    """Whether ``cfg`` builds a GKD student (a :class:`DistilledDetector`)."""
    try:
        arch = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    except KeyError:
        return False
    return isinstance(arch, type) and issubclass(arch, DistilledDetector)


def needs_prototypes(cfg: CfgNode) -> bool:
    """Whether the distiller of ``cfg`` uses prototypes: r (ROBUST_WEIGHTS) or the global loss;
    the local-only baseline needs no prototype generation."""
    return cfg.MODEL.GKD.ROBUST_WEIGHTS or cfg.MODEL.GKD.GLOBAL_WEIGHT > 0


def unwrap_ddp(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (its ``module``), or ``model`` itself."""
    return getattr(model, "module", model)


def gkd_model_of(trainer: TrainerBase) -> DistilledDetector:
    """The GKD student that ``trainer`` trains (its DDP wrapper's ``module`` when wrapped).

    Raises:
        TypeError: the trainer's model is not a GKD meta-architecture.
    """
    model = unwrap_ddp(trainer.model)
    if not isinstance(model, DistilledDetector):
        raise TypeError(
            f"gkd_d2's hooks need a GKD student (GKDRetinaNet, GKDRCNN), but the trainer trains "
            f"a {type(model).__name__}: set MODEL.META_ARCHITECTURE to a GKD meta-architecture"
        )
    return model
