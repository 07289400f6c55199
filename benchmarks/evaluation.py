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


def student_t_cdf(x: float, df: int) -> float:
    """P(T <= x) of Student's t with ``df`` degrees of freedom (Simpson's rule on the density:
    error below 1e-9 for df >= 1 and |x| <= 100; no scipy on this stack)."""
    import math

    if not x == x:
        return float("nan")
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)
    a = min(abs(x), 1e3)
    n = 20000  # even
    u = np.linspace(0.0, a, n + 1)
    f = c * (1.0 + u * u / df) ** (-(df + 1) / 2)
    integral = (a / n / 3.0) * (f[0] + f[-1] + 4.0 * f[1:-1:2].sum() + 2.0 * f[2:-1:2].sum())
    return 0.5 + math.copysign(integral, x)


def student_t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`student_t_cdf`), 0.5 < p < 1."""
    lo, hi = 0.0, 1e3
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if student_t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def paired_difference(a: list[float], b: list[float], level: float = 0.95) -> dict[str, float]:
    """Mean of the paired differences a_i - b_i (seed i in both), its ``level`` confidence
    interval and two-sided p-value by the paired t-test.

    Returns:
        {"n", "mean", "lo", "hi", "t", "p"}; lo/hi/t/p are NaN with fewer than 2 pairs, and t
        is +-inf (p 0) when every difference is the same nonzero number.
    """
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if d.shape != (len(a),) or len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} and {len(b)} values do not pair")
    n = len(d)
    nan = float("nan")
    if n < 2:
        return {
            "n": n,
            "mean": float(d.mean()) if n else nan,
            "lo": nan,
            "hi": nan,
            "t": nan,
            "p": nan,
        }
    mean, se = float(d.mean()), float(d.std(ddof=1)) / n**0.5
    half = student_t_quantile(0.5 + level / 2, n - 1) * se
    if se == 0:
        t = 0.0 if mean == 0 else float("inf") * np.sign(mean)
        p = 1.0 if mean == 0 else 0.0
    else:
        t = mean / se
        p = 2.0 * (1.0 - student_t_cdf(abs(t), n - 1))
    return {"n": n, "mean": mean, "lo": mean - half, "hi": mean + half, "t": float(t), "p": p}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value), ignoring NaN."""
    arr = np.array([v for v in values if v == v], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else 0.0
