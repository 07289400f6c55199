"""AP on flagged instances (occluded / blurred) against hand-computed values."""

import math

from gkd_d2.evaluation import flagged_instance_ap, mean_std

GT = {
    "images": [{"id": 1, "width": 100, "height": 100, "file_name": "a.png"}],
    "categories": [{"id": 1, "name": "thing"}],
    "annotations": [
        # A: occluded; B: not
        {
            "id": 1,
            "image_id": 1,
            "category_id": 1,
            "bbox": [10, 10, 20, 20],
            "area": 400,
            "iscrowd": 0,
            "occluded": True,
        },
        {
            "id": 2,
            "image_id": 1,
            "category_id": 1,
            "bbox": [50, 50, 20, 20],
            "area": 400,
            "iscrowd": 0,
            "occluded": False,
        },
    ],
}


def det(box, score):
    return {"image_id": 1, "category_id": 1, "bbox": box, "score": score}


def test_only_flagged_instances_count():
    # A found: 100; a detection of B (not flagged) is neither a hit nor a false positive
    assert abs(flagged_instance_ap(GT, [det([10, 10, 20, 20], 0.9)], "occluded")["AP"] - 100) < 1e-6
    both = [det([50, 50, 20, 20], 0.99), det([10, 10, 20, 20], 0.9)]
    out = flagged_instance_ap(GT, both, "occluded")
    assert abs(out["AP"] - 100) < 1e-6 and out["count"] == 1
    # only B found: the flagged A is missed
    assert flagged_instance_ap(GT, [det([50, 50, 20, 20], 0.9)], "occluded")["AP"] == 0.0


def test_false_positive_ranked_first_halves_precision():
    # a false positive (on background) outranks the hit: precision 1/2 at every recall -> 50
    dets = [det([80, 0, 10, 10], 0.95), det([50, 50, 20, 20], 0.99), det([10, 10, 20, 20], 0.9)]
    out = flagged_instance_ap(GT, dets, "occluded")
    assert abs(out["AP"] - 50.0) < 1e-6
    assert out["APs"] == out["AP"] and math.isnan(out["APl"])  # a 20 px box is small


def test_no_flagged_instance_or_no_detection():
    out = flagged_instance_ap(GT, [det([10, 10, 20, 20], 0.9)], "blurred")
    assert out["count"] == 0 and math.isnan(out["AP"])
    assert flagged_instance_ap(GT, [], "occluded") == {
        "AP": 0.0,
        "AP50": 0.0,
        "AP75": 0.0,
        "APs": 0.0,
        "APm": 0.0,
        "APl": 0.0,
        "count": 1,
    }
    assert GT["annotations"][1]["iscrowd"] == 0  # the input is not modified


def test_mean_std():
    assert mean_std([1.0, 3.0]) == (2.0, math.sqrt(2.0))
    assert mean_std([2.0, float("nan")]) == (2.0, 0.0)
    assert all(math.isnan(v) for v in mean_std([]))
