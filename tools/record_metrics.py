#!/usr/bin/env python
"""Record every scalar of every iteration of a short, fixed-seed GKD run, as JSON.

    python -m tools.record_metrics --detector retinanet --output metrics.json [--iters 30]

The run: the quick-start teacher of the detector trained for ``--teacher-iters`` iterations, then
the quick-start GKD student for ``--iters`` iterations with a prototype refresh at iteration 0
and another at ``--refresh-period``, on the embedded scenes, in this process, through
train_net.py's ``Trainer``. Two recordings of the same code on the same machine are equal to
the last digit; a refactor that claims to keep behaviour is checked with them.
"""

from __future__ import annotations

import argparse
import json
import os
from types import SimpleNamespace

import torch
from detectron2.engine import HookBase

import gkd_d2  # noqa: F401  (registers datasets and models)
from gkd_d2.engine import Trainer, setup_cfg

CONFIGS = {
    "retinanet": (
        "configs/quickstart_retinanet_cpu.yaml",
        "configs/quickstart_gkd_retinanet_cpu.yaml",
    ),
    "faster_rcnn": (
        "configs/quickstart_faster_rcnn_cpu.yaml",
        "configs/quickstart_gkd_faster_rcnn_cpu.yaml",
    ),
}


class ScalarRecorder(HookBase):
    """Every scalar written during an iteration (losses, r statistics, refresh summaries)."""

    def __init__(self):
        self.rows: list[dict] = []

    def after_step(self) -> None:
        it = self.trainer.iter
        latest = self.trainer.storage.latest()
        self.rows.append({"iter": it, **{k: v for k, (v, i) in sorted(latest.items()) if i == it}})


def train(config_file: str, *opts: str) -> Trainer:
    args = SimpleNamespace(config_file=config_file, eval_only=False, resume=False, opts=list(opts))
    cfg = setup_cfg(args)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    return trainer


def record(detector: str, output_dir: str, iters: int, teacher_iters: int, period: int) -> dict:
    teacher_cfg, student_cfg = CONFIGS[detector]
    teacher_dir = os.path.join(output_dir, "teacher")
    common = ["SEED", "0", "TEST.EVAL_PERIOD", "0", "DATASETS.TEST", "()"]
    teacher = train(
        teacher_cfg,
        *common,
        "SOLVER.MAX_ITER",
        str(teacher_iters),
        "SOLVER.CHECKPOINT_PERIOD",
        "100000",
        "OUTPUT_DIR",
        teacher_dir,
    )
    teacher.train()
    del teacher
    student = train(
        student_cfg,
        *common,
        "SOLVER.MAX_ITER",
        str(iters),
        "SOLVER.CHECKPOINT_PERIOD",
        "100000",
        "MODEL.TEACHER.WEIGHTS",
        os.path.join(teacher_dir, "model_final.pth"),
        "MODEL.TEACHER.CHECK_IMAGES",
        "4",
        "MODEL.TEACHER.MIN_AP",
        "0.0",
        "MODEL.GKD.REFRESH_PERIOD",
        str(period),
        "MODEL.GKD.MAX_IMAGES_PER_CLASS",
        "8",
        "OUTPUT_DIR",
        os.path.join(output_dir, "student"),
    )
    recorder = ScalarRecorder()
    student.register_hooks([recorder])
    student.train()
    return {
        "detector": detector,
        "iters": iters,
        "teacher_iters": teacher_iters,
        "refresh_period": period,
        "torch": torch.__version__,
        "rows": recorder.rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--detector", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--output", required=True, help="the JSON file to write")
    parser.add_argument("--work-dir", default="output/record_metrics")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--teacher-iters", type=int, default=30)
    parser.add_argument("--refresh-period", type=int, default=15)
    a = parser.parse_args()
    result = record(
        a.detector, os.path.join(a.work_dir, a.detector), a.iters, a.teacher_iters, a.refresh_period
    )
    with open(a.output, "w") as f:
        json.dump(result, f, indent=1)
    print(f"record_metrics: {len(result['rows'])} iterations written to {a.output}")


if __name__ == "__main__":
    main()
