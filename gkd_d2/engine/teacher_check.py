"""The teacher check: the teacher's AP on a small seeded subset, before any distillation.

A teacher can load strictly and still be useless at inference (e.g. eval-mode BatchNorm with
collapsed running statistics: every detection scores 1.0, AP 0). Distilling from it wastes the
run and ends in exploding losses that point at nothing. ``TeacherCheck`` evaluates the teacher
alone, as detectron2 would, on ``MODEL.TEACHER.CHECK_IMAGES`` images and stops training before
iteration 0 when its AP is below ``MODEL.TEACHER.MIN_AP``.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
from detectron2.config import CfgNode
from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    MetadataCatalog,
    build_detection_test_loader,
)
from detectron2.engine import HookBase
from detectron2.evaluation import DatasetEvaluator, inference_on_dataset
from detectron2.utils import comm

from ..rng import preserved_rng
from .gkd_model import gkd_model_of

logger = logging.getLogger(__name__)

# the subset is drawn with this seed, the same in every run and on every rank
CHECK_SEED = 0
# metadata the evaluator needs from the source dataset (not json_file: that is the full set)
_COPIED_METADATA = ("thing_classes", "thing_dataset_id_to_contiguous_id", "thing_colors")


class TeacherCheckError(RuntimeError):
    """The teacher's AP on the check subset is below ``MODEL.TEACHER.MIN_AP``."""


def check_subset(cfg: CfgNode, num_images: int) -> tuple[str, list[dict]]:
    """The dataset the check draws from and its ``num_images`` seeded images (all if fewer).

    ``DATASETS.TEST[0]``, or ``DATASETS.TRAIN[0]`` when there is no test set or it has no
    annotations (a test-dev split).
    """
    candidates = list(cfg.DATASETS.TEST[:1]) + list(cfg.DATASETS.TRAIN[:1])
    for name in candidates:
        dicts = DatasetCatalog.get(name)
        if any(d.get("annotations") for d in dicts):
            break
    else:
        raise TeacherCheckError(
            f"Teacher check: no annotated images in {candidates} (DATASETS.TEST / TRAIN); set "
            "MODEL.TEACHER.CHECK_IMAGES 0 to skip the check"
        )
    rng = np.random.RandomState(CHECK_SEED)
    picks = sorted(rng.choice(len(dicts), min(num_images, len(dicts)), replace=False).tolist())
    return name, [dicts[i] for i in picks]


def subset_ap(
    model,
    input_cfg: CfgNode,
    cfg: CfgNode,
    build_evaluator: Callable[[CfgNode, str, str], DatasetEvaluator],
) -> tuple[float, str, int]:
    """bbox AP (percent) of ``model`` alone on the check subset of ``cfg``, through the
    project's evaluator, on the test-time input pipeline of ``input_cfg`` (its resize and
    format: the teacher's own config for the teacher).

    All ranks must call it (inference is sharded); every rank returns the same AP.

    Returns:
        (AP, the source dataset's name, the number of images).
    """
    source, subset = check_subset(cfg, cfg.MODEL.TEACHER.CHECK_IMAGES)
    name = f"{source}__gkd_teacher_check"
    # a temporary dataset of the subset, so that AP counts only its images' ground truth
    DatasetCatalog.register(name, lambda: subset)
    meta = MetadataCatalog.get(source)
    MetadataCatalog.get(name).set(
        evaluator_type="coco", **{k: meta.get(k) for k in _COPIED_METADATA if meta.get(k)}
    )
    folder = tempfile.mkdtemp(prefix="gkd_teacher_check_") if comm.is_main_process() else ""
    folder = comm.all_gather(folder)[0]  # one folder for the converted ground truth
    try:
        loader = build_detection_test_loader(
            subset, mapper=DatasetMapper(input_cfg, is_train=False), num_workers=0
        )
        evaluator = build_evaluator(cfg, name, folder)
        results = inference_on_dataset(model, loader, evaluator)
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
        comm.synchronize()
        if comm.is_main_process():
            shutil.rmtree(folder, ignore_errors=True)
    ap = float(results["bbox"]["AP"]) if results else float("nan")
    return comm.all_gather(ap)[0], source, len(subset)


def teacher_ap(
    teacher,
    cfg: CfgNode,
    build_evaluator: Callable[[CfgNode, str, str], DatasetEvaluator],
) -> tuple[float, str, int]:
    """:func:`subset_ap` of the teacher, on its own test-time input pipeline."""
    return subset_ap(teacher.model, teacher.cfg, cfg, build_evaluator)


def evaluate_teacher_command(cfg: CfgNode, source: str) -> str:
    """The command that evaluates the teacher alone on the check's dataset: this run's script
    (train_net.py where it is not a script), the teacher's config, weights and OPTS."""
    t = cfg.MODEL.TEACHER
    main = sys.modules.get("__main__")
    # a script run as `python script.py` (not `python -m module`, not a console entry point)
    as_script = main is not None and getattr(main, "__spec__", None) is None
    script = sys.argv[0] if as_script and sys.argv[0].endswith(".py") else "train_net.py"
    words = [
        "python",
        os.path.relpath(script) if os.path.isabs(script) else script,
        "--config-file",
        t.CONFIG_FILE,
        "--eval-only",
        "MODEL.WEIGHTS",
        t.WEIGHTS,
        *[str(o) for o in t.OPTS],
        "DATASETS.TEST",
        f'("{source}",)',
    ]
    return shlex.join(words)


_NO_DETECTIONS = " (no detections)"


def describe_ap(ap: float) -> tuple[float, str]:
    """(the AP to store, its words in the log): COCO's AP of an empty detection list is nan (no
    precision to average); a teacher that found nothing scores 0."""
    found_nothing = not math.isfinite(ap)
    ap = 0.0 if found_nothing else ap
    return ap, f"bbox AP {ap:.2f}" + (_NO_DETECTIONS if found_nothing else "")


# what ``TeacherCheck`` logs (``describe_ap``'s words); tools/rehearse.py reads it back
_LOGGED = re.compile(
    rf"Teacher check: .*?: bbox AP (?P<ap>[\d.]+)(?P<none>{re.escape(_NO_DETECTIONS)})? "
    r"on (?P<images>\d+) images of (?P<source>\S+) "
)


def parse_teacher_check(text: str) -> dict | None:
    """The last teacher check logged in ``text`` (a training log): ``{"ap", "no_detections",
    "images", "source"}``; None when the check did not run."""
    found = list(_LOGGED.finditer(text))
    if not found:
        return None
    m = found[-1]
    return {
        "ap": float(m["ap"]),
        "no_detections": m["none"] is not None,
        "images": int(m["images"]),
        "source": m["source"],
    }


class TeacherCheck(HookBase):
    """Before training: log the teacher's AP (``gkd/teacher_ap``) and stop, naming the teacher,
    when it is below ``MODEL.TEACHER.MIN_AP``. When the student starts from weights
    (``MODEL.WEIGHTS``), also score the student as loaded on the same images
    (``gkd/student_start_ap``) and warn when the teacher is not the better of the two: KD then
    tends to pull the student down to the teacher's level."""

    def __init__(self, cfg: CfgNode, build_evaluator):
        self.cfg = cfg
        self.build_evaluator = build_evaluator

    def before_train(self) -> None:
        t = self.cfg.MODEL.TEACHER
        model = gkd_model_of(self.trainer)
        teacher = model.require_teacher()
        start = time.perf_counter()
        # its data loader draws from torch's RNG: a resumed run must see the same RNG as the
        # original one after the check
        with preserved_rng():
            ap, source, n = teacher_ap(teacher, self.cfg, self.build_evaluator)
        seconds = time.perf_counter() - start
        ap, what = describe_ap(ap)
        who = (
            f"teacher {teacher.cfg.MODEL.META_ARCHITECTURE} (MODEL.TEACHER.CONFIG_FILE "
            f"{t.CONFIG_FILE!r}, MODEL.TEACHER.WEIGHTS {t.WEIGHTS!r})"
        )
        logger.info(f"Teacher check: {who}: {what} on {n} images of {source} ({seconds:.1f}s)")
        self.trainer.storage.put_scalar("gkd/teacher_ap", ap, smoothing_hint=False)
        if t.MIN_AP > 0 and ap < t.MIN_AP:
            raise TeacherCheckError(
                f"Teacher check failed: the {who} scores {what} on {n} images of "
                f"{source}, below MODEL.TEACHER.MIN_AP {t.MIN_AP:g}; distilling from it would "
                "teach the student nothing. Evaluate it alone: "
                f"{evaluate_teacher_command(self.cfg, source)} . A teacher trained for only a "
                "few iterations scores about 0; so does one whose training loss was low but "
                "that is broken at inference, usually by eval-mode BatchNorm with degenerate "
                "running statistics (use GN or no norm in the FPN and head, or FrozenBN). Point "
                "MODEL.TEACHER.WEIGHTS at a trained teacher, or set MODEL.TEACHER.MIN_AP 0 to "
                "distil anyway."
            )
        if self.cfg.MODEL.WEIGHTS:
            self._compare_with_the_student_start(model, ap, source, n)

    def _compare_with_the_student_start(self, model, teacher_ap: float, source, n) -> None:
        """The student as loaded (its start, or a resumed checkpoint), on the check's images and
        its own test-time pipeline; a warning when it is not below the teacher."""
        with preserved_rng():
            ap, _, _ = subset_ap(model, self.cfg, self.cfg, self.build_evaluator)
        ap, what = describe_ap(ap)
        self.trainer.storage.put_scalar("gkd/student_start_ap", ap, smoothing_hint=False)
        logger.info(
            f"Student start: the student as loaded (MODEL.WEIGHTS {self.cfg.MODEL.WEIGHTS!r}) "
            f"scores {what} on the same {n} images of {source}"
        )
        if ap >= teacher_ap:
            logger.warning(
                f"The teacher ({teacher_ap:.2f} AP) is not better than the student it starts "
                f"from ({ap:.2f} AP) on {n} images of {source}: distillation pulls a student "
                "towards its teacher, so it can lower this student's AP (measured on a one-class "
                "dataset: 6.57 AP alone, 5.38 distilled from a 6.39 AP teacher). Use a stronger "
                "teacher, or compare with the student trained alone on the same schedule."
            )
