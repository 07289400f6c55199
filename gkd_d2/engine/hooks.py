"""GKD in any detectron2 trainer: the hooks a GKD meta-architecture needs while it trains.

class MyTrainer(DefaultTrainer):
    def build_hooks(self):
        return build_gkd_hooks(self.cfg) + super().build_hooks()
"""

from __future__ import annotations

from collections.abc import Callable

from detectron2.config import CfgNode
from detectron2.engine import HookBase
from detectron2.evaluation import DatasetEvaluator

from .evaluators import build_evaluator as evaluator_by_type
from .gkd_model import gkd_model_of, is_gkd_architecture, needs_prototypes, unwrap_ddp
from .prototype_refresh import PrototypeRefresh
from .teacher_check import TeacherCheck

# gkd_model_of and its kin are importable from here as before (they live in gkd_model.py, which
# the hooks import without importing this module back)
__all__ = [
    "LossShares",
    "PrototypeRefresh",
    "TeacherCheck",
    "build_gkd_hooks",
    "gkd_model_of",
    "is_gkd_architecture",
    "needs_prototypes",
    "unwrap_ddp",
]


class LossShares(HookBase):
    """Logs each distillation term's share of the total loss, so that a term that swamps the
    detection losses shows: ``gkd/loss_share_<term>`` (``loss_gkd_soft`` ->
    ``gkd/loss_share_soft``) and ``gkd/loss_share_kd`` for all of them together.

    Read from what the trainer logged for the iteration (``total_loss`` and the losses, already
    averaged over ranks), after the step: it costs no device synchronisation. Only the process
    that holds those values (the main one) logs the shares.
    """

    def before_train(self) -> None:
        self._names = gkd_model_of(self.trainer).distiller.loss_names

    def after_step(self) -> None:
        latest = self.trainer.storage.latest()
        total = latest.get("total_loss")
        if total is None or total[1] != self.trainer.iter or total[0] == 0:
            return
        shares = {
            name: latest[name][0] / total[0]
            for name in self._names
            if name in latest and latest[name][1] == self.trainer.iter
        }
        if not shares:
            return
        scalars = {
            "gkd/loss_share_" + name.removeprefix("loss_gkd_").removeprefix("loss_"): v
            for name, v in shares.items()
        }
        scalars["gkd/loss_share_kd"] = sum(shares.values())
        self.trainer.storage.put_scalars(**scalars)


def build_gkd_hooks(
    cfg: CfgNode,
    build_evaluator: Callable[[CfgNode, str, str], DatasetEvaluator] | None = None,
) -> list[HookBase]:
    """The hooks of a GKD run, to put before a trainer's own hooks (any ``TrainerBase`` with a
    ``model``; ``DefaultTrainer`` and train_net.py's ``Trainer`` alike).

    - the teacher check (MODEL.TEACHER.CHECK_IMAGES > 0): before iteration 0, the teacher's
      bbox AP on a seeded subset; training stops when it is below MODEL.TEACHER.MIN_AP;
    - the prototype refresh (PGM, paper section 3.2), unless the config is local-only KD:
      before iteration 0 and then every MODEL.GKD.REFRESH_PERIOD iterations (one epoch);
    - :class:`LossShares`: each distillation term's share of the total loss, logged.

    Both build the student's frozen teacher from MODEL.TEACHER.* when it has none yet. For a
    config that is not a GKD meta-architecture (e.g. the teacher's own training) the list is
    empty, so one trainer serves both.

    Args:
        build_evaluator: the teacher check's evaluator, ``(cfg, dataset_name, folder)``; by
            default COCO or VOC AP by the dataset's ``evaluator_type``.
    """
    if not is_gkd_architecture(cfg):
        return []
    ret: list[HookBase] = []
    if cfg.MODEL.TEACHER.CHECK_IMAGES > 0:
        # first: a useless teacher stops the run before anything else runs
        ret.append(TeacherCheck(cfg, build_evaluator or evaluator_by_type))
    if needs_prototypes(cfg):
        ret.append(PrototypeRefresh(cfg))
    ret.append(LossShares())
    return ret
