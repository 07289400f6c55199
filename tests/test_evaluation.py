"""AP on flagged instances (occluded / blurred) against hand-computed values."""

import math

from benchmarks.evaluation import flagged_instance_ap, mean_std

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


def test_student_t_against_tabulated_values():
    from benchmarks.evaluation import student_t_cdf, student_t_quantile

    # t_{0.975, df} from the standard tables
    for df, q in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)):
        assert abs(student_t_quantile(0.975, df) - q) < 1e-4, df
    assert abs(student_t_cdf(0.0, 5) - 0.5) < 1e-12
    assert abs(student_t_cdf(-2.0150, 5) - 0.05) < 1e-4  # t_{0.95, 5} = 2.0150
    assert abs(student_t_cdf(1.0, 1) - 0.75) < 1e-9  # Cauchy: 1/2 + atan(1)/pi


def test_paired_difference_by_hand():
    import math

    from benchmarks.evaluation import paired_difference

    # the accuracy benchmark's local-only minus GKD differences of 3 seeds (docs/benchmarks.md)
    a, b = [20.38, 20.45, 21.41], [20.30, 20.10, 20.40]
    out = paired_difference(a, b)
    d = [0.08, 0.35, 1.01]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    assert out["n"] == 3 and abs(out["mean"] - mean) < 1e-12
    assert abs(out["t"] - mean / (sd / math.sqrt(3))) < 1e-9
    half = 4.302653 * sd / math.sqrt(3)
    assert abs(out["lo"] - (mean - half)) < 1e-5 and abs(out["hi"] - (mean + half)) < 1e-5
    assert abs(out["p"] - 0.2244) < 1e-3  # two-sided, df 2
    one = paired_difference([1.0], [0.5])
    assert one["mean"] == 0.5 and math.isnan(one["lo"]) and math.isnan(one["p"])
    same = paired_difference([1.0, 2.0], [0.5, 1.5])
    assert same["lo"] == same["hi"] == 0.5 and same["p"] == 0.0
    import pytest

    with pytest.raises(ValueError, match="do not pair"):
        paired_difference([1.0, 2.0], [1.0])
