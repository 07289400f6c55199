"""The project's ``DefaultTrainer`` and config set-up, shared by ``train_net.py`` and the tools."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator

import torch
from detectron2.config import CfgNode, get_cfg
from detectron2.data import MetadataCatalog
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.engine import defaults as d2_defaults
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, PascalVOCDetectionEvaluator
from detectron2.utils import comm

from ..config import add_gkd_config

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _ddp_without_device_ids(cfg: CfgNode) -> Iterator[None]:
    """On the CPU, make DefaultTrainer build DDP with ``device_ids=None``.

    DefaultTrainer passes ``device_ids=[local_rank]``, which DDP rejects for a CPU module; the
    constructor offers no other seam than the module-level ``create_ddp_model`` it calls.
    """
    if cfg.MODEL.DEVICE != "cpu":
        yield
        return
    original = d2_defaults.create_ddp_model
    d2_defaults.create_ddp_model = functools.partial(original, device_ids=None)
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = original


class Trainer(DefaultTrainer):
    """detectron2's DefaultTrainer, runnable on CPU processes, evaluating by dataset type."""

    def __init__(self, cfg: CfgNode):
        with _ddp_without_device_ids(cfg):
            super().__init__(cfg)

    def train(self) -> dict | None:
        """Train; return the final evaluation results (detectron2 0.6 returns them only when
        TEST.EXPECTED_RESULTS is set), or None when nothing was evaluated."""
        super().train()
        return getattr(self, "_last_eval_results", None)

    # detectron2 0.6 leaves the optimizer state (SGD momentum, the AMP grad scaler) out of its
    # checkpoints, so --resume restarted momentum from zero; later detectron2 versions save it
    # under "_trainer" as done here.
    def state_dict(self) -> dict:
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        else:
            logger.warning("The checkpoint has no optimizer state: momentum restarts from zero")

    @classmethod
    def build_evaluator(
        cls, cfg: CfgNode, dataset_name: str, output_folder: str | None = None
    ) -> DatasetEvaluator:
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        if evaluator_type == "coco":
            output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
            return COCOEvaluator(dataset_name, tasks=("bbox",), output_dir=output_folder)
        if evaluator_type == "pascal_voc":
            return PascalVOCDetectionEvaluator(dataset_name)
        raise ValueError(
            f"No evaluator for dataset {dataset_name!r}: its metadata evaluator_type is "
            f"{evaluator_type!r}; gkd_d2 evaluates 'coco' and 'pascal_voc' datasets"
        )


def setup_cfg(args) -> CfgNode:
    """Build the frozen config from ``--config-file`` and trailing ``KEY VALUE`` overrides.

    Falls back to the CPU (with a warning) when the config asks for CUDA on a machine without it,
    and applies ``NUM_THREADS``. Calls detectron2's ``default_setup`` (logging, seeding, output
    folder, the config dump).
    """
    cfg = get_cfg()
    add_gkd_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    cpu_fallback = cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available()
    if cpu_fallback:
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    default_setup(cfg, args)
    if cpu_fallback:
        logger.warning("No CUDA device: MODEL.DEVICE set to 'cpu'")
    if cfg.NUM_THREADS > 0:
        torch.set_num_threads(cfg.NUM_THREADS)
    if cfg.MODEL.DEVICE == "cpu" and comm.get_world_size() == 1:
        logger.info("Training on the CPU with %d torch threads", torch.get_num_threads())
    return cfg
