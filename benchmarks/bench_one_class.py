#!/usr/bin/env python
"""One-class soft-label benchmark: what the soft-label KD term does to a one-class RetinaNet.

    python -m benchmarks.bench_one_class [--keep-class NAME] [--student {r18,mobilenet}]
        [--seeds 3] [--jobs 2] [--output DIR] [--teacher-dir DIR] [--max-minutes M]

The official softmax soft-label term is identically 0 for a one-class RetinaNet (K = 1: no soft
term); the sigmoid form (``MODEL.GKD.SOFT_LABEL sigmoid``, a binary KL per instance) was
gkd_d2's "auto" for one class until 2026-12-07, and is an opt-in since, because of this
benchmark. It measures, paired by seed, which default a one-class student should get. On the
one-class scenes (``gkd_scenes_<class>_*`` of :mod:`benchmarks.one_class_scenes`: the
annotations of one class of the embedded scenes, ``--keep-class``, "square" by default):

1. the one-class teacher (``configs/bench/scenes_one_class_teacher.yaml``: the quick-start
   recipe, 800 iterations), trained once into the teacher folder (reused while its
   model_final.pth and results.json exist): DIR/teacher for the R18 student, and for the
   MobileNetV2 student the R18 student's default DIR/teacher of the same class (one teacher per
   class; ``--teacher-dir`` sets another);
2. w_c, the soft weight that gives the one-class sigmoid term the size the softmax term has on
   the six-class quick-start student: the mean ``loss_gkd_soft`` of iterations 0-19 of (i) the
   six-class quick-start GKD student (``configs/quickstart_gkd_retinanet_cpu.yaml``, softmax
   form; its teacher ``output/quickstart_retinanet_cpu/model_final.pth`` is trained first when
   missing) over (ii) that of the one-class GKD student with the sigmoid form at weight 1,
   rounded to one significant figure. Both are the first 20 iterations of the 300-iteration
   student schedule (seed 0), stopped there (:func:`probe_soft_loss`); measured once and kept
   in DIR/results.json;
3. per seed, the student (``--student``: ``r18``, the quarter-width quick-start student of
   ``configs/bench/scenes_one_class_gkd.yaml``, or ``mobilenet``, the ImageNet MobileNetV2-FPN
   student of ``configs/bench/scenes_one_class_gkd_mobilenet.yaml``; both 300 iterations at
   160 px) in seven arms: the student alone (plain RetinaNet), and local-only KD
   (``ROBUST_WEIGHTS False``) and GKD, each with the soft term off (``SOFT_WEIGHT 0``, what the
   official softmax amounts to), "sigmoid x1" (the former "auto") and "sigmoid x w_c";
4. DIR/results.json (every run's COCO AP, AP50, APs, APm, APl and wall minutes; finished runs
   reused, so an interrupted benchmark continues) and DIR/table.md: mean +- std per arm, the
   paired differences (mean, 95 % paired-t interval, p) of each soft variant against "off"
   within each method, of GKD against local-only KD at each soft variant and of every arm
   against the student alone, and the losses of the GKD arms of seed 0 along training.

DIR defaults to output/bench_one_class for the first round (square, r18) and to
output/bench_one_class_<class>_<student> otherwise; results.json records the class and the
student, and a DIR holding another class's or student's results is refused, so rounds never mix.
``--max-minutes M`` starts no run after M minutes (those running finish; the tables report what
finished).

Each run is a train_net.py process through ``python -m benchmarks.one_class_scenes`` (which
registers the one-class splits). ``--jobs 2`` runs two one-thread processes at once (faster on 2
cores than one two-thread process: see benchmarks/bench_accuracy.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from benchmarks import bench_accuracy
from benchmarks.bench_accuracy import ALONE, Bench, arm_order, format_paired, run_logged
from gkd_d2.data.scenes import SHAPE_CLASSES

REPO = Path(__file__).resolve().parent.parent
# train_net.py with the one-class splits registered
WITH_DATA = [sys.executable, "-m", "benchmarks.one_class_scenes"]
TEACHER_CFG = "configs/bench/scenes_one_class_teacher.yaml"
STUDENT_CFGS = {  # 300 iterations, x0.1 at 240
    "r18": "configs/bench/scenes_one_class_gkd.yaml",
    "mobilenet": "configs/bench/scenes_one_class_gkd_mobilenet.yaml",
}
STUDENT_TITLES = {
    "r18": "quarter-width RetinaNet student",
    "mobilenet": "ImageNet MobileNetV2-FPN RetinaNet student",
}
STUDENT_CFG = STUDENT_CFGS["r18"]
# the first round's class and student: their results stay in output/bench_one_class
DEFAULT_CLASS, DEFAULT_STUDENT = "square", "r18"
# the six-class quick-start pair: the softmax term's size, the reference of w_c
QUICKSTART_TEACHER_CFG = "configs/quickstart_retinanet_cpu.yaml"
QUICKSTART_GKD_CFG = "configs/quickstart_gkd_retinanet_cpu.yaml"
QUICKSTART_TEACHER = "output/quickstart_retinanet_cpu/model_final.pth"  # its OUTPUT_DIR
# the quick-start student schedule (tools/demo.py), for the six-class probe
STUDENT_SCHEDULE = ["SOLVER.MAX_ITER", "300", "SOLVER.STEPS", "(240,)"]
PROBE_ITERS = 20
METRICS = ["AP", "AP50", "APs", "APm", "APl"]
PAIRED_METRICS = ("AP", "AP50", "APs", "APm")

METHODS = {"local-only KD": ["MODEL.GKD.ROBUST_WEIGHTS", "False"], "GKD": []}
OFF, X1, XC = "soft off", "sigmoid x1", "sigmoid x w_c"
SOFT_VARIANTS = [OFF, X1, XC]


def soft_overrides(variant: str, w_c: float) -> list[str]:
    if variant == OFF:
        return ["MODEL.GKD.SOFT_WEIGHT", "0.0"]
    weight = {X1: 1.0, XC: w_c}[variant]
    return ["MODEL.GKD.SOFT_LABEL", "sigmoid", "MODEL.GKD.SOFT_WEIGHT", repr(weight)]


def arm_name(method: str, variant: str) -> str:
    return f"{method}, {variant}"


ARMS = [ALONE] + [arm_name(m, v) for m in METHODS for v in SOFT_VARIANTS]


def arm_overrides(arm: str, w_c: float) -> list[str]:
    """train_net.py's overrides of ``arm`` (seed, teacher and OUTPUT_DIR excepted)."""
    if arm == ALONE:
        return ["MODEL.META_ARCHITECTURE", "RetinaNet"]
    for m in METHODS:
        for v in SOFT_VARIANTS:
            if arm == arm_name(m, v):
                return [*METHODS[m], *soft_overrides(v, w_c)]
    raise KeyError(f"unknown arm {arm!r}; arms: {', '.join(ARMS)}")


def comparisons() -> dict[str, list[tuple[str, str]]]:
    """The paired differences reported: {section: [(arm, baseline)]}."""
    return {
        "soft variant - soft off, within each method": [
            (arm_name(m, v), arm_name(m, OFF)) for m in METHODS for v in SOFT_VARIANTS if v != OFF
        ],
        "GKD - local-only KD, at each soft variant": [
            (arm_name("GKD", v), arm_name("local-only KD", v)) for v in SOFT_VARIANTS
        ],
        "every arm - student alone": [(a, ALONE) for a in ARMS if a != ALONE],
    }


def default_output(keep: str, student: str) -> Path:
    """The benchmark's folder of ``keep`` and ``student`` (the first round's is unchanged)."""
    if (keep, student) == (DEFAULT_CLASS, DEFAULT_STUDENT):
        return REPO / "output" / "bench_one_class"
    return REPO / "output" / f"bench_one_class_{keep}_{student}"


def dataset_overrides(keep: str) -> list[str]:
    """train_net.py's overrides that train and evaluate on the one-class splits of ``keep``."""
    from benchmarks.one_class_scenes import one_class_splits

    train, val = one_class_splits(keep)
    return ["DATASETS.TRAIN", f'("{train}",)', "DATASETS.TEST", f'("{val}",)']


def one_significant_figure(x: float) -> float:
    if not x > 0:
        raise ValueError(f"one_significant_figure: {x} is not positive")
    return float(f"{x:.0e}")


def _number(v) -> float:
    return float("nan") if v is None else float(v)


def train_net(output_dir: Path, *argv: str, log: Path, threads: int = 0) -> dict:
    """A train_net.py run with the one-class splits registered, into ``output_dir``; its final
    COCO bbox metrics (OUTPUT_DIR/results.json), NaN for a metric COCO could not compute."""
    m = bench_accuracy.train_net(
        output_dir, *argv, log=log, threads=threads, runner=WITH_DATA, who="bench_one_class"
    )
    return {k: _number(m[k]) for k in METRICS}


class _StopProbe(Exception):
    pass


def probe_soft_loss(config: str, opts: list[str], out_json: Path, iters: int = PROBE_ITERS):
    """Train ``config`` (with ``opts``) in this process and stop after ``iters`` iterations,
    writing ``loss_gkd_soft`` of each iteration and their mean to ``out_json``. The schedule
    of ``opts`` stays the run's (LR warm-up and all): these are the first iterations of that
    run, not of a shorter one."""
    from types import SimpleNamespace

    from detectron2.engine import HookBase

    from benchmarks.one_class_scenes import register_one_class_datasets
    from gkd_d2.engine import Trainer, setup_cfg

    register_one_class_datasets()
    args = SimpleNamespace(config_file=config, eval_only=False, resume=False, opts=list(opts))
    trainer = Trainer(setup_cfg(args))
    trainer.resume_or_load(resume=False)

    class StopAfter(HookBase):
        def after_step(self):
            if self.trainer.iter + 1 >= iters:
                raise _StopProbe

    trainer.register_hooks([StopAfter()])
    try:
        trainer.train()
    except _StopProbe:
        pass
    values = [float(v) for v, _ in trainer.storage.history("loss_gkd_soft").values()]
    out = {"config": config, "opts": list(opts), "loss_gkd_soft": values}
    out["mean"] = sum(values) / len(values)
    out_json.write_text(json.dumps(out, indent=1))


class OneClassBench(Bench):
    """The runs of the benchmark; DIR/results.json written after each finished run:
    {"teacher": metrics, "w_c": the measurement, "runs": {"<arm> | seed <s>": metrics}}."""

    def __init__(
        self,
        out: Path,
        seeds: int,
        jobs: int,
        keep: str = DEFAULT_CLASS,
        student: str = DEFAULT_STUDENT,
        teacher_dir: Path | None = None,
        max_minutes: float | None = None,
    ):
        super().__init__(out.parent, out.name, None, jobs)
        self.seeds = seeds
        self.keep, self.student = keep, student
        self.student_cfg = STUDENT_CFGS[student]
        self.data = dataset_overrides(keep)
        if teacher_dir is None:
            r18 = self.out if student == "r18" else default_output(keep, "r18")
            teacher_dir = r18 / "teacher"
        self.teacher_dir = teacher_dir
        self.deadline = None if max_minutes is None else time.monotonic() + 60 * max_minutes
        # results of the first round carry no class or student: they are square's, r18's
        found = dict(self.results)
        first_round = {"keep_class": DEFAULT_CLASS, "student": DEFAULT_STUDENT}
        for k, want in (("keep_class", keep), ("student", student)):
            have = found.get(k, first_round[k])
            if found and have != want:
                raise SystemExit(
                    f"bench_one_class: {self.results_file} holds {k} {have!r}, not {want!r}; "
                    "choose another --output"
                )
            self.results[k] = want
        self.results.setdefault("runs", {})

    def teacher(self) -> Path:
        folder = self.teacher_dir
        weights = folder / "model_final.pth"
        if not (weights.is_file() and (folder / "results.json").is_file()):
            start = time.perf_counter()
            # alone on the machine: all its threads
            m = train_net(
                folder, "--config-file", TEACHER_CFG, *self.data, log=folder / "train.log"
            )
            m["minutes"] = (time.perf_counter() - start) / 60
            self.results["teacher"] = m
        elif "teacher" not in self.results:  # trained before this benchmark's first run
            from gkd_d2.engine.results import read_results

            bbox = read_results(str(folder))["bbox"]
            self.results["teacher"] = {m: _number(bbox[m]) for m in METRICS} | {"minutes": None}
        with self.lock:
            self.save()
        print(f"teacher: AP {self.results['teacher']['AP']:.1f}", flush=True)
        return weights

    def quickstart_teacher(self) -> Path:
        weights = REPO / QUICKSTART_TEACHER
        if not weights.is_file():
            folder = weights.parent
            folder.mkdir(parents=True, exist_ok=True)
            start = time.perf_counter()
            m = train_net(folder, "--config-file", QUICKSTART_TEACHER_CFG, log=folder / "train.log")
            m["minutes"] = (time.perf_counter() - start) / 60
            self.results["quickstart teacher"] = m
        return weights

    def w_c(self, teacher: Path) -> float:
        """w_c, measured once (:func:`probe_soft_loss` on the two students)."""
        if "w_c" not in self.results:
            six = self.quickstart_teacher()
            probes = {
                "six-class softmax x1": (
                    QUICKSTART_GKD_CFG,
                    [*STUDENT_SCHEDULE, "MODEL.TEACHER.WEIGHTS", str(six)],
                ),
                "one-class sigmoid x1": (
                    self.student_cfg,
                    [
                        *self.data,
                        "MODEL.TEACHER.WEIGHTS",
                        str(teacher),
                        *soft_overrides(X1, 1.0),
                    ],
                ),
            }
            folder = self.out / "w_c"
            folder.mkdir(parents=True, exist_ok=True)

            def probe(name: str) -> None:
                config, opts = probes[name]
                slug = name.replace(" ", "_")
                opts = [*opts, "SEED", "0", "OUTPUT_DIR", str(folder / slug)]
                opts += ["NUM_THREADS", str(self.threads)] if self.threads else []
                cmd = [sys.executable, "-m", "benchmarks.bench_one_class", "probe", config, *opts]
                if run_logged(cmd, folder / f"{slug}.log", self.threads) != 0:
                    raise SystemExit(f"bench_one_class: the probe failed, see {folder / slug}.log")

            self.parallel([lambda n=n: probe(n) for n in probes])
            means = {
                n: json.loads((folder / n.replace(" ", "_") / "probe.json").read_text())["mean"]
                for n in probes
            }
            ratio = means["six-class softmax x1"] / means["one-class sigmoid x1"]
            self.results["w_c"] = {
                "w_c": one_significant_figure(ratio),
                "ratio": ratio,
                "iterations": PROBE_ITERS,
                "mean loss_gkd_soft": means,
            }
            with self.lock:
                self.save()
        w = self.results["w_c"]
        print(f"w_c {w['w_c']:g} (ratio {w['ratio']:.4g}: {w['mean loss_gkd_soft']})", flush=True)
        return w["w_c"]

    def run_arm(self, arm: str, seed: int, teacher: Path, w_c: float) -> None:
        key = f"{arm} | seed {seed}"
        with self.lock:
            if key in self.results["runs"]:
                return
        if self.deadline is not None and time.monotonic() > self.deadline:
            print(f"{key}: not started (--max-minutes)", flush=True)
            return
        slug = arm.replace(" ", "_").replace(",", "").replace("-", "")
        run_dir = self.out / "runs" / f"{slug}_seed{seed}"
        start = time.perf_counter()
        m = train_net(
            run_dir,
            "--config-file",
            self.student_cfg,
            *self.data,
            "MODEL.TEACHER.WEIGHTS",
            str(teacher),
            "SEED",
            str(seed),
            *arm_overrides(arm, w_c),
            log=run_dir / "train.log",
            threads=self.threads,
        )
        m["minutes"] = (time.perf_counter() - start) / 60
        m["run_dir"] = str(run_dir.relative_to(self.out))
        with self.lock:
            self.results["runs"][key] = m
            self.save()
        print(f"{key}: AP {m['AP']:.1f} ({m['minutes']:.1f} min)", flush=True)

    def run(self) -> None:
        teacher = self.teacher()
        w_c = self.w_c(teacher)
        self.parallel(
            [
                lambda a=a, s=s: self.run_arm(a, s, teacher, w_c)
                for s in range(self.seeds)
                for a in arm_order(ARMS)
            ]
        )


def summarise(runs: dict, seeds: int) -> dict[str, dict[str, tuple[float, float]]]:
    """Per arm: {metric or "minutes": (mean, std)} over the seeds it finished, and "n"."""
    from benchmarks.evaluation import mean_std

    out = {}
    for arm in ARMS:
        done = [runs[f"{arm} | seed {s}"] for s in range(seeds) if f"{arm} | seed {s}" in runs]
        if done:
            out[arm] = {k: mean_std([_number(r[k]) for r in done]) for k in [*METRICS, "minutes"]}
            out[arm]["n"] = (len(done), 0.0)
    return out


def paired(runs: dict, seeds: int, pairs: list[tuple[str, str]], metrics=PAIRED_METRICS) -> dict:
    """{arm: {baseline: {metric: paired_difference}}} over the seeds both finished (the shape
    :func:`benchmarks.bench_accuracy.format_paired` prints)."""
    from benchmarks.evaluation import paired_difference

    out: dict = {}
    for arm, base in pairs:
        both = [
            s for s in range(seeds) if f"{arm} | seed {s}" in runs and f"{base} | seed {s}" in runs
        ]
        if both:
            out.setdefault(arm, {})[base] = {
                m: paired_difference(
                    [_number(runs[f"{arm} | seed {s}"][m]) for s in both],
                    [_number(runs[f"{base} | seed {s}"][m]) for s in both],
                )
                for m in metrics
            }
    return out


def format_table(results: dict, seeds: int) -> str:
    """Markdown: the teacher, then mean +- std per arm (and its wall minutes per run)."""
    cols = [*METRICS, "minutes"]
    lines = ["| model | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 1)]
    if "teacher" in results:
        t = results["teacher"]
        cells = [f"{_number(t[c]):.1f}" if t.get(c) is not None else "-" for c in cols]
        lines.append("| teacher (800 it, 1 run) | " + " | ".join(cells) + " |")
    for arm, st in summarise(results.get("runs", {}), seeds).items():
        n = st["n"][0]
        cells = " | ".join(f"{st[c][0]:.1f} +- {st[c][1]:.1f}" for c in cols)
        lines.append(f"| {arm} ({n} seed{'s' if n != 1 else ''}) | {cells} |")
    return "\n".join(lines)


def loss_trajectory(out: Path, results: dict, seed: int = 0, at=(19, 99, 199, 299)) -> str:
    """Markdown: the loss terms (detectron2's metrics.json: the median of the 20 iterations up
    to each) of the KD arms of ``seed`` at iterations ``at``; "-" where a term is not logged
    (the soft term at weight 0 is not computed)."""
    keys = ["loss_cls", "loss_box_reg", "loss_gkd_fg", "loss_gkd_bg", "loss_gkd_soft", "total_loss"]
    lines = [
        f"| arm (seed {seed}) | iteration | " + " | ".join(keys) + " |",
        "|" + "---|" * (len(keys) + 2),
    ]
    for arm in ARMS[1:]:
        run = results.get("runs", {}).get(f"{arm} | seed {seed}")
        if not run:
            continue
        metrics = out / run.get("run_dir", "-") / "metrics.json"
        by_iter = {}
        for line in metrics.read_text().splitlines() if metrics.is_file() else []:
            e = json.loads(line)
            by_iter.setdefault(e.get("iteration"), {}).update(e)
        for i in at:
            e = by_iter.get(i, {})
            cells = [f"{e[k]:.3f}" if k in e else "-" for k in keys]
            lines.append(f"| {arm} | {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(results: dict, seeds: int, out: Path) -> str:
    """DIR/table.md (and paired.json) from ``results``; the text."""
    keep = results.get("keep_class", DEFAULT_CLASS)
    student = STUDENT_TITLES[results.get("student", DEFAULT_STUDENT)]
    parts = [f"### One-class scenes ({keep}), {student}, 300 iterations"]
    if "w_c" in results:
        w = results["w_c"]
        means = ", ".join(f"{k} {v:.4f}" for k, v in w["mean loss_gkd_soft"].items())
        parts.append(
            f"w_c = {w['w_c']:g}: mean loss_gkd_soft over iterations 0-{w['iterations'] - 1} "
            f"(seed 0) of {means}; ratio {w['ratio']:.4g}"
        )
    parts.append(format_table(results, seeds))
    runs = results.get("runs", {})
    all_paired = {}
    for section, pairs in comparisons().items():
        p = paired(runs, seeds, pairs)
        all_paired[section] = p
        if p:
            parts.append(f"Paired by seed: {section}")
            parts.append(format_paired(p))
    if any(f"{a} | seed 0" in runs for a in ARMS[1:]):
        parts.append(
            "Losses of the KD arms, seed 0 (metrics.json: median of the 20 iterations up to each)"
        )
        parts.append(loss_trajectory(out, results))
    (out / "paired.json").write_text(json.dumps(all_paired, indent=1))
    text = "\n\n".join(parts)
    (out / "table.md").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["probe"]:  # a w_c probe, in its own process: probe CONFIG [KEY VALUE ...]
        config, *opts = argv[1:]
        out = Path(opts[opts.index("OUTPUT_DIR") + 1])
        out.mkdir(parents=True, exist_ok=True)
        probe_soft_loss(config, opts, out / "probe.json")
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument(
        "--keep-class",
        default=DEFAULT_CLASS,
        choices=SHAPE_CLASSES,
        help="the class of the scenes kept (default: %(default)s)",
    )
    parser.add_argument("--student", default=DEFAULT_STUDENT, choices=sorted(STUDENT_CFGS))
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="default output/bench_one_class (square, r18), else "
        "output/bench_one_class_<class>_<student>",
    )
    parser.add_argument(
        "--teacher-dir",
        type=Path,
        default=None,
        help="the one-class teacher folder (default: DIR/teacher of the class r18 benchmark)",
    )
    parser.add_argument(
        "--max-minutes", type=float, default=None, help="start no run after this many minutes"
    )
    ns = parser.parse_args(argv)
    out = ns.output if ns.output is not None else default_output(ns.keep_class, ns.student)
    bench = OneClassBench(
        out.resolve(),
        ns.seeds,
        max(1, ns.jobs),
        ns.keep_class,
        ns.student,
        ns.teacher_dir.resolve() if ns.teacher_dir is not None else None,
        ns.max_minutes,
    )
    start = time.perf_counter()
    bench.run()
    print(report(bench.results, ns.seeds, bench.out))
    minutes = (time.perf_counter() - start) / 60
    print(f"bench_one_class: {minutes:.1f} min; results in {bench.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
