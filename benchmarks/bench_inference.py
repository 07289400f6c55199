#!/usr/bin/env python
"""Inference: the exported student vs the GKD model it came from, side by side.

    python -m benchmarks.bench_inference [--config configs/quickstart_gkd_retinanet_cpu.yaml]
                                         [--weights CKPT] [--images 50] [--rounds 3]
                                         [KEY VALUE ...]

Exports the student of a GKD checkpoint with tools/export_student.py (a randomly initialised
GKD model when --weights is not given), builds the plain detectron2 model from the exported
config, and runs both in eval mode on the same validation images, alternating per round. Asserts
identical detections (boxes, scores, classes) and prints the time ratio exported / GKD model
(expected 1.00 within noise: inference runs the student alone either way).
"""

from __future__ import annotations

import argparse
import statistics
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
    parser.add_argument("--weights", help="a GKD checkpoint; default: random weights")
    parser.add_argument("--images", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    ns = parser.parse_args(argv)
    from detectron2.config import get_cfg
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.modeling import build_model

    from gkd_d2.checkpoint import GKDCheckpointer
    from gkd_d2.config import load_config
    from tools.export_student import export_student

    tmp = Path(tempfile.mkdtemp())
    cfg = load_config(str(REPO / ns.config), ns.opts)
    if ns.weights is None:  # random weights score low: keep every box so outputs are compared
        cfg.MODEL.RETINANET.SCORE_THRESH_TEST = cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    cfg.MODEL.TEACHER.CONFIG_FILE = str(REPO / cfg.MODEL.TEACHER.CONFIG_FILE)
    gkd_model = build_model(cfg)
    weights = ns.weights
    if weights is None:
        weights = str(tmp / "gkd.pth")
        torch.save({"model": gkd_model.state_dict()}, weights)
    GKDCheckpointer(gkd_model).load(weights)
    _, config_out = export_student(cfg, weights, str(tmp / "student"))
    plain_cfg = get_cfg()
    plain_cfg.merge_from_file(config_out)
    plain = build_model(plain_cfg)
    GKDCheckpointer(plain).load(plain_cfg.MODEL.WEIGHTS)
    mapper = DatasetMapper(plain_cfg, is_train=False)
    inputs = [mapper(dict(d)) for d in DatasetCatalog.get(plain_cfg.DATASETS.TEST[0])]
    inputs = inputs[: ns.images]
    gkd_model.eval()
    plain.eval()
    times = {"gkd": [], "exported": []}
    identical = True
    with torch.no_grad():
        for x in inputs[:2]:  # warm-up
            gkd_model([x]), plain([x])
        for _ in range(ns.rounds):
            for name, model in (("gkd", gkd_model), ("exported", plain)):
                start = time.perf_counter()
                outs = [model([x])[0]["instances"] for x in inputs]
                times[name].append(time.perf_counter() - start)
                if name == "gkd":
                    reference = outs
                else:
                    identical &= all(
                        torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
                        and torch.equal(a.scores, b.scores)
                        and torch.equal(a.pred_classes, b.pred_classes)
                        for a, b in zip(reference, outs)
                    )
    med = {k: statistics.median(v) / len(inputs) for k, v in times.items()}
    result = {
        "config": ns.config,
        "images": len(inputs),
        "gkd_model_s_per_image": round(med["gkd"], 4),
        "exported_s_per_image": round(med["exported"], 4),
        "time_ratio_exported_to_gkd": round(med["exported"] / med["gkd"], 3),
        "identical_detections": identical,
    }
    report(result, ns.json)
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
