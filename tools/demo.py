#!/usr/bin/env python
"""`make demo`: train the CPU quickstart detector on the embedded dataset and print its COCO AP.

    python tools/demo.py [--config-file CONFIG] [KEY VALUE ...]

Runs ``train_net.py``'s main job in this process (train, then evaluate with COCOEvaluator) and
ends with a short table: the config, the iterations, wall time, and AP / AP50 / AP75 / AP_S /
AP_M / AP_L on the validation split.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from detectron2.config import get_cfg  # noqa: E402

import train_net  # noqa: E402
from gkd_d2 import add_gkd_config  # noqa: E402

DEFAULT_CONFIG = REPO / "configs" / "quickstart_retinanet_cpu.yaml"
COLUMNS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def format_table(rows: list[tuple[str, dict]]) -> str:
    """Markdown table of COCO bbox metrics, one row per (name, metrics dict)."""
    head = "| model | " + " | ".join(COLUMNS) + " |"
    sep = "|" + "---|" * (len(COLUMNS) + 1)
    lines = [head, sep]
    for name, m in rows:
        lines.append(
            f"| {name} | " + " | ".join(f"{m.get(c, float('nan')):.1f}" for c in COLUMNS) + " |"
        )
    return "\n".join(lines)


def load_cfg(config_file: str, opts: list[str]):
    cfg = add_gkd_config(get_cfg())
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config-file", default=str(DEFAULT_CONFIG))
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    ns = parser.parse_args(argv)
    args = SimpleNamespace(
        config_file=ns.config_file,
        opts=ns.opts,
        eval_only=False,
        resume=False,
        num_gpus=1,
        num_machines=1,
        machine_rank=0,
        dist_url="auto",
    )
    start = time.perf_counter()
    results = train_net.main(args)
    minutes = (time.perf_counter() - start) / 60
    # DefaultTrainer.test() returns {task: metrics} for one test set, {set: {task: ...}} for more
    metrics = results if "bbox" in results else next(iter(results.values()))
    cfg = load_cfg(ns.config_file, ns.opts)
    model = f"{cfg.MODEL.META_ARCHITECTURE} R{cfg.MODEL.RESNETS.DEPTH} "
    model += f"(res2 {cfg.MODEL.RESNETS.RES2_OUT_CHANNELS} ch)"
    print(
        f"\ngkd_d2 demo: {Path(ns.config_file).name}, {cfg.SOLVER.MAX_ITER} iterations "
        f"from scratch, evaluated on {cfg.DATASETS.TEST[0]}, "
        f"{minutes:.1f} min in total (train + eval)"
    )
    print(format_table([(model, metrics["bbox"])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
