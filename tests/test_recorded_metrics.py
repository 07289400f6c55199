"""train_net.py's Trainer keeps its behaviour to the last digit: a fixed-seed 30-iteration GKD
run of each quick-start config (its teacher trained 30 iterations first, a prototype refresh at
iterations 0 and 15) logs exactly the scalars recorded in tests/data/ for the installed
detectron2 source on this kind of machine (tools/record_metrics.py: CPU vendor and instruction
set, 2 torch threads).

Two runs on the same machine agree to the last digit, so every value is compared for equality:
the teacher's AP, each loss (the soft term included), the r statistics and the refresh
summaries. A machine kind without a recording is told the command that adds one
(``python -m tools.record_metrics --detector D --for-this-machine``, docs/development.md).
"""

import json
import re

import pytest

from tools.record_metrics import machine_kind, record, recording_path

TIMINGS = re.compile(r"time|seconds")


def differences(recorded: list[dict], got: list[dict]) -> list[str]:
    """``iteration key: recorded, now`` for every recorded scalar (timings aside) that is not
    logged again with the same value, bit for bit."""
    bad = []
    for want, have in zip(recorded, got, strict=True):
        for k in sorted(k for k in want if not TIMINGS.search(k)):
            if k not in have:
                bad.append(f"iteration {want['iter']} {k}: recorded {want[k]}, no longer logged")
            elif have[k] != want[k]:
                bad.append(f"iteration {want['iter']} {k}: recorded {want[k]!r}, now {have[k]!r}")
    return bad


def test_differences_catch_a_change_in_the_last_digit_and_a_missing_scalar():
    rows = [{"iter": 0, "loss_gkd_soft": 0.0012, "gkd/r_mean": 0.8, "time": 1.0}]
    assert differences(rows, [dict(rows[0], time=2.0)]) == []
    nudged = [dict(rows[0], loss_gkd_soft=0.0012 * (1 + 1e-15))]
    assert differences(rows, nudged) == [
        f"iteration 0 loss_gkd_soft: recorded 0.0012, now {0.0012 * (1 + 1e-15)!r}"
    ]
    missing = [{"iter": 0, "gkd/r_mean": 0.8}]
    assert differences(rows, missing) == [
        "iteration 0 loss_gkd_soft: recorded 0.0012, no longer logged"
    ]


@pytest.mark.parametrize("detector", ["retinanet", "faster_rcnn"])
def test_quickstart_run_logs_the_recorded_metrics_exactly(tmp_path, detector):
    path = recording_path(detector)
    if not path.is_file():
        pytest.skip(
            f"no recording {path.name} for this detectron2 source and machine kind "
            f"({machine_kind()}); add one with `python -m tools.record_metrics --detector "
            f"{detector} --for-this-machine` at a commit whose behaviour is trusted"
        )
    recorded = json.loads(path.read_text())
    got = record(
        detector,
        str(tmp_path),
        recorded["iters"],
        recorded["teacher_iters"],
        recorded["refresh_period"],
        recorded["threads"],
    )
    assert got["detectron2_digest"] == recorded["detectron2_digest"]
    assert len(got["rows"]) == len(recorded["rows"]) == recorded["iters"]
    bad = differences(recorded["rows"], got["rows"])
    assert not bad, f"{len(bad)} values differ from {path.name}:\n" + "\n".join(bad[:20])
    # the run is what it claims: refreshes at 0 and 15, distillation terms at every iteration
    rows = got["rows"]
    assert [r["iter"] for r in rows if "gkd/pgm_instances" in r] == [0, 15]
    terms = {"loss_gkd_fg", "loss_gkd_bg", "loss_gkd_soft", "gkd/r_mean"}
    assert all(terms <= set(r) for r in rows)
