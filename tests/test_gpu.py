"""GPU checks (marked ``gpu``: skipped without CUDA). Run where a GPU is lent:
``.venv/bin/python -m pytest -q tests/test_gpu.py``."""

import math

import pytest
import torch
from conftest import REPO, setup_test_cfg
from detectron2.modeling import build_model

import gkd_d2  # noqa: F401
from gkd_d2 import load_config
from gkd_d2.engine import Trainer

CASES = [
    ("tiny_retinanet.yaml", "tiny_gkd_retinanet.yaml"),
    ("tiny_faster_rcnn.yaml", "tiny_gkd_faster_rcnn.yaml"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("teacher_cfg, gkd_cfg", CASES, ids=["retinanet", "faster_rcnn"])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp"])
def test_cuda_gkd_training_steps_are_finite(tmp_path, teacher_cfg, gkd_cfg, amp):
    """A few CUDA iterations of GKD (detectron2's AMPTrainer when AMP is on): every loss term
    finite, the distillation terms in fp32, the model on the GPU."""
    cfg = load_config(str(REPO / "tests" / "configs" / teacher_cfg))
    torch.save({"model": build_model(cfg).state_dict()}, tmp_path / "teacher.pth")
    cfg = setup_test_cfg(
        REPO / "tests" / "configs" / gkd_cfg,
        "MODEL.DEVICE",
        "cuda",
        "MODEL.TEACHER.WEIGHTS",
        str(tmp_path / "teacher.pth"),
        "SOLVER.AMP.ENABLED",
        str(amp),
        "SOLVER.MAX_ITER",
        "4",
        "TEST.EVAL_PERIOD",
        "0",
        "OUTPUT_DIR",
        str(tmp_path / "out"),
    )
    trainer = Trainer(cfg)
    seen = {}
    original = trainer.model.distiller.forward

    def spy(*args, **kwargs):
        losses, stats = original(*args, **kwargs)
        seen.update({k: v.dtype for k, v in losses.items()})
        return losses, stats

    trainer.model.distiller.forward = spy
    trainer.train()
    assert next(trainer.model.parameters()).is_cuda
    history = trainer.storage.histories()
    for key in ("total_loss", "loss_gkd_fg", "loss_gkd_bg", "loss_gkd_soft"):
        assert math.isfinite(history[key].latest()), key
    assert seen and all(dtype == torch.float32 for dtype in seen.values()), seen
