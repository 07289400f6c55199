#!/usr/bin/env python
"""`make demo`: GKD on the embedded scenes, on the CPU, end to end, with a COCO AP table.

    python tools/demo.py [--student-iters N] [--retrain-teacher] [--teacher-config F]
                         [--student-config F] [--output DIR]

1. teacher: the CPU quickstart RetinaNet (configs/quickstart_retinanet_cpu.yaml), trained once
   and reused from output/quickstart_retinanet_cpu/model_final.pth afterwards (evaluated again);
2. student alone: the quarter-width student of configs/quickstart_gkd_retinanet_cpu.yaml as a
   plain RetinaNet (GeneralizedRCNN for a Faster R-CNN student), N iterations;
3. GKD student: the same student, the same N iterations, seed and data order, distilled from
   the teacher with GKD.
Each stage runs train_net.py in its own process; the table ends the output.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
COLUMNS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def format_table(rows: list[tuple[str, dict, float]]) -> str:
    """Markdown table of COCO bbox metrics, one row per (name, metrics, minutes)."""
    lines = ["| model | " + " | ".join(COLUMNS) + " | minutes |", "|" + "---|" * (len(COLUMNS) + 2)]
    for name, m, minutes in rows:
        cells = " | ".join(f"{m.get(c, float('nan')):.1f}" for c in COLUMNS)
        lines.append(f"| {name} | {cells} | {minutes:.1f} |")
    return "\n".join(lines)


def run_train_net(output_dir: Path, *argv: str) -> tuple[dict, float]:
    """Run train_net.py into ``output_dir`` (its output shown as it runs); return its final COCO
    bbox metrics (the ``results.json`` it writes there) and its wall time in minutes."""
    from gkd_d2.engine.results import read_results

    start = time.perf_counter()
    results = output_dir / "results.json"
    results.unlink(missing_ok=True)  # a previous run's figures must not pass for this one's
    cmd = [sys.executable, "train_net.py", *argv, "OUTPUT_DIR", str(output_dir)]
    sys.stdout.flush()  # the run's output follows ours, in order
    returncode = subprocess.run(cmd, cwd=REPO, stderr=subprocess.STDOUT).returncode
    if returncode != 0:
        raise SystemExit(f"demo: train_net.py {' '.join(argv)} failed (exit {returncode})")
    try:
        metrics = read_results(str(output_dir))["bbox"]
    except (FileNotFoundError, KeyError):
        raise SystemExit(f"demo: train_net.py {' '.join(argv)} wrote no COCO evaluation") from None
    return metrics, (time.perf_counter() - start) / 60


def plain_architecture(config_file: str) -> str:
    """The detectron2 meta-architecture of a GKD config's student trained alone."""
    from detectron2.modeling import META_ARCH_REGISTRY

    from gkd_d2.config import load_config  # (importing gkd_d2 registers its meta-architectures)

    cfg = load_config(str(REPO / config_file))
    return META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE).plain_architecture


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--student-iters", type=int, default=300)
    parser.add_argument("--retrain-teacher", action="store_true")
    parser.add_argument("--teacher-config", default="configs/quickstart_retinanet_cpu.yaml")
    parser.add_argument("--student-config", default="configs/quickstart_gkd_retinanet_cpu.yaml")
    parser.add_argument("--output", type=Path, default=REPO / "output", help="folder of all runs")
    ns = parser.parse_args(argv)
    start = time.perf_counter()
    teacher_dir = ns.output / Path(ns.teacher_config).stem
    weights = teacher_dir / "model_final.pth"

    rows = []
    if ns.retrain_teacher or not weights.is_file():
        metrics, minutes = run_train_net(teacher_dir, "--config-file", ns.teacher_config)
        rows.append(("teacher (trained now)", metrics, minutes))
    else:
        metrics, minutes = run_train_net(
            ns.output / "demo_teacher_eval",
            "--config-file",
            ns.teacher_config,
            "--eval-only",
            "MODEL.WEIGHTS",
            str(weights),
        )
        rows.append((f"teacher (cached {weights.relative_to(ns.output.parent)})", metrics, minutes))

    n = ns.student_iters
    drop = int(n * 0.8)  # x0.1 at 80 %, as in the quickstart config
    schedule = [
        "SOLVER.MAX_ITER",
        str(n),
        "SOLVER.STEPS",
        f"({drop},)" if 0 < drop < n else "()",
        "SOLVER.CHECKPOINT_PERIOD",
        str(n),
    ]
    metrics, minutes = run_train_net(
        ns.output / "demo_student_alone",
        "--config-file",
        ns.student_config,
        "MODEL.META_ARCHITECTURE",
        plain_architecture(ns.student_config),
        *schedule,
    )
    rows.append((f"student alone, {n} it", metrics, minutes))
    metrics, minutes = run_train_net(
        ns.output / "demo_gkd_student",
        "--config-file",
        ns.student_config,
        "MODEL.TEACHER.WEIGHTS",
        str(weights),
        *schedule,
    )
    rows.append((f"GKD student, {n} it", metrics, minutes))

    total = (time.perf_counter() - start) / 60
    print(
        f"\ngkd_d2 demo: teacher {ns.teacher_config}, student {ns.student_config}; "
        f"{total:.1f} min in total"
    )
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
