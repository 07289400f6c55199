#!/usr/bin/env python
"""Prototype refresh: images forwarded, the second refresh's cost, and its share of an epoch.

    python -m benchmarks.bench_refresh [--config configs/quickstart_gkd_retinanet_cpu.yaml]
                                       [--steps 20] [KEY VALUE ...]

On a GKD config of the embedded scenes (the CPU quickstarts; the teacher's weights are random
unless MODEL.TEACHER.WEIGHTS names an existing file: the cost does not depend on them), with the
trainer's own PrototypeRefresh hook:
* counts the images forwarded by each model in the first and the second refresh, against the
  number of distinct sampled images and against what the official code forwards (each image
  once per class it holds a sampled box of);
* times both refreshes and --steps training steps, and prints each refresh's time as a share of
  the training time of one refresh period (target: <= 5 %).

At COCO scale, on a paper config with stand-in data of COCO-sized images:

    python -m benchmarks.bench_refresh --config configs/gkd.yaml --stand-in-data --steps 3 \
        --coco-projection SOLVER.IMS_PER_BATCH 2

``--stand-in-data`` writes the config's own COCO/VOC splits in detectron2's layouts to a
temporary ``DETECTRON2_DATASETS`` (``tools/rehearsal.py``: 4 training images of COCO sizes
holding all classes, 800-px input as configured) and random-init student and teacher weights
with calibrated FrozenBN. ``--coco-projection`` turns the measured
seconds per image of a refresh (both models, then the student only) and per training step at
batch 2 (one GPU's share of batch 16) into the refresh's share of one COCO epoch on 8 GPUs:
``images / 8 x s_per_image + selections x s_per_selection`` against ``7,329 x s_per_step``, for
``MAX_IMAGES_PER_CLASS`` 800 (the paper's) and fewer, with the memory of the cached teacher
features and of one (class, level) selection. The ratio of two CPU timings stands in for the
same ratio on a GPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import report

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/quickstart_gkd_retinanet_cpu.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--stand-in-data",
        action="store_true",
        help="write the config's builtin COCO/VOC splits to a temporary DETECTRON2_DATASETS",
    )
    parser.add_argument(
        "--coco-projection",
        action="store_true",
        help="project the refresh's share of one COCO epoch on 8 GPUs",
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp())
    if ns.stand_in_data:  # before detectron2's import: its builtin datasets read it then
        os.environ["DETECTRON2_DATASETS"] = str(tmp / "datasets")
    from types import SimpleNamespace

    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from gkd_d2.config import load_config
    from gkd_d2.engine import PrototypeRefresh, Trainer, setup_cfg
    from gkd_d2.engine.schedule import refresh_period
    from gkd_d2.teacher import load_teacher_cfg

    probe = load_config(str(REPO / ns.config), ns.opts)
    weights = probe.MODEL.TEACHER.WEIGHTS
    opts = list(ns.opts)
    if ns.stand_in_data:  # and random weights with calibrated FrozenBN (as tools/rehearse.py)
        from tools.rehearsal import write_builtin_splits, write_stand_in_weights

        write_builtin_splits(list(probe.DATASETS.TRAIN), list(probe.DATASETS.TEST), 4, 2, 20)
        student_w, teacher_w, _ = write_stand_in_weights(probe, tmp / "weights")
        weights = str(teacher_w)
        opts += ["MODEL.WEIGHTS", str(student_w)]
    elif not Path(weights).is_file():
        torch.manual_seed(0)
        weights = str(tmp / "random_teacher.pth")
        torch.save({"model": build_model(load_teacher_cfg(probe)).state_dict()}, weights)
    args = SimpleNamespace(
        config_file=str(REPO / ns.config),
        opts=[*opts, "MODEL.TEACHER.WEIGHTS", weights, "OUTPUT_DIR", str(tmp / "out")],
        eval_only=False,
        resume=False,
    )
    cfg = setup_cfg(args)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)  # MODEL.WEIGHTS (the stand-in student), as train_net
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

    period = refresh_period(cfg)
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
        result["levels"], result["teacher_channels"] = (
            model.distiller.protos_t.shape[0],
            model.distiller.protos_t.shape[-1],
        )
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
    if ns.coco_projection:
        result["coco_projection"] = coco_projection(result, cfg)
    report(result, ns.json)
    return 0 if ok else 1


# one COCO epoch of the paper configs: 117,266 images at batch 16 on 8 GPUs (2 per GPU)
COCO_ITERS_PER_EPOCH, COCO_GPUS, COCO_CLASSES = 7329, 8, 80
# qualifying instances (w, h > 30 px) per sampled image of a class, of that class: an
# assumption (COCO has 7.3 instances per image, about half above 30 px, several classes each)
INSTANCES_PER_SAMPLED_IMAGE = 2.0


def coco_projection(result: dict, cfg) -> dict:
    """The refresh's share of one COCO epoch per GPU, from this run's per-image and per-step
    seconds and a timed (class, level) selection at N = 2000 (see the module docstring)."""
    from benchmarks.bench_pgm import make_inputs
    from gkd_d2.distill.prototypes import select_prototypes

    g = cfg.MODEL.GKD
    images = result["distinct_sampled_images"]
    per_image_first = result["first_refresh_s"] / images
    per_image_later = result["second_refresh_s"] / images
    n = 2000
    xs, xt = make_inputs(n, 256)
    select_prototypes(xs, xt, g.NUM_PROTOTYPES)  # warm-up
    start = time.perf_counter()
    for _ in range(3):
        select_prototypes(xs, xt, g.NUM_PROTOTYPES, g.ALPHA, g.DENSITY_KERNEL, g.DENSITY_QUANTILE)
    per_selection = (time.perf_counter() - start) / 3
    levels = result["levels"]
    epoch = COCO_ITERS_PER_EPOCH * result["train_step_s"]
    rows = []
    for m in (800, 400, 200, 100):
        per_gpu = COCO_CLASSES * m / COCO_GPUS  # upper bound: images shared by classes count once
        # every rank runs all selections (after the all-gather); N scales with m
        select = COCO_CLASSES * levels * per_selection * (m / 800)
        rows.append(
            {
                "max_images_per_class": m,
                "images_per_gpu": per_gpu,
                "first_refresh_share": round((per_gpu * per_image_first + select) / epoch, 4),
                "later_refresh_share": round((per_gpu * per_image_later + select) / epoch, 4),
            }
        )
    instances = COCO_CLASSES * 800 * INSTANCES_PER_SAMPLED_IMAGE
    teacher_channels = result["teacher_channels"]
    return {
        "s_per_image_first_refresh": round(per_image_first, 3),
        "s_per_image_later_refresh": round(per_image_later, 3),
        "s_per_step_batch2": result["train_step_s"],
        "s_per_selection_n2000": round(per_selection, 4),
        "epoch_s_per_gpu": round(epoch, 1),
        "shares": rows,
        "assumed_instances_at_800_images_per_class": instances,
        "cached_teacher_features_mib": round(instances * levels * teacher_channels * 4 / 2**20),
        "selection_density_matrix_mib_n2000": round(n * n * 4 / 2**20, 1),
    }


if __name__ == "__main__":
    sys.exit(main())
