"""The benchmark scripts run (tiny sizes): their assertions hold, their JSON has the figures.
Timings are not tested; docs/performance.md has the measured figures."""

import importlib
import json
import sys

import pytest


def load(name):
    # by its package name (setup.cfg's pythonpath): bench_pgm's worker processes (spawn) import
    # it again by that name
    return importlib.import_module(f"benchmarks.{name}")


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


def test_accuracy_benchmark_pairs_arms_by_seed():
    bench = load("bench_accuracy")
    assert bench.ARMS["GKD, r shuffled (control)"] == ["MODEL.GKD.SHUFFLE_R", "True"]
    metrics = ("AP", "APs", "AP_occluded", "AP_blurred")
    aps = {"student alone": [17.0, 18.0, 17.5], "local-only KD": [20.0, 21.0, 20.5]}
    aps["GKD"] = [20.5, 20.9, 21.3]  # GKD - local-only: +0.5, -0.1, +0.8
    results = {
        f"{arm} | seed {s}": {m: v + (1.0 if m == "APs" else 0.0) for m in metrics}
        for arm, values in aps.items()
        for s, v in enumerate(values)
    }
    paired = bench.paired_table(results, 3)
    # only arms with runs; a baseline is not compared with itself
    assert set(paired) == {"local-only KD", "GKD"}
    assert set(paired["local-only KD"]) == {"student alone"}
    gkd = paired["GKD"]["local-only KD"]["AP"]
    assert gkd["n"] == 3 and abs(gkd["mean"] - 0.4) < 1e-9
    assert gkd["lo"] < 0 < gkd["hi"]  # within noise: the interval spans 0
    assert abs(paired["GKD"]["student alone"]["APs"]["mean"] - 10.2 / 3) < 1e-9
    text = bench.format_paired(paired)
    assert "| GKD - local-only KD | +0.40 [" in text and "n 3)" in text
    # a stopped run with one seed of an arm: the difference, said to have no interval
    one = {k: v for k, v in results.items() if k.endswith("seed 0")}
    text = bench.format_paired(bench.paired_table(one, 3))
    assert "| GKD - local-only KD | +0.50 (n 1, no interval) |" in text and "nan" not in text
    cols = [*bench.METRICS, "AP_occluded", "AP_blurred"]
    one = {k: {c: v["AP"] for c in cols} for k, v in one.items()}
    assert "| GKD (1 seed) | 20.5 +- 0.0 |" in bench.format_table(one, 3)


def test_accuracy_benchmark_protocols_give_the_documented_schedules():
    from detectron2.modeling import META_ARCH_REGISTRY

    import gkd_d2  # noqa: F401

    bench = load("bench_accuracy")
    s = bench.FULL
    assert (s.epoch_iters, s.p_iters, s.seeds) == (30, 120, 5)  # 240 images, batch 8, 4 epochs
    for detector, lr in (("retinanet", 0.001), ("faster_rcnn", 0.002)):
        _, student_cfg, plain = bench.DETECTORS[detector]
        assert bench.base_lr(student_cfg) == 10 * lr
        p = bench.arm_run(detector, "P", "GKD", 3, s, "T.pth", "S.pth")
        opt = dict(zip(p[::2], p[1::2]))
        assert opt["MODEL.WEIGHTS"] == "S.pth" and opt["MODEL.TEACHER.WEIGHTS"] == "T.pth"
        assert opt["DATASETS.TRAIN"] == "('gkd_fashion_train_240',)" and opt["SEED"] == "3"
        assert opt["SOLVER.MAX_ITER"] == "120" and opt["SOLVER.STEPS"] == "(90,)"
        assert float(opt["SOLVER.BASE_LR"]) == lr and opt["SOLVER.WARMUP_ITERS"] == "0"
        assert opt["SOLVER.CHECKPOINT_PERIOD"] == "30"  # a checkpoint per epoch
        a = bench.arm_run(detector, "A", "student alone", 3, s, "T.pth", "S.pth")
        opt = dict(zip(a[::2], a[1::2]))
        assert "MODEL.WEIGHTS" not in opt and "DATASETS.TRAIN" not in opt
        assert opt["SOLVER.MAX_ITER"] == "300" and opt["SOLVER.STEPS"] == "(240,)"
        assert opt["MODEL.META_ARCHITECTURE"] == plain
        gkd_arch = {"retinanet": "GKDRetinaNet", "faster_rcnn": "GKDRCNN"}[detector]
        assert META_ARCH_REGISTRY.get(gkd_arch).plain_architecture == plain
    assert bench.arm_run("retinanet", "P", "GKD, r shuffled (control)", 0, s, "T", "S")[-2:] == [
        "MODEL.GKD.SHUFFLE_R",
        "True",
    ]
    from benchmarks.fashion_scenes import FASHION_SPLITS

    for sched in (bench.FULL, bench.QUICK):  # protocol P's split must be registered
        assert f"gkd_fashion_train_{sched.p_images}" in FASHION_SPLITS
    assert bench.PROTOCOL_ARMS["P"] == list(bench.ARMS)
    assert set(bench.PROTOCOL_ARMS["A"]) == {"student alone", "local-only KD", "GKD"}
    # the shortest run (no teacher) starts last; every arm still runs once
    for arms in bench.PROTOCOL_ARMS.values():
        order = bench.arm_order(arms)
        assert order[-1] == "student alone" and sorted(order) == sorted(arms)
    names = [p.name for _, p in bench.epoch_checkpoints(bench.Path("run"), s, "P")]
    assert names == [
        "model_0000029.pth",
        "model_0000059.pth",
        "model_0000089.pth",
        "model_final.pth",
    ]
    # --quick: r only with the last epoch's prototypes; protocol A: its one refresh
    quick = bench.epoch_checkpoints(bench.Path("run"), bench.QUICK, "P")
    assert [(e, p.name) for e, p in quick] == [(3, "model_final.pth")]
    assert [e for e, _ in bench.epoch_checkpoints(bench.Path("run"), s, "A")] == [0]


def test_accuracy_benchmark_reads_each_runs_results_json(tmp_path, monkeypatch):
    """A run's metrics are the results.json train_net.py writes (null read back as nan); a run
    that wrote none (or only an earlier run did) stops the benchmark."""
    from gkd_d2.engine.results import write_results

    bench = load("bench_accuracy")
    commands = []

    def finished_run(cmd, log, threads=0):
        commands.append(cmd)
        bbox = {**dict.fromkeys(bench.METRICS, 1.5), "APl": float("nan"), "AP-Bag": 3.0}
        write_results(cmd[cmd.index("OUTPUT_DIR") + 1], {"bbox": bbox})
        return 0

    monkeypatch.setattr(bench, "run_logged", finished_run)
    m = bench.train_net(tmp_path, "--config-file", "c.yaml", log=tmp_path / "log", threads=1)
    assert list(m) == bench.METRICS and m["AP"] == 1.5 and m["APl"] != m["APl"]
    # through the module that registers the benchmark's datasets, from the repository root
    assert commands[0][1:4] == ["-m", "benchmarks.with_fashion_data", "train_net.py"]
    assert commands[0][-4:] == ["OUTPUT_DIR", str(tmp_path), "NUM_THREADS", "1"]
    monkeypatch.setattr(bench, "run_logged", lambda cmd, log, threads=0: 0)
    with pytest.raises(SystemExit, match="no COCO evaluation"):
        bench.train_net(tmp_path, "--config-file", "c.yaml", log=tmp_path / "log")


def test_with_fashion_data_runs_a_script_with_the_benchmark_splits(tmp_path, monkeypatch):
    script = tmp_path / "script.py"
    script.write_text(
        "import sys\n"
        "from detectron2.data import DatasetCatalog\n"
        "names = [n for n in DatasetCatalog.list() if n.startswith('gkd_fashion')]\n"
        "open(sys.argv[1], 'w').write(' '.join(sorted(names)))\n"
    )
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # main() sets sys.argv
    load("with_fashion_data").main([str(script), str(tmp_path / "names")])
    names = (tmp_path / "names").read_text().split()
    assert {"gkd_fashion_train", "gkd_fashion_val", "gkd_fashion_train_240"} <= set(names)


def test_accuracy_benchmark_cache_key_follows_the_config_chain(tmp_path):
    bench = load("bench_accuracy")
    (tmp_path / "base.yaml").write_text("SOLVER:\n  BASE_LR: 0.01\n")
    (tmp_path / "child.yaml").write_text('_BASE_: "base.yaml"\nSEED: 1\n')
    child = str(tmp_path / "child.yaml")
    assert [p.name for p in bench.config_chain(child)] == ["child.yaml", "base.yaml"]
    before = bench.config_digest(child)
    assert bench.config_digest(child) == before != bench.config_digest(child, "X", "1")
    (tmp_path / "base.yaml").write_text("SOLVER:\n  BASE_LR: 0.02\n")  # a changed recipe
    assert bench.config_digest(child) != before


def test_accuracy_benchmark_convergence_check_and_r_table():
    bench = load("bench_accuracy")
    metrics = ("AP", "APs", "AP_occluded", "AP_blurred")
    results = {
        f"student alone | seed {s}": dict.fromkeys(metrics, 30.0 + d)
        for s, d in enumerate((0.1, -0.1, 0.3))
    }
    check = bench.convergence_check(results, dict.fromkeys(metrics, 30.0), 3)
    assert abs(check["AP"]["mean"] - 0.1) < 1e-9 and check["AP"]["lo"] < 0 < check["AP"]["hi"]
    text = bench.format_paired({}, check)
    assert "| student alone (continued) - its start | +0.10 [" in text
    group = {"instances": 5, "mean_r": 0.5, "below_0.5": 0.4}
    runs = [
        {
            "epoch": 0,
            "bank_iter": 0,
            "instances": 9,
            "mean_r": 0.81,
            "below_0.5": 0.1,
            "size": {"small": group},
            "occluded": {"true": {**group, "mean_r": 0.25}},
        },
    ]
    table = bench.format_r(runs)
    assert table.splitlines()[2].startswith("| 0 (0) | 0.810 (10%, n 9) | 0.500 (40%, n 5) | - |")
    assert "0.250 (40%, n 5)" in table


def test_accuracy_benchmark_report_writes_tables_json_and_charts(tmp_path):
    """report() on a hand-made results.json: protocol P with its five arms and A with its three,
    3 seeds; the paired differences are the hand-computed ones."""
    bench = load("bench_accuracy")
    keys = (*bench.METRICS, "AP_occluded", "AP_blurred")
    offset = {a: i for i, a in enumerate(bench.ARMS)}  # alone 0, local-only 1, GKD 2, ...

    def run(arm, seed):
        return {**dict.fromkeys(keys, 30.0 + offset[arm] + 0.1 * seed), "minutes": 1.0}

    table = {
        p: {f"{a} | seed {s}": run(a, s) for a in bench.PROTOCOL_ARMS[p] for s in range(3)}
        for p in ("P", "A")
    }
    r_epoch = {"epoch": 0, "bank_iter": 0, "instances": 9, "mean_r": 0.8, "below_0.5": 0.1}
    group = {"instances": 3, "mean_r": 0.6, "below_0.5": 0.3}
    r_epoch.update(size={"small": group, "large": group}, occluded={"true": group, "false": group})
    table["P"]["GKD | seed 0"]["r"] = [r_epoch, {**r_epoch, "epoch": 1, "bank_iter": 30}]
    results = {
        "retinanet": {
            "teacher": dict.fromkeys(keys, 40.0),
            "P start": dict.fromkeys(keys, 29.5),
            **table,
        }
    }
    s = bench.dataclasses.replace(bench.FULL, seeds=3)
    text = bench.report(results, s, tmp_path)
    assert "### retinanet, protocol P" in text and "### retinanet, protocol A" in text
    assert "| GKD (3 seeds) | 32.1 +- 0.1 |" in text  # 32.0, 32.1, 32.2
    assert "| GKD - local-only KD | +1.00 [+1.00, +1.00]" in text
    assert "| student alone (continued) - its start | +0.60 [" in text  # 30.1 - 29.5
    assert text.count("GKD + global loss (3 seeds)") == 1  # protocol A has no such arm
    paired = json.loads((tmp_path / "paired.json").read_text())
    assert abs(paired["retinanet"]["A"]["paired"]["GKD"]["student alone"]["AP"]["mean"] - 2) < 1e-9
    r = json.loads((tmp_path / "r_diagnostics.json").read_text())
    assert [e["bank_iter"] for e in r["retinanet"]["P"]] == [0, 30]
    for name in ("table.md", "accuracy_retinanet.png", "r_retinanet.png"):
        assert (tmp_path / name).stat().st_size > 0
