#!/usr/bin/env python
"""Prototype refresh: images forwarded, the second refresh's cost, and its share of an epoch.

    python benchmarks/bench_refresh.py [--config configs/quickstart_gkd_retinanet_cpu.yaml]
                                       [--steps 20] [KEY VALUE ...]

On a GKD config of the embedded scenes (the CPU quickstarts; the teacher's weights are random
unless MODEL.TEACHER.WEIGHTS names an existing file: the cost does not depend on them), with the
trainer's own PrototypeRefresh hook:
* counts the images forwarded by each model in the first and the second refresh, against the
  number of distinct sampled images and against what the official code forwards (each image
  once per class it holds a sampled box of);
* times both refreshes and --steps training steps, and prints each refresh's time as a share of
  the training time of one refresh period (target: <= 5 %).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from harness import report  # noqa: E402  (benchmarks/, the script's folder)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/quickstart_gkd_retinanet_cpu.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    from types import SimpleNamespace

    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    import gkd_d2
    from gkd_d2.engine import PrototypeRefresh, Trainer, setup_cfg
    from gkd_d2.teacher import load_teacher_cfg

    tmp = Path(tempfile.mkdtemp())
    probe = gkd_d2.add_gkd_config(get_cfg())
    gkd_d2.config.merge_config(probe, str(REPO / ns.config), ns.opts)
    weights = probe.MODEL.TEACHER.WEIGHTS
    if not Path(weights).is_file():
        torch.manual_seed(0)
        weights = str(tmp / "random_teacher.pth")
        torch.save({"model": build_model(load_teacher_cfg(probe)).state_dict()}, weights)
    args = SimpleNamespace(
        config_file=str(REPO / ns.config),
        opts=[*ns.opts, "MODEL.TEACHER.WEIGHTS", weights, "OUTPUT_DIR", str(tmp / "out")],
        eval_only=False,
        resume=False,
    )
    cfg = setup_cfg(args)
    trainer = Trainer(cfg)
    (hook,) = [h for h in trainer._hooks if isinstance(h, PrototypeRefresh)]
    model = trainer.model
    counts = {"student": 0, "teacher": 0}
    backbone_forward = model.backbone.forward
    teacher_features = model.teacher.features

    def count_student(x):
        counts["student"] += x.shape[0]
        return backbone_forward(x)

    def count_teacher(inputs):
        counts["teacher"] += len(inputs)
        return teacher_features(inputs)

    period = Trainer.refresh_period(cfg)
    result = {"config": ns.config, "refresh_period_iters": period}
    with EventStorage(0) as storage:
        trainer.storage = storage
        model.backbone.forward = count_student
        model.teacher.features = count_teacher
        for name, it in (("first", 0), ("second", period)):
            counts.update(student=0, teacher=0)
            start = time.perf_counter()
            hook.refresh(it)
            result[f"{name}_refresh_s"] = round(time.perf_counter() - start, 3)
            result[f"{name}_student_images"] = counts["student"]
            result[f"{name}_teacher_images"] = counts["teacher"]
        model.backbone.forward = backbone_forward
        model.teacher.features = teacher_features
        inst = hook.instances
        result["sampled_instances"] = len(inst["cls"])
        result["distinct_sampled_images"] = len(set(inst["image"].tolist()))
        result["official_image_passes"] = sum(
            len(set(inst["image"][inst["cls"] == c].tolist())) for c in inst["cls"].unique()
        )
        trainer._trainer.storage = storage
        trainer.run_step()  # warm-up
        start = time.perf_counter()
        for _ in range(ns.steps):
            trainer.run_step()
        step = (time.perf_counter() - start) / ns.steps
    result["train_step_s"] = round(step, 4)
    result["first_refresh_share_of_period"] = round(result["first_refresh_s"] / (period * step), 4)
    result["second_refresh_share_of_period"] = round(
        result["second_refresh_s"] / (period * step), 4
    )
    ok = (
        result["first_student_images"] == result["distinct_sampled_images"]
        and result["first_teacher_images"] == result["distinct_sampled_images"]
        and result["second_student_images"] == result["distinct_sampled_images"]
        and result["second_teacher_images"] == 0
    )
    result["counts_as_expected"] = ok
    report(result, ns.json)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
