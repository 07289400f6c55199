"""COCO AP restricted to flagged ground-truth instances (e.g. the occluded or the blurred ones).

The accuracy benchmark asks where distillation helps: on small, occluded or blurred objects.
AP on a subset of instances is COCO AP with the other ground truths turned into "crowd" regions:
pycocotools then neither counts them as misses nor counts detections on them as false positives,
so only the flagged instances decide the score.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json

import numpy as np

COCO_METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def flagged_instance_ap(gt: dict, detections: list[dict], flag: str) -> dict[str, float]:
    """COCO bbox AP (x100) over the ground truths whose annotation has ``flag`` true.

    Args:
        gt: a COCO ground-truth dict (``images``, ``annotations``, ``categories``); annotations
            carry boolean ``flag`` entries (missing = false).
        detections: COCO results (``image_id``, ``category_id``, ``bbox`` XYWH, ``score``).
        flag: the annotation key selecting the instances, e.g. "occluded".

    Returns:
        AP, AP50, AP75, APs, APm, APl (NaN where no flagged instance of that kind exists) and
        ``count``, the number of flagged instances.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gt = copy.deepcopy(gt)
    count = 0
    for a in gt["annotations"]:
        if a.get(flag, False) and not a.get("iscrowd", 0):
            count += 1
        else:
            # a crowd region: detections on it are neither true nor false positives
            a["iscrowd"] = 1
    if count == 0:
        return {**{m: float("nan") for m in COCO_METRICS}, "count": 0}
    if not detections:  # every flagged instance missed
        return {**{m: 0.0 for m in COCO_METRICS}, "count": count}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(copy.deepcopy(detections))
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = [float(s) * 100 if s >= 0 else float("nan") for s in ev.stats[:6]]
    return {**dict(zip(COCO_METRICS, stats)), "count": count}


def flagged_instance_ap_from_files(gt_json: str, results_json: str, flag: str) -> dict[str, float]:
    """:func:`flagged_instance_ap` on a COCO ground-truth file and detectron2's
    ``coco_instances_results.json`` (written by COCOEvaluator into its output folder)."""
    with open(gt_json) as f:
        gt = json.load(f)
    with open(results_json) as f:
        detections = json.load(f)
    return flagged_instance_ap(gt, detections, flag)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value), ignoring NaN."""
    arr = np.array([v for v in values if v == v], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0
