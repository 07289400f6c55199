"""The benchmark scripts run (tiny sizes): their assertions hold, their JSON has the figures.
Timings are not tested; docs/performance.md has the measured figures."""

import importlib
import json
import sys

from conftest import REPO


def load(name):
    # importable by name: bench_pgm's worker processes (spawn) import it again
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    return importlib.import_module(name)


def test_pgm_benchmark_closed_form_picks_equal_the_direct_objective(tmp_path):
    out = tmp_path / "pgm.json"
    args = ["--n", "300", "--channels", "16", "--prototypes", "5", "--threads", "1"]
    assert load("bench_pgm").main([*args, "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["identical_picks"] and figures["candidates"] > 5


def test_step_benchmark_runs_both_detectors(tmp_path):
    bench = load("bench_step")
    for detector in ("retinanet", "faster_rcnn"):
        out = tmp_path / f"{detector}.json"
        args = ["--detector", detector, "--size", "96", "--steps", "1", "--rounds", "1"]
        assert bench.main([*args, "--json", str(out)]) == 0
        figures = json.loads(out.read_text())
        assert figures["gkd_step_s"] > 0 and 0 < figures["distiller_forward_share"] < 1
