#!/usr/bin/env python
"""Rehearse a paper-protocol config end to end, at its real input size, on tiny stand-in data.

    python -m tools.rehearse --config-file configs/gkd.yaml [--output output/rehearsal/gkd]

(from the repository root: it imports its sibling ``tools/rehearsal.py``).

The config runs exactly as shipped through ``train_net.py`` (800-px input, 80 COCO / 20 VOC
classes, R101 teacher, R50 student, the prototype refresh every epoch), with only these
overrides:

* data: ``DETECTRON2_DATASETS`` points at a folder where the config's own datasets
  (``coco_2017_train``, ``voc_2007_trainval``, ...) are written in detectron2's layouts with
  their real category sets and ids: 4 training images of COCO sizes holding every class, 2 test
  images (``tools/rehearsal.py``);
* weights: ``MODEL.WEIGHTS`` and ``MODEL.TEACHER.WEIGHTS`` are local files of the same
  architectures from random init (each FrozenBN's scale and bias set from one pass over two
  stand-in images, as trained statistics would be: detectron2's identity FrozenBN lets R101's
  activations grow to 1e7), in the format the shipped paths have (detectron2 model-zoo ``.pkl``;
  the MSRA ImageNet ``.pkl`` in Caffe2 names; a trained ``model_final.pth``), so that
  detectron2's own loading paths run;
* schedule: ``SOLVER.IMS_PER_BATCH 2`` (what each of the 8 GPUs of the shipped batch 16 holds)
  with ``SOLVER.BASE_LR`` scaled by the same factor and by 1e-3 (random weights diverge at the
  full rate within the few iterations), ``SOLVER.MAX_ITER 3`` (an epoch is 2
  iterations here, so the epoch refresh runs at iterations 0 and 2), then ``--resume`` to 5
  (a refresh at 4, in a new process);
* random weights score below the 0.05 test threshold and far below the teacher check's floor:
  ``MODEL.TEACHER.MIN_AP 0`` (the check still runs and logs the AP) and the test score
  threshold 0, so that every evaluation has detections to compare.

Stages: data, weights, train (teacher load and check, first refresh over all classes and
levels, 3 iterations, second refresh, final evaluation), resume, eval-only, export, and the
export evaluated by stock detectron2 alone (no gkd_d2 import), which must give the eval-only
AP. A failure names the stage, the config keys or file it depends on, and the log. The results
compared are each run's ``results.json`` (train_net.py's final evaluation). Writes
``OUTPUT/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TRAIN_IMAGES, TEST_IMAGES, BOXES_PER_IMAGE = 4, 2, 20
FIRST_RUN_ITERS, RESUMED_ITERS = 3, 5
LR_FACTOR = 1e-3

# what a stage depends on: named in its failure
STAGE_KEYS = {
    "data": "DATASETS.TRAIN / DATASETS.TEST (detectron2 builtin COCO or VOC splits)",
    "weights": "MODEL.WEIGHTS, MODEL.TEACHER.CONFIG_FILE, MODEL.TEACHER.WEIGHTS",
    "train": "see the error above; MODEL.TEACHER.* (teacher, check), MODEL.GKD.* (refresh, "
    "losses), SOLVER.*",
    "resume": "OUTPUT_DIR/last_checkpoint, SOLVER.MAX_ITER",
    "eval-only": "MODEL.WEIGHTS, DATASETS.TEST, TEST.*",
    "export": "tools/export_student.py, MODEL.META_ARCHITECTURE",
    "plain-eval": "the exported config.yaml and model_final.pth",
}


class RehearsalError(RuntimeError):
    """A stage of the rehearsal failed."""


def fail(stage: str, config: str, why: str, log: Path | None = None) -> RehearsalError:
    where = f"\nlog: {log}" if log else ""
    return RehearsalError(
        f"rehearsal of {config} failed at stage {stage!r}: {why}\n"
        f"look at: {STAGE_KEYS[stage]} in {config}{where}"
    )


def last_error(log: Path, lines: int = 12) -> str:
    """The traceback's last lines (or the log's tail) of a failed run."""
    text = log.read_text(errors="replace").splitlines()
    starts = [i for i, line in enumerate(text) if line.startswith("Traceback")]
    tail = text[starts[-1] :] if starts else text
    return "\n".join(tail[-lines:])


def run(cmd: list[str], log: Path, env: dict, stage: str, config: str) -> str:
    """Run ``cmd`` from the repository root, output to ``log``; its output, or a RehearsalError."""
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise fail(stage, config, f"exit code {proc.returncode}\n{last_error(log)}", log)
    return log.read_text(errors="replace")


def final_results(output_dir: Path) -> dict[str, dict[str, float | None]]:
    """The summary metrics (AP, AP50, ...; not the per-class ``AP-<class>``) per task of the
    ``results.json`` a run wrote to ``output_dir``."""
    from gkd_d2.engine.results import read_results

    return {
        task: {
            # nan (no ground truth of a size) as None, so that results compare equal and
            # summary.json stays strict JSON
            k: None if isinstance(v, float) and math.isnan(v) else v
            for k, v in metrics.items()
            if "-" not in k
        }
        for task, metrics in read_results(str(output_dir)).items()
    }


def plain_eval(config: str) -> int:
    """Evaluate an exported student with stock detectron2 alone (the plain-eval stage)."""
    import torch
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import get_cfg
    from detectron2.data import MetadataCatalog
    from detectron2.engine import DefaultTrainer
    from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
    from detectron2.modeling import build_model
    from detectron2.utils.logger import setup_logger

    setup_logger(name="detectron2")  # the evaluation's tables in plain_eval.log
    cfg = get_cfg()
    cfg.merge_from_file(config)
    if not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    name = cfg.DATASETS.TEST[0]
    out = os.path.join(cfg.OUTPUT_DIR, "plain_eval")
    if MetadataCatalog.get(name).evaluator_type == "pascal_voc":
        evaluator = PascalVOCDetectionEvaluator(name)
    else:
        evaluator = COCOEvaluator(name, output_dir=out)
    results = DefaultTrainer.test(cfg, model, evaluators=[evaluator])
    assert "gkd_d2" not in sys.modules, "the plain evaluation imported gkd_d2"
    # train_net.py's results.json format (null for nan), written without gkd_d2's write_results:
    # importing gkd_d2 here would defeat the stage
    plain = {
        task: {k: v if math.isfinite(v) else None for k, v in metrics.items()}
        for task, metrics in results.items()
    }
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(plain, f, indent=1)
    return 0


def rehearse(config: str, output: Path) -> dict:
    import torch

    from gkd_d2.config import load_config
    from gkd_d2.engine.teacher_check import parse_teacher_check
    from tools.rehearsal import RehearsalDataError, write_builtin_splits, write_stand_in_weights

    output.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, DETECTRON2_DATASETS=os.environ["DETECTRON2_DATASETS"])
    timings: dict[str, float] = {}
    summary: dict = {"config": config, "output": str(output), "seconds": timings}

    start = time.perf_counter()
    cfg = load_config(str(REPO / config))
    try:
        summary["data"] = write_builtin_splits(
            list(cfg.DATASETS.TRAIN),
            list(cfg.DATASETS.TEST),
            TRAIN_IMAGES,
            TEST_IMAGES,
            BOXES_PER_IMAGE,
        )
    except (RehearsalDataError, OSError) as e:
        raise fail("data", config, str(e)) from None
    timings["data"] = time.perf_counter() - start

    start = time.perf_counter()
    try:
        student_w, teacher_w, calibrated = write_stand_in_weights(cfg, output / "weights")
    except Exception as e:
        raise fail("weights", config, f"{type(e).__name__}: {e}") from None
    summary["calibrated_frozen_bn"] = calibrated
    timings["weights"] = time.perf_counter() - start
    summary["weights"] = {"student": str(student_w), "teacher": str(teacher_w)}

    # batch 2: one GPU's share; the learning rate scaled with it, and by LR_FACTOR more: at the
    # full rate, 3 iterations squeeze detectron2's warmup (WARMUP_ITERS / MAX_ITER, capped at 1)
    # and random weights diverge (Faster R-CNN: imitation losses 1e7 at iteration 4, no
    # detections left); learning is not what a rehearsal checks, every code path runs the same
    scale = 2 / cfg.SOLVER.IMS_PER_BATCH * LR_FACTOR
    score = (
        "MODEL.RETINANET.SCORE_THRESH_TEST"
        if cfg.MODEL.META_ARCHITECTURE == "GKDRetinaNet"
        else "MODEL.ROI_HEADS.SCORE_THRESH_TEST"
    )
    overrides = [
        "MODEL.WEIGHTS",
        str(student_w),
        "MODEL.TEACHER.WEIGHTS",
        str(teacher_w),
        "SOLVER.IMS_PER_BATCH",
        "2",
        "SOLVER.BASE_LR",
        repr(cfg.SOLVER.BASE_LR * scale),
        "MODEL.TEACHER.MIN_AP",
        "0.0",
        score,
        "0.0",
    ]
    summary["overrides"] = overrides
    train_dir = output / "train"
    train_net = str(REPO / "train_net.py")

    def stage(name: str, *argv: str) -> str:
        """Run one stage's script (``OUTPUT/<name>.log``), timed; its output."""
        start = time.perf_counter()
        log = output / f"{name.replace('-', '_')}.log"
        text = run([sys.executable, *argv], log, env, name, config)
        timings[name] = time.perf_counter() - start
        return text

    text = stage(
        "train",
        train_net,
        "--config-file",
        config,
        *overrides,
        "SOLVER.MAX_ITER",
        str(FIRST_RUN_ITERS),
        "OUTPUT_DIR",
        str(train_dir),
    )
    refreshes = re.findall(
        r"PGM refresh at iteration (\d+) \(\w+\): (\d+) instances in (\d+) images.*?; ([\d.]+)s",
        text,
    )
    summary["teacher_check"] = parse_teacher_check(text)
    summary["refreshes"] = [
        {"iteration": int(i), "instances": int(n), "images": int(m), "seconds": float(s)}
        for i, n, m, s in refreshes
    ]
    if summary["teacher_check"] is None:
        raise fail("train", config, "the teacher check did not run", output / "train.log")
    if [r["iteration"] for r in summary["refreshes"]] != [0, 2]:
        raise fail(
            "train",
            config,
            f"refreshes at {refreshes}, expected at iterations 0 and 2 "
            "(one epoch of 4 images at batch 2)",
            output / "train.log",
        )
    state = torch.load(train_dir / "model_final.pth", map_location="cpu", weights_only=True)
    counts = state["model"]["distiller.proto_counts"]
    summary["prototypes"] = {
        "levels": counts.shape[0],
        "classes": counts.shape[1],
        "min_per_class_level": int(counts.min()),
        "max_per_class_level": int(counts.max()),
        "iteration_of_bank": int(state["model"]["distiller.bank_iter"]),
    }
    if int(counts.min()) == 0:
        empty = (counts == 0).nonzero().tolist()
        raise fail(
            "train",
            config,
            f"(level, class) pairs without prototypes: {empty[:10]}",
            output / "train.log",
        )
    summary["train_results"] = final_results(train_dir)

    text = stage(
        "resume",
        train_net,
        "--config-file",
        config,
        "--resume",
        *overrides,
        "SOLVER.MAX_ITER",
        str(RESUMED_ITERS),
        "OUTPUT_DIR",
        str(train_dir),
    )
    started = re.search(r"Starting training from iteration (\d+)", text)
    if not started or int(started.group(1)) != FIRST_RUN_ITERS:
        raise fail(
            "resume",
            config,
            "did not continue from iteration "
            f"{FIRST_RUN_ITERS}: {started.group(0) if started else 'no start line'}",
            output / "resume.log",
        )
    resumed = re.findall(r"PGM refresh at iteration (\d+) .*? and (\d+) through the teacher", text)
    summary["resume"] = {
        "started_at": int(started.group(1)),
        "refreshes": [int(i) for i, _ in resumed],
    }
    if [i for i, _ in resumed] != ["4"]:
        raise fail(
            "resume",
            config,
            f"refreshes at {resumed} after resuming, expected at 4",
            output / "resume.log",
        )
    if resumed[0][1] != "0":  # the teacher's features come from OUTPUT_DIR's cache
        raise fail(
            "resume",
            config,
            f"the refresh after resuming forwarded {resumed[0][1]} images through the teacher, "
            "expected 0 (its features cached in OUTPUT_DIR/gkd_teacher_features.pth)",
            output / "resume.log",
        )

    final = train_dir / "model_final.pth"
    stage(
        "eval-only",
        train_net,
        "--config-file",
        config,
        "--eval-only",
        *overrides,
        "MODEL.WEIGHTS",
        str(final),
        "OUTPUT_DIR",
        str(output / "eval"),
    )
    summary["eval_only"] = final_results(output / "eval")

    export_dir = output / "student"
    stage(
        "export",
        str(REPO / "tools" / "export_student.py"),
        "--config-file",
        config,
        "--weights",
        str(final),
        "--output",
        str(export_dir),
        *overrides[4:],
        "OUTPUT_DIR",
        str(output / "plain"),
    )

    stage("plain-eval", "-m", "tools.rehearse", "--plain-eval", str(export_dir / "config.yaml"))
    summary["plain_eval"] = final_results(output / "plain" / "plain_eval")
    if not summary["eval_only"] or summary["plain_eval"] != summary["eval_only"]:
        raise fail(
            "plain-eval",
            config,
            f"stock detectron2 gives {summary['plain_eval']}, --eval-only {summary['eval_only']}",
            output / "plain_eval.log",
        )
    ours = output / "eval" / "inference" / cfg.DATASETS.TEST[0] / "coco_instances_results.json"
    plain = output / "plain" / "plain_eval" / "coco_instances_results.json"
    if ours.exists() or plain.exists():  # COCO: the detections themselves (VOC writes none)
        same = ours.exists() and plain.exists() and ours.read_bytes() == plain.read_bytes()
        summary["detections"] = len(json.loads(ours.read_text())) if ours.exists() else None
        summary["same_detections"] = same
        if not summary["detections"]:
            raise fail("plain-eval", config, f"no detections in {ours}: nothing was compared")
        if not same:
            raise fail("plain-eval", config, f"the detections {plain} differ from {ours}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", help="a GKD config of COCO or VOC, e.g. configs/gkd.yaml")
    parser.add_argument("--output", type=Path, help="default: output/rehearsal/<config name>")
    parser.add_argument("--plain-eval", metavar="CONFIG", help=argparse.SUPPRESS)
    ns = parser.parse_args(argv)
    if ns.plain_eval:
        return plain_eval(ns.plain_eval)
    if not ns.config_file:
        parser.error("--config-file is required")
    name = Path(ns.config_file).with_suffix("").as_posix().replace("configs/", "").replace("/", "_")
    output = (ns.output or REPO / "output" / "rehearsal" / name).resolve()
    # before detectron2 is imported: its builtin datasets resolve their paths from it
    os.environ["DETECTRON2_DATASETS"] = str(output / "datasets")
    try:
        summary = rehearse(ns.config_file, output)
    except RehearsalError as e:
        print(e, file=sys.stderr)
        return 1
    (output / "summary.json").write_text(json.dumps(summary, indent=1, allow_nan=False))
    t = summary["seconds"]
    print(
        f"rehearsal of {ns.config_file}: green in {sum(t.values()):.0f} s "
        + ", ".join(f"{k} {v:.0f} s" for k, v in t.items())
        + f"; teacher check AP {summary['teacher_check']['ap']}; refreshes "
        + ", ".join(
            f"it {r['iteration']}: {r['images']} images, {r['seconds']:.1f} s"
            for r in summary["refreshes"]
        )
        + f"; prototypes on all {summary['prototypes']['classes']} classes x "
        f"{summary['prototypes']['levels']} levels; eval-only = stock detectron2 on the export: "
        f"{summary['eval_only']}; summary: {output / 'summary.json'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
