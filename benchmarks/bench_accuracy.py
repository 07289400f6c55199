#!/usr/bin/env python
"""Accuracy benchmark: does GKD help a student, against the student alone and local-only KD?

    python benchmarks/bench_accuracy.py [--quick] [--seeds N] [--student-iters N]
                                        [--output DIR] [--retrain-teacher]

On the Fashion-MNIST scenes (`gkd_fashion_train` / `gkd_fashion_val`; install the data first:
`bash tools/install_benchmark_data.sh`), with the configs of `configs/bench/`:
1. the teacher (`fashion_teacher_retinanet.yaml`), trained once and cached in DIR/teacher;
2. per seed, the same student (`fashion_gkd_retinanet.yaml`), the same iterations and data
   order, in four arms: alone (plain RetinaNet), local-only KD (`ROBUST_WEIGHTS False`), GKD,
   GKD + the explicit global loss (`GLOBAL_WEIGHT 5`);
3. COCO AP of every run (detectron2's COCOEvaluator) plus AP on the occluded and on the
   blurred validation instances (`gkd_d2.evaluation.flagged_instance_ap`);
4. DIR/results.json (every run), DIR/table.md (mean +- std per arm) and DIR/accuracy.png (AP and
   AP_S per arm with std bars).
Full: teacher 1200 iterations, students 300, 3 seeds. `--quick`: teacher 500, students 150, 1
seed (under 15 minutes on 2 cores), to show the ordering.
Each run is a train_net.py process; finished runs are reused (their results.json entry), so an
interrupted benchmark continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TEACHER_CFG = "configs/bench/fashion_teacher_retinanet.yaml"
STUDENT_CFG = "configs/bench/fashion_gkd_retinanet.yaml"
ARMS = {
    "student alone": ["MODEL.META_ARCHITECTURE", "RetinaNet"],
    "local-only KD": ["MODEL.GKD.ROBUST_WEIGHTS", "False"],
    "GKD": [],
    "GKD + global loss": ["MODEL.GKD.GLOBAL_WEIGHT", "5.0"],
}
METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def train_net(*argv: str, log: Path) -> dict[str, float]:
    """Run train_net.py (log to ``log``); return its final COCO bbox metrics."""
    with open(log, "w") as f:
        proc = subprocess.run(
            [sys.executable, "train_net.py", *argv], cwd=REPO, stdout=f, stderr=subprocess.STDOUT
        )
    text = log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"bench_accuracy: train_net.py failed (exit {proc.returncode}), see {log}")
    values = None
    for line in text.splitlines():
        if "copypaste: " in line:
            tail = line.split("copypaste: ")[1].strip()
            if tail[:1].isdigit() or tail.startswith("nan"):
                values = [float(v) for v in tail.split(",")]
    if values is None:
        raise SystemExit(f"bench_accuracy: no COCO evaluation in {log}")
    return dict(zip(METRICS, values))


def flagged(run_dir: Path, dataset: str) -> dict[str, float]:
    """AP on the occluded and on the blurred validation instances of a finished run."""
    from detectron2.data import MetadataCatalog

    import gkd_d2  # noqa: F401  (registers the datasets)
    from gkd_d2.evaluation import flagged_instance_ap_from_files

    gt = MetadataCatalog.get(dataset).json_file
    results = run_dir / "inference" / dataset / "coco_instances_results.json"
    out = {}
    for flag in ("occluded", "blurred"):
        ap = flagged_instance_ap_from_files(gt, str(results), flag)
        out[f"AP_{flag}"] = ap["AP"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--student-iters", type=int, default=None)
    parser.add_argument("--teacher-iters", type=int, default=None)
    parser.add_argument("--output", type=Path, default=REPO / "output" / "bench_accuracy")
    parser.add_argument("--retrain-teacher", action="store_true")
    ns = parser.parse_args(argv)
    seeds = ns.seeds or (1 if ns.quick else 3)
    iters = ns.student_iters or (150 if ns.quick else 300)
    teacher_iters = ns.teacher_iters or (500 if ns.quick else 1200)
    out = ns.output / ("quick" if ns.quick else "full")
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {}
    dataset = "gkd_fashion_val"
    start = time.perf_counter()

    teacher_dir = ns.output / f"teacher_{teacher_iters}it"
    weights = teacher_dir / "model_final.pth"
    if ns.retrain_teacher or not weights.is_file():
        teacher_dir.mkdir(parents=True, exist_ok=True)
        t_drop = int(teacher_iters * 0.8)
        m = train_net(
            "--config-file",
            TEACHER_CFG,
            "SOLVER.MAX_ITER",
            str(teacher_iters),
            "SOLVER.STEPS",
            f"({t_drop},)",
            "SOLVER.CHECKPOINT_PERIOD",
            str(teacher_iters),
            "OUTPUT_DIR",
            str(teacher_dir),
            log=out / "teacher.log",
        )
        results["teacher"] = {**m, **flagged(teacher_dir, dataset)}
        results_file.write_text(json.dumps(results, indent=1))
    drop = int(iters * 0.8)
    schedule = ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({drop},)"]
    for seed in range(seeds):
        for arm, overrides in ARMS.items():
            key = f"{arm} | seed {seed}"
            if key in results:
                continue
            run_dir = out / f"{arm.replace(' ', '_').replace('+', 'plus')}_seed{seed}"
            m = train_net(
                "--config-file",
                STUDENT_CFG,
                "MODEL.TEACHER.WEIGHTS",
                str(weights),
                "SEED",
                str(seed),
                *schedule,
                "SOLVER.CHECKPOINT_PERIOD",
                str(iters),
                *overrides,
                "OUTPUT_DIR",
                str(run_dir),
                log=out / f"{run_dir.name}.log",
            )
            results[key] = {**m, **flagged(run_dir, dataset)}
            results_file.write_text(json.dumps(results, indent=1))
            print(f"{key}: AP {m['AP']:.1f}", flush=True)
    table = format_table(results, seeds)
    (out / "table.md").write_text(table + "\n")
    plot(results, seeds, out / "accuracy.png")
    print(table)
    print(f"bench_accuracy: {(time.perf_counter() - start) / 60:.1f} min; results in {out}")
    return 0


def summarise(results: dict, seeds: int) -> dict[str, dict[str, tuple[float, float]]]:
    """Per arm and metric: (mean, std) over seeds."""
    from gkd_d2.evaluation import mean_std

    out = {}
    for arm in ARMS:
        runs = [
            results[f"{arm} | seed {s}"] for s in range(seeds) if f"{arm} | seed {s}" in results
        ]
        out[arm] = {k: mean_std([r[k] for r in runs]) for k in runs[0]} if runs else {}
    return out


def format_table(results: dict, seeds: int) -> str:
    cols = [*METRICS, "AP_occluded", "AP_blurred"]
    lines = [
        "| model | " + " | ".join(cols) + " |",
        "|" + "---|" * (len(cols) + 1),
    ]
    if "teacher" in results:
        t = results["teacher"]
        lines.append("| teacher | " + " | ".join(f"{t[c]:.1f}" for c in cols) + " |")
    for arm, stats in summarise(results, seeds).items():
        if stats:
            cells = " | ".join(f"{stats[c][0]:.1f} +- {stats[c][1]:.1f}" for c in cols)
            lines.append(f"| {arm} ({seeds} seeds) | {cells} |")
    return "\n".join(lines)


def plot(results: dict, seeds: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats = {a: s for a, s in summarise(results, seeds).items() if s}
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    width = 0.38
    for i, (metric, colour) in enumerate((("AP", "#3b6ea8"), ("APs", "#e08a2c"))):
        xs = [j + (i - 0.5) * width for j in range(len(stats))]
        ax.bar(
            xs,
            [s[metric][0] for s in stats.values()],
            width,
            yerr=[s[metric][1] for s in stats.values()],
            capsize=4,
            label=metric,
            color=colour,
        )
    ax.set_xticks(range(len(stats)), list(stats), fontsize=9)
    ax.set_ylabel("COCO AP (val)")
    ax.set_title(f"Fashion-MNIST scenes, RetinaNet student, mean +- std over {seeds} seed(s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
