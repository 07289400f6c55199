#!/usr/bin/env python
"""Prototype refresh: images forwarded, the later refresh's cost in the "full" and "bank"
modes, and their share of an epoch.

    python -m benchmarks.bench_refresh [--config configs/quickstart_gkd_retinanet_cpu.yaml]
        [--steps 20] [--bank-steps N] [--harvest-blocks 5] [--harvest-block-steps 10]
        [--workers 2] [--worker-rounds 2] [--selection-processes 2] [KEY VALUE ...]

On a GKD config of the embedded scenes (the CPU quickstarts; the teacher's weights are random
unless MODEL.TEACHER.WEIGHTS names an existing file: the cost does not depend on them), one
model and, in one run, side by side:

* full mode (MODEL.GKD.REFRESH_MODE "full", the trainer's own PrototypeRefresh hook; the
  config's mode is overridden): counts the images forwarded by each model in the first and
  the second refresh, against the number of distinct sampled images and against what the
  official code forwards (each image once per class it holds a sampled box of); times both
  refreshes and --steps training steps, and prints each refresh's time as a share of the
  training time of one refresh period (target: <= 5 %). ``counts_as_expected``: the full
  mode forwarded each sampled image once per model, then only through the student;
* ``workers``: the full mode's later refresh (student only, the teacher's features are in
  memory) with DATALOADER.NUM_WORKERS 0 (serial input) and --workers loader workers,
  alternated --worker-rounds times; the hook reads its cfg at call time. Also checks that
  both give the same bank;
* ``bank``: a second PrototypeRefresh hook in "bank" mode on the same model (the instance
  sample and the teacher's features taken from the full hook: its first refresh times the
  student pass and the selection, no teacher pass); its first refresh, then the training steps
  below with its FeatureHarvest installed, then its second (later) refresh: seconds, images
  forwarded by the student and the teacher (``hook.last_counts``), the share of the sample's
  instances harvested, and the refresh's share of a refresh period (alone, and with the
  harvest's per-step cost added: its calls timed directly during the --bank-steps steps,
  ``harvest_call_ms_per_step``, as a share of those steps' time);
* ``harvest_cost``: training steps with the harvest installed (``model.feature_harvest``)
  and without, in --harvest-blocks alternating pairs of --harvest-block-steps steps (the
  first arm alternates): ms per step of each and the ratio. A block should span whole
  epochs of a small training set (the stand-in data: 2 steps), or the arms alias with the
  batches' content (a 1-step block on the stand-in data gave one arm more of the slower
  batches: a 5-9 % "cost" that the timed calls put at 0.2 %). The harvest-on steps feed the
  bank hook's harvest, followed by --bank-steps more (default: one refresh period), so the
  harvest has seen most of the sample before the bank's later refresh (``bank``
  ``second_harvested_share``; the instances not harvested are extracted before the selection);
* ``selection`` (--selection-processes P >= 2; 0 skips it): ``select_bank`` on the same seeded
  synthetic features (``benchmarks.bench_pgm.make_inputs``: --selection-classes classes x 5
  levels, N per class spread over 0.5-1.5 x --selection-n, C 256, NUM_PROTOTYPES 10) in P CPU
  processes joined by gloo (``gkd_d2.engine.launch``, one thread each, the problems shared
  out) vs this process alone with one thread running all problems; seconds of each (the
  slowest rank for P), the ratio, and whether every rank's picks equal the single process's
  (asserted). It needs a machine without CUDA (on one, ``launch`` is detectron2's NCCL launch
  and wants P GPUs).

At COCO scale, on a paper config with stand-in data of COCO-sized images:

    python -m benchmarks.bench_refresh --config configs/gkd.yaml --stand-in-data --steps 3 \
        --harvest-blocks 3 --harvest-block-steps 2 --worker-rounds 1 --coco-projection \
        SOLVER.IMS_PER_BATCH 2

``--stand-in-data`` writes the config's own COCO/VOC splits in detectron2's layouts to a
temporary ``DETECTRON2_DATASETS`` (``tools/rehearsal.py``: 4 training images of COCO sizes
holding all classes, 800-px input as configured) and random-init student and teacher weights
with calibrated FrozenBN. With 4 sampled images the bank mode's picks cover every image, so the
bank's measured later refresh forwards as many images as the full one: at COCO scale only
the projection shows the difference, unless ``--stand-in-images`` / ``--stand-in-classes``
give a sample with more instances per class than the picks (e.g. 24 images of 2 classes with
``MODEL.GKD.NUM_PROTOTYPES 2``): ``bank`` ``second_picked_images`` then counts the picks'
images, and ``second_student_images`` what the bank refresh re-extracted.
``--coco-projection`` turns the measured seconds per image of a refresh (both models, then
the student only) and per training step at batch 2 (one GPU's share of batch 16) into the
refresh's share of one COCO epoch on 8 GPUs, for
``MAX_IMAGES_PER_CLASS`` 800 (the paper's) and fewer, with the memory of the cached teacher
features, of the harvest and of one (class, level) selection. Assumptions:

* one epoch per GPU: 7,329 steps x the measured s/step (no harvest); the ratio of two CPU
  timings stands in for the same ratio on a GPU;
* full mode: ``80 x m / 8`` images per GPU (an upper bound: images shared by classes count
  once) x the measured s/image (first: student and teacher; later: student only);
* the selections: 80 classes x levels problems, each timed at N = 2000 (on MODEL.DEVICE;
  about a class's N at 800 images, 2 instances per image assumed) and scaled linearly by
  m / 800 (the N x N density matrix makes it closer to quadratic: an overestimate for smaller
  m); now sharded over the ranks, so a rank runs
  ``80 x levels x s_per_selection x (m / 800) / 8`` (ideal balance; the measured ``selection``
  ratio says how close two processes get). The old figure, every rank running all selections,
  is kept as ``*_share_unsharded_selection``;
* bank mode's later refresh: every sampled image is seen within the period (one epoch of
  the training sampler; no augmentation beyond resize and flip), so the picks' images are
  re-extracted (at most 80 classes x levels x NUM_PROTOTYPES distinct instances, hence at most
  that many images, and at most the 80 x m sampled) and, unless BANK_HARVEST_FLIPPED, the
  sampled images last seen flipped (half of them with RANDOM_FLIP; counted on top of the picks'
  images: an upper bound), shared evenly over 8 GPUs, x the measured
  s/image of the full mode's later (student-only) refresh (with the config's
  DATALOADER.NUM_WORKERS), plus the sharded selections. Not counted: the
  merge (all-gather) of the harvest before the refresh and at checkpoints.
  ``bank_later_refresh_share_plus_harvest`` adds the harvest's per-step cost over the epoch
  (``bank`` ``harvest_call_share_of_step``, its calls timed directly: the ``harvest_cost``
  A/B ratio of whole steps is too noisy for that with a few 800-px steps, whose time varies
  with the batch by more than the harvest costs; the call time leaves out any indirect cost
  that the A/B ratio of enough steps would include).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.harness import report

REPO = Path(__file__).resolve().parent.parent


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work, so that a host timer reads its time too."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cfg_with(cfg, key: str, value):
    """A frozen copy of ``cfg`` with one key set (the hooks read their cfg at call time)."""
    c = cfg.clone()
    c.defrost()
    c.merge_from_list([key, value])
    c.freeze()
    return c


def timed_refresh(hook, iteration: int) -> float:
    """Seconds of ``hook.refresh(iteration)``, the device's queued work included."""
    device = hook.student().device
    _sync(device)
    start = time.perf_counter()
    hook.refresh(iteration)
    _sync(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/quickstart_gkd_retinanet_cpu.yaml")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--stand-in-data",
        action="store_true",
        help="write the config's builtin COCO/VOC splits to a temporary DETECTRON2_DATASETS",
    )
    parser.add_argument(
        "--stand-in-images",
        type=int,
        default=4,
        help="training images of the stand-in data (COCO sizes)",
    )
    parser.add_argument("--stand-in-per-image", type=int, default=20, help="objects per image")
    parser.add_argument(
        "--stand-in-classes",
        type=int,
        default=0,
        help="COCO stand-in objects of the first N classes only (0: all): more instances per "
        "class, so that a bank refresh's picks hold fewer images than the sample",
    )
    parser.add_argument(
        "--coco-projection",
        action="store_true",
        help="project the refresh's share of one COCO epoch on 8 GPUs",
    )
    parser.add_argument(
        "--bank-steps",
        type=int,
        default=None,
        help="harvest-on training steps before the bank's later refresh (default: one period)",
    )
    parser.add_argument("--harvest-blocks", type=int, default=5, help="pairs of blocks; 0: skip")
    parser.add_argument("--harvest-block-steps", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2, help="loader workers vs 0")
    parser.add_argument("--worker-rounds", type=int, default=2, help="0: skip")
    parser.add_argument("--selection-processes", type=int, default=2, help="0: skip")
    parser.add_argument("--selection-classes", type=int, default=16)
    parser.add_argument(
        "--amp-compare",
        action="store_true",
        help="CUDA: a later refresh with MODEL.GKD.EXTRACT_AMP against fp32 (picks, r)",
    )
    parser.add_argument("--selection-n", type=int, default=1000)
    parser.add_argument("opts", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    tmp = Path(tempfile.mkdtemp())
    if ns.stand_in_data:  # before detectron2's import: its builtin datasets read it then
        os.environ["DETECTRON2_DATASETS"] = str(tmp / "datasets")
    from types import SimpleNamespace

    from detectron2.modeling import build_model
    from detectron2.utils.events import EventStorage

    from gkd_d2.compat import inner_trainer, registered_hooks
    from gkd_d2.config import load_config
    from gkd_d2.engine import PrototypeRefresh, Trainer, setup_cfg
    from gkd_d2.engine.schedule import refresh_period
    from gkd_d2.teacher import load_teacher_cfg

    probe = load_config(str(REPO / ns.config), ns.opts)
    weights = probe.MODEL.TEACHER.WEIGHTS
    opts = list(ns.opts)
    if ns.stand_in_data:  # and random weights with calibrated FrozenBN (as tools/rehearse.py)
        from tools.rehearsal import write_builtin_splits, write_stand_in_weights

        write_builtin_splits(
            list(probe.DATASETS.TRAIN),
            list(probe.DATASETS.TEST),
            ns.stand_in_images,
            2,
            ns.stand_in_per_image,
            used_classes=ns.stand_in_classes,
        )
        student_w, teacher_w, _ = write_stand_in_weights(probe, tmp / "weights")
        weights = str(teacher_w)
        opts += ["MODEL.WEIGHTS", str(student_w)]
    elif not Path(weights).is_file():
        torch.manual_seed(0)
        weights = str(tmp / "random_teacher.pth")
        torch.save({"model": build_model(load_teacher_cfg(probe)).state_dict()}, weights)
    args = SimpleNamespace(
        config_file=str(REPO / ns.config),
        opts=[
            *opts,
            "MODEL.TEACHER.WEIGHTS",
            weights,
            "OUTPUT_DIR",
            str(tmp / "out"),
            "MODEL.GKD.REFRESH_MODE",
            "full",
        ],
        eval_only=False,
        resume=False,
    )
    cfg = setup_cfg(args)
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)  # MODEL.WEIGHTS (the stand-in student), as train_net
    (hook,) = [h for h in registered_hooks(trainer) if isinstance(h, PrototypeRefresh)]
    model = trainer.model
    device = torch.device(cfg.MODEL.DEVICE)
    counts = {"student": 0, "teacher": 0}
    backbone_forward = model.backbone.forward
    teacher_features = model.teacher.features

    def count_student(x):
        counts["student"] += x.shape[0]
        return backbone_forward(x)

    def count_teacher(inputs):
        counts["teacher"] += len(inputs)
        return teacher_features(inputs)

    def timed_steps(n: int) -> float:
        """Seconds per step of ``n`` training steps."""
        _sync(device)
        start = time.perf_counter()
        for _ in range(n):
            trainer.run_step()
        _sync(device)
        return (time.perf_counter() - start) / max(n, 1)

    period = refresh_period(cfg)
    result = {
        "config": ns.config,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "refresh_period_iters": period,
    }
    with EventStorage(0) as storage:
        trainer.storage = storage
        # ---- full mode: the first and the second refresh, images counted
        model.backbone.forward = count_student
        model.teacher.features = count_teacher
        for name, it in (("first", 0), ("second", period)):
            counts.update(student=0, teacher=0)
            result[f"{name}_refresh_s"] = round(timed_refresh(hook, it), 3)
            result[f"{name}_student_images"] = counts["student"]
            result[f"{name}_teacher_images"] = counts["teacher"]
        model.backbone.forward = backbone_forward
        model.teacher.features = teacher_features
        inst = hook.instances
        result["levels"], result["teacher_channels"] = (
            model.distiller.protos_t.shape[0],
            model.distiller.protos_t.shape[-1],
        )
        result["student_channels"] = model.distiller.protos_s.shape[-1]
        result["sampled_instances"] = len(inst["cls"])
        images = len(set(inst["image"].tolist()))
        result["distinct_sampled_images"] = images
        result["official_image_passes"] = sum(
            len(set(inst["image"][inst["cls"] == c].tolist())) for c in inst["cls"].unique()
        )
        # ---- full mode's later refresh: serial input vs loader workers
        if ns.worker_rounds > 0:
            result["workers"] = compare_workers(hook, cfg, ns.workers, ns.worker_rounds, period)
        # ---- CUDA: the extraction under autocast against fp32
        if ns.amp_compare:
            result["autocast"] = compare_autocast(hook, cfg, period)
        # ---- training steps (no harvest)
        inner_trainer(trainer).storage = storage
        trainer.run_step()  # warm-up
        step = timed_steps(ns.steps)
        result["train_step_s"] = round(step, 4)
        # ---- bank mode on the same model: first refresh, harvested steps, later refresh
        bank_hook = PrototypeRefresh(
            cfg_with(cfg, "MODEL.GKD.REFRESH_MODE", "bank"), hook.student()
        )
        bank_hook.trainer = hook.trainer
        bank_hook.instances = hook.instances  # the same sample (same seed) and teacher
        bank_hook._teacher_features = hook.teacher_features(sorted(set(inst["image"].tolist())))
        bank = {"first_refresh_s": round(timed_refresh(bank_hook, 0), 3)}
        bank.update({f"first_{k}": v for k, v in bank_hook.last_counts.items()})
        harvest = bank_hook.harvest
        if ns.harvest_blocks > 0:
            result["harvest_cost"] = harvest_cost(
                model, harvest, timed_steps, ns.harvest_blocks, ns.harvest_block_steps
            )
        # the bank steps: the harvest's own calls timed (synchronised), step by step
        timed_harvest = TimedHarvest(harvest, device)
        model.feature_harvest = timed_harvest
        bank_steps = period if ns.bank_steps is None else ns.bank_steps
        bank_step = timed_steps(bank_steps)
        model.feature_harvest = None  # (the hook installs it once, at its first refresh)
        bank["harvest_on_steps_before_later_refresh"] = bank_steps + (
            ns.harvest_blocks * ns.harvest_block_steps
        )
        if bank_steps > 0:
            call = timed_harvest.seconds / bank_steps
            bank["harvest_call_ms_per_step"] = round(1000 * call, 3)
            bank["harvest_call_share_of_step"] = round(call / bank_step, 5)
        bank["second_refresh_s"] = round(timed_refresh(bank_hook, period), 3)
        bank.update({f"second_{k}": v for k, v in bank_hook.last_counts.items()})
        # the images of the picks: what the bank refresh re-extracts (plus unplaced images)
        picked = model.distiller.proto_index
        bank["second_picked_images"] = len(set(inst["image"][picked[picked >= 0]].tolist()))
        bank["second_harvested_share"] = round(
            bank_hook.last_counts["harvested"] / max(1, len(inst["cls"])), 4
        )
        bank["second_student_images_vs_full"] = round(
            bank["second_student_images"] / max(1, result["second_student_images"]), 4
        )
        bank["second_refresh_share_of_period"] = round(
            bank["second_refresh_s"] / (period * step), 4
        )
        if "harvest_call_share_of_step" in bank:
            bank["second_refresh_plus_harvest_share_of_period"] = round(
                bank["second_refresh_share_of_period"] + bank["harvest_call_share_of_step"], 4
            )
        bank["counts_as_expected"] = (
            bank["second_teacher_images"] == 0 and bank["second_student_images"] <= images
        )
        result["bank"] = bank
    result["first_refresh_share_of_period"] = round(result["first_refresh_s"] / (period * step), 4)
    result["second_refresh_share_of_period"] = round(
        result["second_refresh_s"] / (period * step), 4
    )
    ok = (
        result["first_student_images"] == images
        and result["first_teacher_images"] == images
        and result["second_student_images"] == images
        and result["second_teacher_images"] == 0
    )
    result["counts_as_expected"] = ok
    if ns.selection_processes > 0:
        g = cfg.MODEL.GKD
        result["selection"] = compare_selection(
            ns.selection_processes,
            ns.selection_classes,
            result["levels"],
            ns.selection_n,
            256,
            10,
            (g.ALPHA, g.DENSITY_KERNEL, g.DENSITY_QUANTILE, g.EXCLUDE_PICKED),
        )
        ok = ok and result["selection"]["identical_picks"]
    if ns.coco_projection:
        result["coco_projection"] = coco_projection(result, cfg)
    report(result, ns.json)
    return 0 if ok else 1


def compare_workers(hook, cfg, workers: int, rounds: int, iteration: int) -> dict:
    """The full hook's later refresh with DATALOADER.NUM_WORKERS 0 and ``workers``, alternated
    ``rounds`` times (the hook reads ``hook.cfg`` at call time); the banks must be equal."""
    configs = {n: cfg_with(cfg, "DATALOADER.NUM_WORKERS", n) for n in (0, workers)}
    seconds: dict[int, list[float]] = {0: [], workers: []}
    banks: dict[int, tuple] = {}
    images: dict[int, int] = {}
    distiller = hook.student().distiller
    original = hook.cfg
    try:
        for r in range(rounds):
            for n in (0, workers) if r % 2 == 0 else (workers, 0):
                hook.cfg = configs[n]
                seconds[n].append(timed_refresh(hook, iteration))
                banks[n] = (distiller.protos_s.clone(), distiller.protos_t.clone())
                images[n] = hook.last_counts["student_images"]
    finally:
        hook.cfg = original
    serial, loader = min(seconds[0]), min(seconds[workers])
    return {
        "workers": workers,
        "rounds": rounds,
        "serial_s": [round(s, 3) for s in seconds[0]],
        "loader_s": [round(s, 3) for s in seconds[workers]],
        "serial_best_s": round(serial, 3),
        "loader_best_s": round(loader, 3),
        "loader_over_serial": round(loader / serial, 4),
        "student_images": images[0],
        "same_bank": all(torch.equal(a, b) for a, b in zip(banks[0], banks[workers])),
    }


def compare_autocast(hook, cfg, iteration: int) -> dict:
    """A refresh with both models' extraction in fp32 and under CUDA autocast
    (MODEL.GKD.EXTRACT_AMP; the teacher's features extracted again for each): seconds, the
    share of the fp32 picks kept, the largest prototype difference, and r of the training
    step on the training images under each bank (``tools/visualize_prototypes.py``'s training
    r per ground-truth box: mean |Delta r|, Spearman)."""
    from benchmarks.bench_bank_agreement import pick_overlap, r_agreement
    from tools.visualize_prototypes import robustness_in_training

    model = hook.student()
    # on the CPU both arms run fp32 (EXTRACT_AMP applies on CUDA only): a check of the
    # comparison itself, which must then find no difference
    distiller = model.distiller
    keys = ("protos_s", "protos_t", "proto_counts", "proto_index")
    banks, seconds, original = {}, {}, hook.cfg
    try:
        for amp in (False, True):
            hook.cfg = cfg_with(cfg, "MODEL.GKD.EXTRACT_AMP", amp)
            hook.forget_teacher_features()
            seconds[amp] = round(timed_refresh(hook, iteration), 3)
            banks[amp] = {k: getattr(distiller, k).clone() for k in keys}
    finally:
        hook.cfg = original
        hook.forget_teacher_features()
    r = {}
    for amp, bank in banks.items():
        for k, v in bank.items():
            getattr(distiller, k).copy_(v)
        r[amp] = robustness_in_training(model, cfg, hook.dataset_dicts, 50, seed=0)
    model.train()
    diff = max(
        float((banks[True][k] - banks[False][k]).abs().max()) for k in ("protos_s", "protos_t")
    )
    return {
        "device": model.device.type,
        "fp32_refresh_s": seconds[False],
        "autocast_refresh_s": seconds[True],
        "pick_overlap": pick_overlap(banks[False]["proto_index"], banks[True]["proto_index"]),
        "max_abs_prototype_difference": diff,
        "r": r_agreement(r[False], r[True], "r")["all"],
    }


class TimedHarvest:
    """A FeatureHarvest whose calls are timed (the device synchronised around each)."""

    def __init__(self, harvest, device: torch.device):
        self.harvest, self.device = harvest, device
        self.seconds, self.calls = 0.0, 0

    def __call__(self, *args) -> None:
        _sync(self.device)
        start = time.perf_counter()
        self.harvest(*args)
        _sync(self.device)
        self.seconds += time.perf_counter() - start
        self.calls += 1


def harvest_cost(model, harvest, timed_steps, blocks: int, block_steps: int) -> dict:
    """ms per training step with ``model.feature_harvest`` set to ``harvest`` and to None, in
    ``blocks`` alternating pairs of ``block_steps`` steps (which arm goes first alternates)."""
    per_step: dict[bool, list[float]] = {True: [], False: []}
    try:
        for b in range(blocks):
            for on in (True, False) if b % 2 == 0 else (False, True):
                model.feature_harvest = harvest if on else None
                per_step[on].append(timed_steps(block_steps))
    finally:
        model.feature_harvest = None
    on = sum(per_step[True]) / blocks
    off = sum(per_step[False]) / blocks
    return {
        "blocks": blocks,
        "block_steps": block_steps,
        "harvest_ms_per_step": round(1000 * on, 2),
        "no_harvest_ms_per_step": round(1000 * off, 2),
        "ratio": round(on / off, 4),
        "harvest_block_ms": [round(1000 * s, 1) for s in per_step[True]],
        "no_harvest_block_ms": [round(1000 * s, 1) for s in per_step[False]],
    }


# ---- sharded vs unsharded (class, level) selection


def selection_problem(classes: int, levels: int, n: int, channels: int) -> tuple:
    """Seeded synthetic features of a whole sample: class c has N_c instances, N_c spread
    linearly over 0.5-1.5 x ``n`` (unequal problems, as COCO's); per level, (sum N_c, C)."""
    from benchmarks.bench_pgm import make_inputs

    sizes = [
        max(2, round(n * (0.5 + (c / (classes - 1) if classes > 1 else 0.5))))
        for c in range(classes)
    ]
    feats_s, feats_t = [], []
    for lvl in range(levels):
        parts = [make_inputs(sizes[c], channels, seed=1000 * lvl + c) for c in range(classes)]
        feats_s.append(torch.cat([p[0] for p in parts]))
        feats_t.append(torch.cat([p[1] for p in parts]))
    cls = torch.cat([torch.full((s,), c, dtype=torch.long) for c, s in enumerate(sizes)])
    return feats_s, feats_t, cls, sizes


def _run_selection(spec: dict) -> dict:
    """Time ``select_bank`` on the problem of ``spec`` in this process (its world)."""
    from detectron2.utils import comm

    from gkd_d2.distill import select_prototypes
    from gkd_d2.engine.prototype_refresh import select_bank

    feats_s, feats_t, cls, _ = selection_problem(
        spec["classes"], spec["levels"], spec["n"], spec["channels"]
    )
    alpha, kernel, quantile, exclude = spec["select_args"]

    def select(xs, xt):
        return select_prototypes(xs, xt, spec["prototypes"], alpha, kernel, quantile, exclude)

    comm.synchronize()
    start = time.perf_counter()
    picks = select_bank(feats_s, feats_t, cls, spec["classes"], select, "cpu")
    seconds = time.perf_counter() - start  # select_bank ends in an all-gather: all ranks done
    return {
        "rank": comm.get_rank(),
        "world_size": comm.get_world_size(),
        "seconds": seconds,
        "picks": [[p.tolist() for p in per_class] for per_class in picks],
    }


def _selection_rank(out_dir: str, spec: dict) -> None:
    """One launched process (gloo, one thread): its timing and picks to ``out_dir``."""
    from detectron2.utils import comm

    res = _run_selection(spec)
    torch.save(res, Path(out_dir) / f"rank{comm.get_rank()}.pt")


def compare_selection(
    processes: int,
    classes: int,
    levels: int,
    n: int,
    channels: int,
    prototypes: int,
    select_args: tuple,
) -> dict:
    """``select_bank`` in ``processes`` gloo processes (problems shared out) vs this process
    alone, both one thread per process, on the same seeded features; the picks must agree."""
    from gkd_d2.engine import launch

    spec = {
        "classes": classes,
        "levels": levels,
        "n": n,
        "channels": channels,
        "prototypes": prototypes,
        "select_args": tuple(select_args),
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = _run_selection(spec)
    finally:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        launch(_selection_rank, processes, dist_url="auto", args=(out, spec))
        ranks = [torch.load(Path(out) / f"rank{r}.pt") for r in range(processes)]
    identical = all(r["picks"] == single["picks"] for r in ranks)
    assert identical, "sharded selection picks differ from the single process's"
    sharded = max(r["seconds"] for r in ranks)
    _, _, _, sizes = selection_problem(classes, 1, n, 1)
    return {
        "processes": processes,
        "problems": classes * levels,
        "instances_per_class_min_max": [min(sizes), max(sizes)],
        "channels": channels,
        "num_prototypes": prototypes,
        "single_process_s": round(single["seconds"], 3),
        "sharded_s": round(sharded, 3),
        "sharded_over_single": round(sharded / single["seconds"], 4),
        "rank_s": [round(r["seconds"], 3) for r in ranks],
        "identical_picks": identical,
    }


# one COCO epoch of the paper configs: 117,266 images at batch 16 on 8 GPUs (2 per GPU)
COCO_ITERS_PER_EPOCH, COCO_GPUS, COCO_CLASSES = 7329, 8, 80
# qualifying instances (w, h > 30 px) per sampled image of a class, of that class: an
# assumption (COCO has 7.3 instances per image, about half above 30 px, several classes each)
INSTANCES_PER_SAMPLED_IMAGE = 2.0


def coco_projection(result: dict, cfg) -> dict:
    """The refresh's share of one COCO epoch per GPU, full and bank mode, from this run's
    per-image and per-step seconds and a timed (class, level) selection at N = 2000 on
    MODEL.DEVICE (see the module docstring)."""
    from benchmarks.bench_pgm import make_inputs
    from gkd_d2.distill.prototypes import select_prototypes

    g = cfg.MODEL.GKD
    device = torch.device(cfg.MODEL.DEVICE)
    images = result["distinct_sampled_images"]
    per_image_first = result["first_refresh_s"] / images
    per_image_later = result["second_refresh_s"] / images
    n = 2000
    xs, xt = (x.to(device) for x in make_inputs(n, 256))
    select_prototypes(xs, xt, g.NUM_PROTOTYPES)  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(3):
        select_prototypes(xs, xt, g.NUM_PROTOTYPES, g.ALPHA, g.DENSITY_KERNEL, g.DENSITY_QUANTILE)
    _sync(device)
    per_selection = (time.perf_counter() - start) / 3
    levels = result["levels"]
    epoch = COCO_ITERS_PER_EPOCH * result["train_step_s"]
    # the harvest's per-step cost: its calls timed directly (the A/B step ratio is noisier)
    harvest_share = result.get("bank", {}).get("harvest_call_share_of_step")
    max_picks = COCO_CLASSES * levels * g.NUM_PROTOTYPES
    flip_share = 0.5 if cfg.INPUT.RANDOM_FLIP != "none" and not g.BANK_HARVEST_FLIPPED else 0.0
    rows = []
    for m in (800, 400, 200, 100):
        per_gpu = COCO_CLASSES * m / COCO_GPUS  # upper bound: images shared by classes count once
        # N scales with m; the (class, level) problems are shared out over the ranks
        unsharded = COCO_CLASSES * levels * per_selection * (m / 800)
        select = unsharded / COCO_GPUS
        # bank: the picks' images, at most one per distinct picked instance, and, unless
        # flipped inputs are harvested, the sampled images last seen flipped (half with
        # RANDOM_FLIP): an upper bound
        bank_per_gpu = min(
            per_gpu, min(max_picks, COCO_CLASSES * m) / COCO_GPUS + flip_share * per_gpu
        )
        bank_later = (bank_per_gpu * per_image_later + select) / epoch
        row = {
            "max_images_per_class": m,
            "images_per_gpu": per_gpu,
            "first_refresh_share": round((per_gpu * per_image_first + select) / epoch, 4),
            "later_refresh_share": round((per_gpu * per_image_later + select) / epoch, 4),
            "first_refresh_share_unsharded_selection": round(
                (per_gpu * per_image_first + unsharded) / epoch, 4
            ),
            "later_refresh_share_unsharded_selection": round(
                (per_gpu * per_image_later + unsharded) / epoch, 4
            ),
            "bank_images_per_gpu": bank_per_gpu,
            "bank_later_refresh_share": round(bank_later, 4),
        }
        if harvest_share is not None:
            row["bank_later_refresh_share_plus_harvest"] = round(bank_later + harvest_share, 4)
        rows.append(row)
    instances = COCO_CLASSES * 800 * INSTANCES_PER_SAMPLED_IMAGE
    teacher_channels = result["teacher_channels"]
    return {
        "s_per_image_first_refresh": round(per_image_first, 3),
        "s_per_image_later_refresh": round(per_image_later, 3),
        "s_per_step_batch2": result["train_step_s"],
        "s_per_selection_n2000": round(per_selection, 4),
        "selection_device": str(device),
        "epoch_s_per_gpu": round(epoch, 1),
        "bank_max_picked_instances": max_picks,
        "bank_flipped_share_extracted": flip_share,
        "harvest_step_overhead_share": harvest_share,
        "shares": rows,
        "assumed_instances_at_800_images_per_class": instances,
        "cached_teacher_features_mib": round(instances * levels * teacher_channels * 4 / 2**20),
        # the student's features of the sample, held by every rank between refreshes
        "harvest_features_mib": round(
            instances * levels * result.get("student_channels", teacher_channels) * 4 / 2**20
        ),
        "selection_density_matrix_mib_n2000": round(n * n * 4 / 2**20, 1),
    }


if __name__ == "__main__":
    sys.exit(main())
