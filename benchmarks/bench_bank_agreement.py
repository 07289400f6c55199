#!/usr/bin/env python
"""How far the bank refresh is from the full one on a trained student.

    python -m benchmarks.bench_bank_agreement [--config configs/quickstart_gkd_retinanet_cpu.yaml]
        [--weights output/quickstart_gkd_retinanet_cpu/model_final.pth] [--iters 0]
        [--max-images 300] [--json F] [KEY VALUE ...]

From a trained GKD checkpoint (the quick-start's, by default), one more epoch (``--iters``, 0 =
one epoch of the training set) is trained in bank mode (MODEL.GKD.REFRESH_MODE bank) at the LR
its schedule ended on, from a full refresh at its start; the student's features of the sample
are harvested from these training forwards. At the epoch's end, on the same student, the
bank refresh and the full (official) refresh each build a bank. Reported:
* the picks: the share of the full refresh's prototype instances that the bank refresh picks
  too, per level and overall (per (level, class), as sets);
* the control arm: the same figures for the bank of the full refresh at the epoch's start (the
  one the epoch trained with), against the full refresh at its end: how far the official
  refresh itself moves in an epoch, the scale the bank refresh's distance is read against;
* r of the training step (``tools/visualize_prototypes.py``'s training r, per ground-truth box
  of the validation images, the mean over its positives) under each bank, against the full
  refresh's: the mean |Delta r|,
  the largest, and the rank correlation (Spearman) of r between the two banks, overall and per
  COCO size group (area in original pixels); Faster R-CNN also its soft-label r;
* both refreshes' seconds and the images each forwarded.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks.harness import report

REPO = Path(__file__).resolve().parent.parent
BANK_KEYS = ("protos_s", "protos_t", "proto_counts", "proto_index", "bank_iter")


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Spearman's rho of two (N,) samples (ranks by value, ties by position); None if N < 2."""
    if len(a) < 2:
        return None

    def ranks(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(x), dtype=torch.float64)
        out[torch.argsort(x, stable=True)] = torch.arange(len(x), dtype=torch.float64)
        return out

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denom if denom else None


def pick_overlap(full: torch.Tensor, bank: torch.Tensor) -> dict:
    """Share of the full refresh's distinct picks per (level, class) that the bank refresh also
    picks, per level and overall.

    Args:
        full, bank: (L, K, M) ``distiller.proto_index`` (-1: empty slot).
    """
    levels, classes, _ = full.shape
    per_level = []
    shared_all = total_all = 0
    for lvl in range(levels):
        shared = total = 0
        for c in range(classes):
            f = {int(i) for i in full[lvl, c] if i >= 0}
            b = {int(i) for i in bank[lvl, c] if i >= 0}
            shared, total = shared + len(f & b), total + len(f)
        per_level.append(shared / total if total else None)
        shared_all, total_all = shared_all + shared, total_all + total
    return {"overall": shared_all / total_all if total_all else None, "per_level": per_level}


def r_agreement(full: dict, bank: dict, key: str) -> dict:
    """Mean and max |Delta r| and Spearman's rho of a per-box r between the two banks, overall
    and per COCO size group."""
    from gkd_d2.modeling.distiller import SIZE_GROUPS

    a, b, area = full[key], bank[key], full["area"]
    out = {}
    groups = {"all": torch.ones(len(a), dtype=torch.bool)}
    groups.update({k: (area >= lo) & (area < hi) for k, (lo, hi) in SIZE_GROUPS.items()})
    for name, m in groups.items():
        d = (a[m] - b[m]).abs()
        out[name] = {
            "boxes": int(m.sum()),
            "mean_r_full": float(a[m].mean()) if m.any() else None,
            "mean_r_bank": float(b[m].mean()) if m.any() else None,
            "mean_abs_delta_r": float(d.mean()) if m.any() else None,
            "max_abs_delta_r": float(d.max()) if m.any() else None,
            "spearman": rank_correlation(a[m], b[m]),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/quickstart_gkd_retinanet_cpu.yaml")
    parser.add_argument("--weights", default="")
    parser.add_argument("--iters", type=int, default=0, help="0: one epoch")
    parser.add_argument("--max-images", type=int, default=300)
    parser.add_argument("--json", type=Path)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)

    from detectron2.data import DatasetCatalog
    from detectron2.utils.events import EventStorage

    from gkd_d2.compat import registered_hooks
    from gkd_d2.config import load_config
    from gkd_d2.engine import PrototypeRefresh, Trainer, setup_cfg
    from gkd_d2.engine.schedule import epoch_length
    from tools.visualize_prototypes import robustness_in_training

    probe = load_config(str(REPO / ns.config), ns.opts)
    weights = ns.weights or str(Path(probe.OUTPUT_DIR) / "model_final.pth")
    if not Path(weights).is_file():
        sys.exit(f"{weights}: no trained GKD checkpoint (train the quick-start first: make demo)")
    iters = ns.iters or epoch_length(probe)
    solver = probe.SOLVER
    final_lr = solver.BASE_LR * solver.GAMMA ** len(solver.STEPS)
    out = Path(tempfile.mkdtemp())
    args = SimpleNamespace(
        config_file=str(REPO / ns.config),
        opts=[
            *ns.opts,
            "MODEL.WEIGHTS",
            weights,
            "MODEL.GKD.REFRESH_MODE",
            "bank",
            "MODEL.GKD.REFRESH_PERIOD",
            str(iters),
            "MODEL.TEACHER.CHECK_IMAGES",
            "0",
            "SOLVER.BASE_LR",
            str(final_lr),
            "SOLVER.STEPS",
            "()",
            "SOLVER.WARMUP_ITERS",
            "0",
            "SOLVER.MAX_ITER",
            str(iters),
            "SOLVER.CHECKPOINT_PERIOD",
            str(10 * iters),
            "TEST.EVAL_PERIOD",
            "0",
            "DATASETS.TEST",
            "()",
            "OUTPUT_DIR",
            str(out),
        ],
        eval_only=False,
        resume=False,
    )
    cfg = setup_cfg(args)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    start = time.perf_counter()
    trainer.train()  # a full refresh at 0, then the epoch harvested
    train_s = time.perf_counter() - start
    model = trainer.model
    bank_hook = next(h for h in registered_hooks(trainer) if isinstance(h, PrototypeRefresh))
    full_cfg = cfg.clone()
    full_cfg.defrost()
    full_cfg.MODEL.GKD.REFRESH_MODE = "full"
    full_hook = PrototypeRefresh(full_cfg, model)
    full_hook.instances = bank_hook.instances
    # the control: the bank of the full refresh at the epoch's start, in use all epoch (how
    # far the official refresh itself moves in one epoch)
    banks = {"start": {k: getattr(model.distiller, k).clone() for k in BANK_KEYS}}
    result = {"config": ns.config, "weights": weights, "iters": iters}
    # the bank refresh first: it reads the harvest of the epoch since the refresh at 0
    for name, hook in (("bank", bank_hook), ("full", full_hook)):
        with EventStorage(iters) as storage:
            hook.trainer = SimpleNamespace(storage=storage)
            t0 = time.perf_counter()
            hook.refresh(iters)
            result[f"{name}_refresh_s"] = round(time.perf_counter() - t0, 3)
        result[f"{name}_counts"] = dict(hook.last_counts)
        banks[name] = {k: getattr(model.distiller, k).clone() for k in BANK_KEYS}
    result["train_epoch_s"] = round(train_s, 1)
    result["sampled_instances"] = len(bank_hook.instances["cls"])
    result["sampled_images"] = len(set(bank_hook.instances["image"].tolist()))
    for other in ("bank", "start"):
        result[f"pick_overlap_{other}"] = pick_overlap(
            banks["full"]["proto_index"], banks[other]["proto_index"]
        )

    val = DatasetCatalog.get(probe.DATASETS.TEST[0])
    model.feature_harvest = None  # the r passes are training forwards: nothing to harvest
    r = {}
    for name, bank in banks.items():
        for k, v in bank.items():
            getattr(model.distiller, k).copy_(v)
        r[name] = robustness_in_training(model, cfg, val, ns.max_images, seed=0)
    for other in ("bank", "start"):
        if not torch.equal(r["full"]["area"], r[other]["area"]):
            raise RuntimeError("the r passes saw different boxes")
        result[f"r_{other}"] = r_agreement(r["full"], r[other], "r")
        if "r_soft" in r["full"]:
            result[f"r_soft_{other}"] = r_agreement(r["full"], r[other], "r_soft")
    result["r_images"] = r["full"]["images"]
    report(result, ns.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
