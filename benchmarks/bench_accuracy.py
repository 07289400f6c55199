#!/usr/bin/env python
"""Accuracy benchmark: does GKD help a student, against the student alone and local-only KD?

    python -m benchmarks.bench_accuracy [--quick] [--detector retinanet|faster_rcnn|both]
                                        [--protocol P|A|both] [--seeds N] [--jobs N]
                                        [--output DIR] [--retrain-teacher]

On the Fashion-MNIST scenes (`gkd_fashion_train` / `gkd_fashion_val` of
`benchmarks/fashion_scenes.py`; install the data first: `bash tools/install_benchmark_data.sh`),
for RetinaNet and Faster R-CNN (configs of
`configs/bench/`: a teacher `fashion_teacher_<detector>.yaml`, a student
`fashion_gkd_<detector>.yaml`):
1. the teacher, trained once and cached in DIR/teachers/ (keyed by its config files' content
   and its iterations);
2. **protocol P** (the paper's: distil a trained student): the student alone, trained once to
   convergence on the teacher's schedule and cached in DIR/students/; then, per seed, five arms
   continue from it on the same schedule: `EPOCHS` epochs of the first `P_IMAGES` training
   images (`gkd_fashion_train_<n>`), a prototype refresh at each epoch's start, a(e) decaying
   to the end, LR a tenth of the student's (the LR its own schedule ended on), x0.1 for the
   last epoch;
3. **protocol A** (an ImageNet-initialised student): per seed three arms (student alone,
   local-only KD, GKD) trained from the ImageNet backbone for `a_iters` iterations of the whole
   training split;
4. the arms: student alone (plain RetinaNet / GeneralizedRCNN), local-only KD
   (`ROBUST_WEIGHTS False`), GKD, GKD + the explicit global loss (`GLOBAL_WEIGHT 5`), and the
   control GKD with r shuffled among each batch's instances (`SHUFFLE_R True`); a seed fixes
   the data order and the initialisation of every arm;
5. COCO AP of every run (detectron2's COCOEvaluator) plus AP on the occluded and on the blurred
   validation instances (`benchmarks.evaluation.flagged_instance_ap`);
6. r diagnostics: for the GKD arm of seed 0, the distribution of r on the validation boxes at
   the end of every epoch (`--quick`: the last; that epoch's prototypes;
   `tools/visualize_prototypes.py --split test`), overall, by size and by the occluded /
   blurred flags;
7. DIR/{full,quick}/: results.json (every run), table.md (per detector and protocol: mean +-
   std per arm, then each KD arm minus local-only KD and minus the student alone, paired by
   seed: mean, 95 % paired-t interval, p; for protocol P also the continued student alone minus
   its starting point, the convergence check), paired.json, r_diagnostics.json,
   accuracy_<detector>.png (AP per arm and protocol with std bars), r_<detector>.png (mean r
   and share below 0.5 per group and epoch) and runs/.../r_epoch<e>/ (the tool's pictures).
Each run is a train_net.py process (through `benchmarks/with_fashion_data.py`, which registers the
benchmark's datasets) whose final evaluation is its OUTPUT_DIR/results.json; finished runs are
reused (their entry in DIR's results.json), so an interrupted benchmark continues where it
stopped. `--jobs 2` runs two one-thread processes at
once (faster on 2 cores than one two-thread process: see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# the scripts that need the benchmark's datasets run through this module (it registers them)
WITH_DATA = [sys.executable, "-m", "benchmarks.with_fashion_data"]

DETECTORS = {
    # name: (teacher config, student config, the plain meta-architecture of "student alone")
    "retinanet": (
        "configs/bench/fashion_teacher_retinanet.yaml",
        "configs/bench/fashion_gkd_retinanet.yaml",
        "RetinaNet",
    ),
    "faster_rcnn": (
        "configs/bench/fashion_teacher_faster_rcnn.yaml",
        "configs/bench/fashion_gkd_faster_rcnn.yaml",
        "GeneralizedRCNN",
    ),
}
ALONE = "student alone"
ARMS = {
    ALONE: [],  # + MODEL.META_ARCHITECTURE of the detector (arm_overrides)
    "local-only KD": ["MODEL.GKD.ROBUST_WEIGHTS", "False"],
    "GKD": [],
    "GKD + global loss": ["MODEL.GKD.GLOBAL_WEIGHT", "5.0"],
    # the control that could prove GKD's r wrong: its weights' distribution, no instance's own
    "GKD, r shuffled (control)": ["MODEL.GKD.SHUFFLE_R", "True"],
}
# protocol A (the second table) runs the three arms that answer its question: does sound r change
# GKD against local-only KD for an ImageNet-initialised student
PROTOCOL_ARMS = {"P": list(ARMS), "A": [ALONE, "local-only KD", "GKD"]}
# arms whose paired differences are reported, and what against
KD_ARMS = ["local-only KD", "GKD", "GKD + global loss", "GKD, r shuffled (control)"]
BASELINES = ["local-only KD", ALONE]
METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
PAIRED_METRICS = ("AP", "APs", "AP_occluded", "AP_blurred")
PROTOCOLS = {"P": "trained student, continued", "A": "ImageNet-initialised student"}
DATASET_VAL = "gkd_fashion_val"
BATCH = 8  # SOLVER.IMS_PER_BATCH of the bench configs


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Iterations of every stage (batch 8) and the seeds."""

    teacher_iters: int
    converge_iters: int  # protocol P: the student alone, before the arms
    p_images: int  # protocol P: the arms' training images (the first n of gkd_fashion_train)
    epochs: int  # protocol P: epochs of those images per arm
    a_iters: int  # protocol A: iterations of the whole training split per arm
    seeds: int
    # r diagnostics at the end of every epoch of protocol P (False: of the last one only)
    r_every_epoch: bool = True

    @property
    def epoch_iters(self) -> int:
        return self.p_images // BATCH

    @property
    def p_iters(self) -> int:
        return self.epochs * self.epoch_iters


# An arm's KD iteration costs 1.2 s (AVX-512 host) to 2.4 s (AVX2 host) in a one-thread
# process. Protocol A runs 300 iterations: at 120 the Faster R-CNN student alone was at ~1 AP;
# its learning curve from ImageNet (constant LR, seed 0, val) was 1.3 / 8.0 / 18.8 AP at 150 /
# 300 / 450 iterations, RetinaNet's 9.5 / 16.9 / 21.3 (docs/benchmarks.md).
FULL = Schedule(
    teacher_iters=1200, converge_iters=1200, p_images=240, epochs=4, a_iters=300, seeds=5
)
# --quick: protocol P of RetinaNet only unless --detector / --protocol say otherwise; r on the
# last epoch only (each diagnostic pass is about a minute)
QUICK = Schedule(
    teacher_iters=400,
    converge_iters=200,
    p_images=120,
    epochs=4,
    a_iters=80,
    seeds=1,
    r_every_epoch=False,
)


def config_chain(path: str) -> list[Path]:
    """The config file and every file it names in _BASE_, recursively (the file first)."""
    import yaml

    chain, todo = [], [REPO / path]
    while todo:
        p = todo.pop().resolve()
        chain.append(p)
        base = (yaml.safe_load(p.read_text()) or {}).get("_BASE_")
        if base:
            todo.append(p.parent / base)
    return chain


def config_digest(path: str, *extra: object) -> str:
    """12 hex digits of the content of a config and its _BASE_ chain, plus ``extra``: a cached
    teacher or student is reused only while its recipe is unchanged."""
    h = hashlib.sha256()
    for p in config_chain(path):
        h.update(p.read_bytes())
    h.update(json.dumps([str(e) for e in extra]).encode())
    return h.hexdigest()[:12]


def arm_overrides(detector: str, arm: str) -> list[str]:
    if arm not in ARMS:
        raise KeyError(f"unknown arm {arm!r}; arms: {', '.join(ARMS)}")
    if arm == ALONE:
        return ["MODEL.META_ARCHITECTURE", DETECTORS[detector][2]]
    return list(ARMS[arm])


def base_lr(config: str) -> float:
    """SOLVER.BASE_LR of a bench config (through its _BASE_ chain)."""
    from gkd_d2.config import load_config

    return float(load_config(str(REPO / config)).SOLVER.BASE_LR)


def solver(iters: int, drop_at: int, *, lr: float | None = None, warmup: int | None = None):
    out = ["SOLVER.MAX_ITER", str(iters), "SOLVER.STEPS", f"({drop_at},)"]
    out += ["SOLVER.CHECKPOINT_PERIOD", str(iters)]
    if lr is not None:
        out += ["SOLVER.BASE_LR", repr(lr)]
    if warmup is not None:
        out += ["SOLVER.WARMUP_ITERS", str(warmup)]
    return out


def arm_run(
    detector: str, protocol: str, arm: str, seed: int, s: Schedule, teacher: Path, student: Path
) -> list[str]:
    """train_net.py's config overrides of one arm and seed (OUTPUT_DIR excepted)."""
    _, student_cfg, _ = DETECTORS[detector]
    opts = ["MODEL.TEACHER.WEIGHTS", str(teacher), "SEED", str(seed)]
    if protocol == "A":
        opts += solver(s.a_iters, int(s.a_iters * 0.8))
    elif protocol == "P":
        # continue the converged student: the LR its schedule ended on, x0.1 for the last
        # epoch; one refresh per epoch of the smaller split (REFRESH_PERIOD 0 = an epoch), a(e)
        # over the epochs MAX_ITER spans; a checkpoint per epoch for the r diagnostics
        opts += ["MODEL.WEIGHTS", str(student)]
        opts += ["DATASETS.TRAIN", f"('gkd_fashion_train_{s.p_images}',)"]
        opts += solver(
            s.p_iters,
            s.p_iters - s.epoch_iters,
            lr=base_lr(student_cfg) / 10,
            warmup=0,
        )
        opts[opts.index("SOLVER.CHECKPOINT_PERIOD") + 1] = str(s.epoch_iters)
    else:
        raise KeyError(f"unknown protocol {protocol!r}; protocols: {', '.join(PROTOCOLS)}")
    return opts + arm_overrides(detector, arm)


def run_logged(cmd: list[str], log: Path, threads: int = 0) -> int:
    """Run ``cmd`` in the repository, stdout and stderr to ``log``, OMP on ``threads`` (0 = its
    default); its exit status."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    with open(log, "w") as f:
        return subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env).returncode


def train_net(
    output_dir: Path,
    *argv: str,
    log: Path,
    threads: int = 0,
    eval_only: bool = False,
    runner: list[str] | None = None,
    who: str = "bench_accuracy",
) -> dict:
    """Run train_net.py into ``output_dir`` (log to ``log``) through ``runner`` (the command that
    registers the benchmark's datasets; default the Fashion splits'); return its final COCO
    bbox metrics (the ``results.json`` it writes there). ``who`` names the benchmark in errors."""
    from gkd_d2.engine.results import read_results

    cmd = [*(runner or WITH_DATA), "train_net.py", *(["--eval-only"] if eval_only else []), *argv]
    cmd += ["OUTPUT_DIR", str(output_dir)]
    if threads:
        cmd += ["NUM_THREADS", str(threads)]
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.json").unlink(missing_ok=True)  # an interrupted run's must not count
    returncode = run_logged(cmd, log, threads)
    if returncode != 0:
        raise SystemExit(f"{who}: train_net.py failed (exit {returncode}), see {log}")
    try:
        bbox = read_results(str(output_dir))["bbox"]
    except (FileNotFoundError, KeyError):
        raise SystemExit(f"{who}: no COCO evaluation in {output_dir}, see {log}") from None
    return {m: bbox[m] for m in METRICS}


def flagged(run_dir: Path, dataset: str = DATASET_VAL) -> dict[str, float]:
    """AP on the occluded and on the blurred validation instances of a finished run."""
    from detectron2.data import MetadataCatalog

    from benchmarks.evaluation import flagged_instance_ap_from_files
    from benchmarks.fashion_scenes import register_fashion_datasets

    register_fashion_datasets()
    gt = MetadataCatalog.get(dataset).json_file
    results = run_dir / "inference" / dataset / "coco_instances_results.json"
    out = {}
    for flag in ("occluded", "blurred"):
        ap = flagged_instance_ap_from_files(gt, str(results), flag)
        out[f"AP_{flag}"] = ap["AP"]
    return out


def epoch_checkpoints(run_dir: Path, s: Schedule, protocol: str) -> list[tuple[int, Path]]:
    """(epoch, checkpoint) at the end of each epoch of a run: that epoch's prototypes."""
    if protocol == "A":  # shorter than an epoch of the whole split: one refresh, at iteration 0
        return [(0, run_dir / "model_final.pth")]
    out = [(e, run_dir / f"model_{(e + 1) * s.epoch_iters - 1:07d}.pth") for e in range(s.epochs)]
    out[-1] = (s.epochs - 1, run_dir / "model_final.pth")
    return out if s.r_every_epoch else out[-1:]


def r_diagnostics(
    config: str, opts: list[str], checkpoint: Path, out: Path, log: Path, threads: int = 0
) -> dict:
    """tools/visualize_prototypes.py --split test on one checkpoint; its robustness.json."""
    cmd = [*WITH_DATA, "tools/visualize_prototypes.py", "--config-file", config]
    cmd += ["--checkpoint", str(checkpoint), "--output", str(out), "--split", "test"]
    cmd += ["--max-images", "500", *opts]
    if run_logged(cmd, log, threads) != 0:
        raise SystemExit(f"bench_accuracy: visualize_prototypes failed, see {log}")
    summary = json.loads((out / "robustness.json").read_text())
    keep = ("instances", "mean_r", "p10", "p25", "p50", "p75", "p90", "below_0.5")
    pick = {k: summary.get(k) for k in keep}
    for group in ("size", "occluded", "blurred"):
        if group in summary:
            pick[group] = {m: {k: v.get(k) for k in keep} for m, v in summary[group].items()}
    pick["bank_iter"] = summary["bank_iter"]
    # which r (the training r by default; runs recorded before it existed were box-level)
    pick["r_source"] = summary.get("r_source", "box")
    return pick


def arm_order(arms: list[str]) -> list[str]:
    """The arms in the order they start: the student alone (no teacher: the shortest run) last,
    so that with ``--jobs 2`` the two slots finish closer together."""
    return [a for a in arms if a != ALONE] + [a for a in arms if a == ALONE]


class Bench:
    """The runs of one invocation; results.json written after each finished run."""

    def __init__(self, root: Path, name: str, s: Schedule, jobs: int):
        self.root, self.s, self.jobs = root, s, jobs
        self.out = root / name
        self.out.mkdir(parents=True, exist_ok=True)
        self.results_file = self.out / "results.json"
        self.results = (
            json.loads(self.results_file.read_text()) if self.results_file.is_file() else {}
        )
        self.threads = 0 if jobs == 1 else max(1, (os.cpu_count() or 2) // jobs)
        self.lock = threading.Lock()  # --jobs: runs finish in threads

    def save(self) -> None:
        """Write results.json (atomically); call with ``lock`` held."""
        tmp = self.results_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.results, indent=1))
        tmp.replace(self.results_file)

    def parallel(self, tasks: list) -> None:
        """Run the callables, ``jobs`` at a time; the first failure stops the benchmark."""
        if self.jobs == 1:
            for t in tasks:
                t()
            return
        with ThreadPoolExecutor(self.jobs) as pool:
            for f in [pool.submit(t) for t in tasks]:
                f.result()

    def cached_model(self, kind: str, detector: str, config: str, opts: list[str], iters: int):
        """Train (once) the teacher or the converged student; (weights, its metrics)."""
        folder = self.root / f"{kind}s" / f"{detector}_{iters}it_{config_digest(config, *opts)}"
        weights = folder / "model_final.pth"
        metrics_file = folder / "metrics_bench.json"
        if not (weights.is_file() and metrics_file.is_file()):
            folder.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            m = train_net(
                folder,
                "--config-file",
                config,
                *opts,
                *solver(iters, int(iters * 0.8)),
                log=folder / "train.log",  # alone on the machine: all its threads
            )
            m.update(flagged(folder))
            m["minutes"] = (time.perf_counter() - start) / 60
            metrics_file.write_text(json.dumps(m, indent=1))
        return weights, json.loads(metrics_file.read_text())

    def run_arm(self, detector, protocol, arm, seed, teacher, student) -> None:
        with self.lock:
            table = self.results.setdefault(detector, {}).setdefault(protocol, {})
        key = f"{arm} | seed {seed}"
        if key in table:
            return
        slug = arm.replace(" ", "_").replace("+", "plus").replace(",", "").replace("(", "")
        run_dir = self.out / "runs" / detector / protocol / f"{slug.replace(')', '')}_seed{seed}"
        run_dir.mkdir(parents=True, exist_ok=True)
        _, student_cfg, _ = DETECTORS[detector]
        opts = arm_run(detector, protocol, arm, seed, self.s, teacher, student)
        start = time.perf_counter()
        m = train_net(
            run_dir,
            "--config-file",
            student_cfg,
            *opts,
            log=run_dir / "train.log",
            threads=self.threads,
        )
        m.update(flagged(run_dir))
        m["minutes"] = (time.perf_counter() - start) / 60
        if arm == "GKD" and seed == 0:
            m["r"] = [
                {
                    "epoch": e,
                    **r_diagnostics(
                        student_cfg,
                        opts,
                        ck,
                        run_dir / f"r_epoch{e}",
                        run_dir / f"r{e}.log",
                        self.threads,
                    ),
                }
                for e, ck in epoch_checkpoints(run_dir, self.s, protocol)
            ]
        with self.lock:
            table[key] = m
            self.save()
        print(f"{detector} {protocol} {key}: AP {m['AP']:.1f} ({m['minutes']:.1f} min)", flush=True)

    def detector(self, detector: str, protocols: list[str], retrain_teacher: bool) -> None:
        teacher_cfg, student_cfg, plain = DETECTORS[detector]
        teacher_dir = self.root / "teachers"
        if retrain_teacher and teacher_dir.is_dir():
            digest = config_digest(teacher_cfg)
            for old in teacher_dir.glob(f"{detector}_{self.s.teacher_iters}it_{digest}"):
                (old / "metrics_bench.json").unlink(missing_ok=True)
        teacher, tm = self.cached_model("teacher", detector, teacher_cfg, [], self.s.teacher_iters)
        with self.lock:
            self.results.setdefault(detector, {})["teacher"] = tm
        student = None
        if "P" in protocols:
            # the student alone on the teacher's schedule, once: protocol P's starting point
            opts = ["MODEL.META_ARCHITECTURE", plain, "MODEL.TEACHER.WEIGHTS", str(teacher)]
            student, sm = self.cached_model(
                "student", detector, student_cfg, opts, self.s.converge_iters
            )
            self.results[detector]["P start"] = sm
        with self.lock:
            self.save()
        self.parallel(
            [
                lambda p=p, a=a, seed=seed: self.run_arm(detector, p, a, seed, teacher, student)
                # a protocol's seeds complete before the next protocol starts
                for p in protocols
                for seed in range(self.s.seeds)
                for a in arm_order(PROTOCOL_ARMS[p])
            ]
        )


def summarise(results: dict, seeds: int) -> dict[str, dict[str, tuple[float, float]]]:
    """Per arm and metric: (mean, std) over seeds (``results``: one detector and protocol)."""
    from benchmarks.evaluation import mean_std

    out = {}
    for arm in ARMS:
        runs = [
            results[f"{arm} | seed {s}"] for s in range(seeds) if f"{arm} | seed {s}" in results
        ]
        numeric = [k for k in runs[0] if isinstance(runs[0][k], (int, float))] if runs else []
        out[arm] = {k: mean_std([r[k] for r in runs]) for k in numeric}
        if runs:
            out[arm]["n"] = (len(runs), 0.0)
    return out


def format_table(results: dict, seeds: int, rows: dict[str, dict] | None = None) -> str:
    """Markdown: the single runs of ``rows`` (teacher, starting point), then mean +- std per arm."""
    cols = [*METRICS, "AP_occluded", "AP_blurred"]
    lines = ["| model | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for name, t in (rows or {}).items():
        lines.append(f"| {name} | " + " | ".join(f"{t[c]:.1f}" for c in cols) + " |")
    for arm, stats in summarise(results, seeds).items():
        if stats:
            cells = " | ".join(f"{stats[c][0]:.1f} +- {stats[c][1]:.1f}" for c in cols)
            n = stats["n"][0]
            lines.append(f"| {arm} ({n} seed{'s' if n != 1 else ''}) | {cells} |")
    return "\n".join(lines)


def paired_table(results: dict, seeds: int, metrics=PAIRED_METRICS) -> dict:
    """{arm: {baseline: {metric: paired_difference}}} over the seeds both arms finished."""
    from benchmarks.evaluation import paired_difference

    out: dict = {}
    for arm in KD_ARMS:
        for base in BASELINES:
            if arm == base:
                continue
            both = [
                s
                for s in range(seeds)
                if f"{arm} | seed {s}" in results and f"{base} | seed {s}" in results
            ]
            if not both:
                continue
            out.setdefault(arm, {})[base] = {
                m: paired_difference(
                    [results[f"{arm} | seed {s}"][m] for s in both],
                    [results[f"{base} | seed {s}"][m] for s in both],
                )
                for m in metrics
            }
    return out


def convergence_check(results: dict, start: dict, seeds: int, metrics=PAIRED_METRICS) -> dict:
    """The continued student alone minus its starting point, per seed: {metric: difference}.
    Near 0 (the interval spanning 0, or well below the KD gains): the baseline had converged."""
    from benchmarks.evaluation import paired_difference

    runs = [
        results[f"{ALONE} | seed {s}"] for s in range(seeds) if f"{ALONE} | seed {s}" in results
    ]
    if not runs:
        return {}
    return {m: paired_difference([r[m] for r in runs], [start[m]] * len(runs)) for m in metrics}


def format_paired(paired: dict, check: dict | None = None) -> str:
    """Markdown: each KD arm minus each baseline, mean [95 % interval] (p), per metric."""
    first = next(iter(next(iter(paired.values())).values())) if paired else check or {}
    metrics = list(first)
    lines = [
        "| arm - baseline (paired by seed) | " + " | ".join(metrics) + " |",
        "|" + "---|" * (len(metrics) + 1),
    ]

    def cell(d: dict) -> str:
        if d["n"] < 2:  # one seed: a difference, no interval
            return f"{d['mean']:+.2f} (n {d['n']}, no interval)"
        return f"{d['mean']:+.2f} [{d['lo']:+.2f}, {d['hi']:+.2f}] (p {d['p']:.2f}, n {d['n']})"

    def cells(stats: dict) -> str:
        return " | ".join(cell(d) for d in stats.values())

    for arm, bases in paired.items():
        for base, stats in bases.items():
            lines.append(f"| {arm} - {base} | {cells(stats)} |")
    if check:
        lines.append(f"| {ALONE} (continued) - its start | {cells(check)} |")
    return "\n".join(lines)


# r's groups: (name, robustness.json's group key, its member; None = all boxes)
R_GROUPS = [
    ("all", None, None),
    ("small", "size", "small"),
    ("medium", "size", "medium"),
    ("large", "size", "large"),
    ("occluded", "occluded", "true"),
    ("not occluded", "occluded", "false"),
    ("blurred", "blurred", "true"),
    ("not blurred", "blurred", "false"),
]


def format_r(runs: list[dict]) -> str:
    """Markdown: r on the validation boxes per epoch, overall and per group (mean, < 0.5)."""
    groups = R_GROUPS
    lines = [
        "| epoch (refresh at it.) | " + " | ".join(g[0] for g in groups) + " |",
        "|" + "---|" * (len(groups) + 1),
    ]
    for run in runs:
        cells = []
        for _, group, member in groups:
            s = run if group is None else run.get(group, {}).get(member, {})
            if s.get("mean_r") is None:
                cells.append("-")
            else:
                cells.append(f"{s['mean_r']:.3f} ({s['below_0.5']:.0%}, n {s['instances']})")
        lines.append(f"| {run['epoch']} ({run['bank_iter']}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(results: dict, s: Schedule, out: Path) -> str:
    """table.md, paired.json, r_diagnostics.json and the charts from ``results``."""
    parts, paired_all, r_all = [], {}, {}
    for detector, by_protocol in results.items():
        rows = {"teacher": by_protocol["teacher"]} if "teacher" in by_protocol else {}
        for protocol, name in PROTOCOLS.items():
            table = by_protocol.get(protocol)
            if not table:
                continue
            own_rows = dict(rows)
            check = None
            if protocol == "P" and "P start" in by_protocol:
                own_rows["student alone, start of P"] = by_protocol["P start"]
                check = convergence_check(table, by_protocol["P start"], s.seeds)
            paired = paired_table(table, s.seeds)
            paired_all.setdefault(detector, {})[protocol] = {
                "paired": paired,
                "convergence_check": check,
            }
            parts.append(f"### {detector}, protocol {protocol} ({name})")
            parts.append(format_table(table, s.seeds, own_rows))
            if paired or check:
                parts.append(format_paired(paired, check))
            r_runs = table.get("GKD | seed 0", {}).get("r")
            if r_runs:
                r_all.setdefault(detector, {})[protocol] = r_runs
                source = r_runs[-1].get("r_source", "box").split(":")[0]
                parts.append(
                    "r of the GKD arm (seed 0) on the validation boxes at the end of each "
                    f"epoch ({source} r, `tools/visualize_prototypes.py --r-source {source}`): "
                    "mean (share below 0.5, boxes)"
                )
                parts.append(format_r(r_runs))
        plot(by_protocol, s.seeds, out / f"accuracy_{detector}.png", detector)
        if detector in r_all:
            plot_r(r_all[detector], out / f"r_{detector}.png", detector)
    (out / "paired.json").write_text(json.dumps(paired_all, indent=1))
    (out / "r_diagnostics.json").write_text(json.dumps(r_all, indent=1))
    text = "\n\n".join(parts)
    (out / "table.md").write_text(text + "\n")
    return text


def plot(by_protocol: dict, seeds: int, path: Path, detector: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    protocols = [p for p in PROTOCOLS if by_protocol.get(p)]
    if not protocols:
        return
    fig, axes = plt.subplots(1, len(protocols), figsize=(6.5 * len(protocols), 4.5), dpi=100)
    axes = [axes] if len(protocols) == 1 else list(axes)
    for ax, protocol in zip(axes, protocols):
        stats = {a: st for a, st in summarise(by_protocol[protocol], seeds).items() if st}
        width = 0.38
        for i, (metric, colour) in enumerate((("AP", "#3b6ea8"), ("APs", "#e08a2c"))):
            xs = [j + (i - 0.5) * width for j in range(len(stats))]
            ax.bar(
                xs,
                [st[metric][0] for st in stats.values()],
                width,
                yerr=[st[metric][1] for st in stats.values()],
                capsize=4,
                label=metric,
                color=colour,
            )
        labels = [a.replace(" (control)", "\n(control)").replace(", r", ",\nr") for a in stats]
        ax.set_xticks(range(len(stats)), labels, fontsize=8)
        lows = [st["AP"][0] - 3 * max(st["AP"][1], 0.3) for st in stats.values()]
        lows += [st["APs"][0] - 3 * max(st["APs"][1], 0.3) for st in stats.values()]
        ax.set_ylim(max(0.0, min(lows)), None)
        ylabel = "COCO AP (val)"
        if protocol == "P" and "P start" in by_protocol:  # what "continued alone" started from
            ax.axhline(by_protocol["P start"]["AP"], color="#3b6ea8", ls="--", lw=1)
            ax.axhline(by_protocol["P start"]["APs"], color="#e08a2c", ls="--", lw=1)
            ylabel += "; dashed: the converged student before P"
        ax.set_ylabel(ylabel)
        ns = sorted({int(st["n"][0]) for st in stats.values()})  # a stopped run: arms differ
        n = str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"
        ax.set_title(f"protocol {protocol}: {PROTOCOLS[protocol]} ({n} seeds, mean +- std)")
        ax.legend()
    fig.suptitle(f"Fashion-MNIST scenes, {detector} student")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_r(by_protocol: dict, path: Path, detector: str) -> None:
    """Mean r and share below 0.5 of each group against the epoch (one line per group)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in R_GROUPS if g[0] not in ("all", "medium")]  # a readable chart
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for protocol, runs in by_protocol.items():
        style = "-o" if protocol == "P" else "--s"
        epochs = [r["epoch"] for r in runs]
        for name, group, member in groups:
            stats = [r.get(group, {}).get(member, {}) for r in runs]
            if any(st.get("mean_r") is None for st in stats):
                continue
            for ax, key in zip(axes, ("mean_r", "below_0.5")):
                ax.plot(epochs, [st[key] for st in stats], style, label=f"{protocol}: {name}")
    axes[0].set_ylabel("mean r (validation boxes)")
    axes[1].set_ylabel("share of boxes with r < 0.5")
    for ax in axes:
        ax.set_xlabel("epoch (its prototypes, checkpoint at its end)")
        ax.set_xticks(sorted({r["epoch"] for runs in by_protocol.values() for r in runs}))
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{detector}: r of the GKD arm (seed 0) by group")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--detector", choices=[*DETECTORS, "both"], default=None)
    parser.add_argument("--protocol", choices=[*PROTOCOLS, "both"], default=None)
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(2, os.cpu_count() or 1),
        help="train_net processes at once for the arms (default 2: two one-thread processes "
        "do 15 %% more iterations per second on 2 cores than one two-thread process)",
    )
    parser.add_argument("--output", type=Path, default=REPO / "output" / "bench_accuracy")
    parser.add_argument("--retrain-teacher", action="store_true")
    ns = parser.parse_args(argv)
    s = QUICK if ns.quick else FULL
    if ns.seeds:
        s = dataclasses.replace(s, seeds=ns.seeds)
    detector = ns.detector or ("retinanet" if ns.quick else "both")
    protocol = ns.protocol or ("P" if ns.quick else "both")
    detectors = list(DETECTORS) if detector == "both" else [detector]
    protocols = list(PROTOCOLS) if protocol == "both" else [protocol]
    bench = Bench(ns.output, "quick" if ns.quick else "full", s, max(1, ns.jobs))
    start = time.perf_counter()
    for detector in detectors:
        bench.detector(detector, protocols, ns.retrain_teacher)
        report(bench.results, s, bench.out)
    print(report(bench.results, s, bench.out))
    minutes = (time.perf_counter() - start) / 60
    print(f"bench_accuracy: {minutes:.1f} min; results in {bench.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
