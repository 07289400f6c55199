"""PGM in training: the fixed instance sample, feature extraction, and the refresh hook.

As the official code's PGM hook (hikvision-research/DAVAR-Lab-ML, ECCV22 GKD project,
pgm_hook.py and prototype_generation_module.py): a separate eval-mode pass in the test pipeline,
no flip, a fixed sample of up to MAX_IMAGES_PER_CLASS images per class drawn once (seed 1).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch
from detectron2.data import DatasetMapper, MetadataCatalog
from detectron2.engine import HookBase
from detectron2.structures import BoxMode, ImageList
from detectron2.utils import comm
from torch import Tensor

from ..distill import box_crop_mean, select_prototypes
from ..rng import preserved_rng
from ..schedule import refresh_period, train_dataset_dicts
from .feature_harvest import FeatureHarvest, boxes_in_input, rows_by_image
from .gkd_model import gkd_model_of
from .refresh_inputs import Batch, refresh_batches
from .teacher_cache import FILE_NAME, TeacherFeatureCache, teacher_cache_key

logger = logging.getLogger(__name__)

REFRESH_MODES = ("full", "bank")

# A forward of a batch of detectron2 input dicts to (FPN features by name, their ImageList).
FeatureFn = Callable[[list[dict]], tuple[dict[str, Tensor], ImageList]]


def sample_instances(
    dataset_dicts: list[dict],
    num_classes: int,
    min_size: float = 30.0,
    max_images_per_class: int = 800,
    seed: int = 1,
) -> dict[str, Tensor]:
    """The PGM's instance sample, drawn once: per class, up to ``max_images_per_class`` images
    with a box of that class wider and taller than ``min_size`` (original pixels, strict), and
    every such box of the class in those images.

    Args:
        dataset_dicts: detectron2 dataset dicts (the training set, in loader order).

    Returns:
        ``image`` (N,) int64 index into ``dataset_dicts``, ``cls`` (N,) int64 contiguous class,
        ``box`` (N, 4) float32 XYXY in original pixels; ordered by class, image, annotation.
    """
    per_class: list[dict[int, list[list[float]]]] = [{} for _ in range(num_classes)]
    for i, d in enumerate(dataset_dicts):
        for a in d.get("annotations", []):
            if a.get("iscrowd", 0):
                continue
            x1, y1, x2, y2 = BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS)
            if x2 - x1 > min_size and y2 - y1 > min_size:
                per_class[a["category_id"]].setdefault(i, []).append([x1, y1, x2, y2])
    rng = np.random.RandomState(seed)
    image, cls, box = [], [], []
    for c, by_image in enumerate(per_class):
        ids = sorted(by_image)
        if len(ids) > max_images_per_class:
            ids = sorted(rng.choice(ids, max_images_per_class, replace=False).tolist())
        for i in ids:
            for b in by_image[i]:
                image.append(i)
                cls.append(c)
                box.append(b)
    return {
        "image": torch.tensor(image, dtype=torch.long),
        "cls": torch.tensor(cls, dtype=torch.long),
        "box": torch.tensor(box, dtype=torch.float32).reshape(-1, 4),
    }


@torch.no_grad()
def extract_instance_features(
    forward: FeatureFn,
    batches: Iterable[Batch],
    instances: dict[str, Tensor],
    level_names: list[str],
    strides: list[int],
    label: str = "",
    num_images: int | None = None,
    autocast: bool = False,
) -> tuple[Tensor, list[Tensor]]:
    """Box-crop features of the sampled instances in the images of ``batches``.

    Each image is forwarded once, whatever the number of classes it holds.

    Args:
        forward: batch of input dicts -> (features by level name, ImageList).
        batches: lists of (dataset index, test-time input dict: "image", "height", "width"),
            e.g. :func:`~gkd_d2.engine.refresh_inputs.refresh_batches` (this rank's share).
        instances: the sample of :func:`sample_instances`.
        num_images: the images in ``batches``, for the progress log.
        autocast: run ``forward`` under CUDA autocast (fp16); the pooled sums stay fp32.

    Returns:
        ids: (n,) int64 row indices into ``instances`` of the instances covered;
        feats: per level, (n, C) float32 CPU tensors, rows in the order of ``ids``.
    """
    rows_of = rows_by_image(instances["image"])
    ids_out: list[Tensor] = []
    feats_out: list[list[Tensor]] = [[] for _ in level_names]
    start, last_log, done = time.perf_counter(), time.perf_counter(), 0
    for batch in batches:
        inputs = [inp for _, inp in batch]
        with torch.autocast("cuda", enabled=autocast):
            feats, images = forward(inputs)
        boxes, batch_idx, rows = [], [], []
        for j, (i, inp) in enumerate(batch):
            sel = rows_of[i]
            original = (inp["height"], inp["width"])
            boxes.append(boxes_in_input(instances["box"][sel], original, images.image_sizes[j]))
            batch_idx.append(torch.full((len(sel),), j, dtype=torch.long))
            rows.append(sel)
        device = feats[level_names[0]].device
        boxes_t, bidx = torch.cat(boxes).to(device), torch.cat(batch_idx).to(device)
        # every instance at every level
        for k, (name, stride) in enumerate(zip(level_names, strides)):
            feats_out[k].append(box_crop_mean(feats[name], boxes_t, bidx, stride).float().cpu())
        ids_out.append(torch.cat(rows))
        done += len(batch)
        if time.perf_counter() - last_log > 10:
            elapsed = time.perf_counter() - start
            total = f"/{num_images}" if num_images else ""
            eta = f", ETA {elapsed / done * (num_images - done):.0f}s" if num_images else ""
            logger.info(f"PGM {label}: {done}{total} images, {elapsed:.0f}s{eta}")
            last_log = time.perf_counter()
    if not ids_out:
        return torch.zeros(0, dtype=torch.long), [torch.zeros(0, 0) for _ in level_names]
    return torch.cat(ids_out), [torch.cat(f) for f in feats_out]


def gather_features(ids: Tensor, feats: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """All-gather every rank's instance features: (n,) rows and per level (n, C), rank-major."""
    parts = [p for p in comm.all_gather((ids, feats)) if len(p[0])]
    if not parts:
        return ids, feats
    return torch.cat([p[0] for p in parts]), [
        torch.cat([p[1][k] for p in parts]) for k in range(len(feats))
    ]


def selection_shares(sizes: list[int], world_size: int) -> list[int]:
    """The rank that solves each selection problem: longest first to the least-loaded rank
    (cost ~ N^2: the density matrices), ties by problem order, then lowest rank.

    Args:
        sizes: N of each problem.

    Returns:
        the rank of each problem.
    """
    load = [0] * world_size
    owner = [0] * len(sizes)
    for p in sorted(range(len(sizes)), key=lambda p: (-sizes[p], p)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[p] = r
        load[r] += sizes[p] ** 2
    return owner


def select_bank(
    feats_s: list[Tensor],
    feats_t: list[Tensor],
    classes: Tensor,
    num_classes: int,
    select: Callable[[Tensor, Tensor], Tensor],
    device: torch.device | str = "cpu",
) -> list[list[Tensor]]:
    """Prototype picks of every (class, level), each problem solved by one rank on ``device``
    and the picks all-gathered, so that every rank holds the same picks.

    Args:
        feats_s, feats_t: per level, (N, C_S) / (N, C_T) features of the whole sample.
        classes: (N,) int64 class of each instance.
        select: (feats_s, feats_t) of one class -> (m,) int64 picks among its rows.

    Returns:
        picks[c][level]: (m,) int64 CPU sample rows of the prototypes.
    """
    num_levels = len(feats_s)
    rows_of = [torch.nonzero(classes == c).flatten() for c in range(num_classes)]
    problems = [(c, lvl) for c in range(num_classes) for lvl in range(num_levels)]
    owner = selection_shares([len(rows_of[c]) for c, _ in problems], comm.get_world_size())
    mine = {}
    for p, (c, lvl) in enumerate(problems):
        if owner[p] != comm.get_rank():
            continue
        rows = rows_of[c]
        idx = select(feats_s[lvl][rows].to(device), feats_t[lvl][rows].to(device))
        mine[p] = rows[idx.cpu()]
    solved = {}
    for part in comm.all_gather(mine):
        solved.update(part)
    return [[solved[c * num_levels + lvl] for lvl in range(num_levels)] for c in range(num_classes)]


class SampleFeatures:
    """One model's features of the whole instance sample, filled in parts: ``levels`` (per
    level, (N, C) float32), ``have`` (N,) rows filled, ``current`` (N,) rows extracted in this
    refresh (with the model as it is now)."""

    def __init__(self, n: int):
        self.n = n
        self.levels: list[Tensor] | None = None
        self.have = torch.zeros(n, dtype=torch.bool)
        self.current = torch.zeros(n, dtype=torch.bool)

    def fill(self, ids: Tensor, feats: list[Tensor], current: bool = True) -> None:
        """Rows ``ids`` (m,) get ``feats`` (per level, (m, C))."""
        if self.levels is None:
            self.levels = [torch.zeros(self.n, f.shape[1]) for f in feats]
        for table, f in zip(self.levels, feats):
            table[ids] = f
        self.have[ids] = True
        self.current[ids] = current


class PrototypeRefresh(HookBase):
    """Refresh the prototype bank before iteration 0 and then every ``period`` iterations.

    The instance sample is drawn once and kept in the hook's checkpoint state. Images are read
    by loader workers (:func:`~gkd_d2.engine.refresh_inputs.refresh_batches`), sharded over
    ranks, and the features all-gathered; the (class, level) selections are shared out over
    the ranks, run on the model's device and their picks all-gathered, so every rank holds the
    same bank. The teacher's features are extracted once and cached in memory and in
    ``OUTPUT_DIR/gkd_teacher_features.pth`` (MODEL.GKD.TEACHER_CACHE), which a resumed run
    reads instead of a teacher pass.

    MODEL.GKD.REFRESH_MODE "full" (official) extracts the student's features of the whole
    sample at each refresh. "bank" takes them from the epoch's training forwards
    (:class:`~gkd_d2.engine.feature_harvest.FeatureHarvest`), extracts only the instances not
    harvested, selects, and re-extracts the picked instances with the current student, so the
    prototypes themselves are as in full mode. The harvest is merged over ranks before each
    checkpoint and saved with the hook's state: a resumed run continues it.

    The bank itself lives in the model (``distiller`` buffers), hence in every checkpoint; a
    resumed run skips the refresh that produced the bank it loaded. Each prototype's row in the
    instance sample goes to the bank too (``distiller.proto_index``), so that the checkpoint
    says which instances the prototypes are (``tools/visualize_prototypes.py`` draws them).

    Each refresh writes to the EventStorage (metrics.json, TensorBoard; not smoothed):
    ``gkd/refresh_seconds``, ``gkd/pgm_instances`` (the sample's size),
    ``gkd/pgm_classes_without_prototypes``, ``gkd/pgm_student_images`` and
    ``gkd/pgm_teacher_images`` (forwarded by this process), in bank mode
    ``gkd/pgm_harvested`` (the share of the sample's instances harvested) and
    ``gkd/pgm_unplaced_images`` (sampled training images not harvested: flipped ones unless
    MODEL.GKD.BANK_HARVEST_FLIPPED, or an augmentation the harvest cannot follow; extracted
    instead) and, per class
    (``thing_classes`` of the first training set, else the index), ``gkd/pgm_instances/<class>``
    (its instances in the sample) and ``gkd/pgm_picks/<class>`` (its distinct instances picked
    as prototypes, all levels).
    """

    def __init__(self, cfg, model: torch.nn.Module | None = None):
        self.cfg = cfg
        # the GKD student itself, not its DDP wrapper; None: the trainer's, at before_train
        self.model = model
        self.dataset_dicts = train_dataset_dicts(cfg)
        self.period = refresh_period(cfg)
        self.mode = cfg.MODEL.GKD.REFRESH_MODE
        if self.mode not in REFRESH_MODES:
            raise ValueError(
                f"MODEL.GKD.REFRESH_MODE must be one of {REFRESH_MODES}, not {self.mode!r}"
            )
        self.instances: dict[str, Tensor] | None = None
        self._teacher_features: list[Tensor] | None = None
        self.teacher_cache = TeacherFeatureCache(
            os.path.join(cfg.OUTPUT_DIR, FILE_NAME) if cfg.MODEL.GKD.TEACHER_CACHE else None
        )
        self.harvest: FeatureHarvest | None = None
        self._harvest_state: dict | None = None  # loaded before the harvest exists
        self._mapper = DatasetMapper(cfg, is_train=False)
        # per refresh, by this process: images forwarded by each model, harvested rows
        self.last_counts: dict[str, int] = {}

    def student(self) -> torch.nn.Module:
        """The GKD student: the one given, else the trainer's (unwrapped from DDP)."""
        if self.model is None:
            self.model = gkd_model_of(self.trainer)
        return self.model

    def forget_teacher_features(self) -> None:
        """Drop the in-memory teacher features: the next refresh reads the cache file, whose
        key is checked against the teacher as it is then, or extracts them again."""
        self._teacher_features = None

    def before_train(self) -> None:
        if self.instances is not None:  # a resumed run goes on harvesting
            self._install_harvest()

    def before_step(self) -> None:
        it = self.trainer.iter
        if it % self.period == 0 and int(self.student().distiller.bank_iter) != it:
            self.refresh(it)

    def after_step(self) -> None:
        # every rank's harvest into the one detectron2's PeriodicCheckpointer (a later hook)
        # saves from the main process, at the iterations it saves at
        if self.harvest is None:
            return
        it, period = self.trainer.iter, self.cfg.SOLVER.CHECKPOINT_PERIOD
        if (period > 0 and (it + 1) % period == 0) or it >= self.trainer.max_iter - 1:
            self.harvest.merge()

    def _install_harvest(self) -> None:
        if self.mode != "bank" or self.harvest is not None:
            return
        model = self.student()
        self.harvest = FeatureHarvest(
            self.instances,
            [d.get("file_name", str(i)) for i, d in enumerate(self.dataset_dicts)],
            list(model.distill_in_features),
            model.distiller.strides,
            self.cfg.MODEL.GKD.BANK_HARVEST_FLIPPED,
        )
        if self._harvest_state is not None:
            self.harvest.load_state_dict(self._harvest_state)
            self._harvest_state = None
        model.feature_harvest = self.harvest

    def _batches(self, shard: list[int]) -> Iterable[Batch]:
        """The images ``shard`` (dataset indices), loaded in batches."""
        cfg = self.cfg
        return refresh_batches(
            self.dataset_dicts,
            shard,
            self._mapper,
            cfg.MODEL.GKD.EXTRACT_BATCH_SIZE,
            cfg.DATALOADER.NUM_WORKERS,
            cfg.INPUT.MIN_SIZE_TEST,
            cfg.INPUT.MAX_SIZE_TEST,
            self.student().backbone.size_divisibility,
        )

    def _extract(self, forward: FeatureFn, images: list[int], label: str) -> tuple:
        """Features of the sampled instances in ``images``, from every rank (gathered)."""
        model = self.student()
        shard = images[comm.get_rank() :: comm.get_world_size()]
        key = f"{label}_images"
        self.last_counts[key] = self.last_counts.get(key, 0) + len(shard)
        ids, feats = extract_instance_features(
            forward,
            self._batches(shard),
            self.instances,
            list(model.distill_in_features),
            model.distiller.strides,
            label,
            len(shard),
            self._extract_autocast(),
        )
        return gather_features(ids, feats)

    def _extract_autocast(self) -> bool:
        """Whether the extraction runs under autocast: MODEL.GKD.EXTRACT_AMP, on CUDA only."""
        return bool(self.cfg.MODEL.GKD.EXTRACT_AMP) and self.student().device.type == "cuda"

    def _teacher_key(self) -> dict:
        model, cfg, inst = self.student(), self.cfg, self.instances
        first_images = torch.unique_consecutive(inst["image"]).tolist()
        return teacher_cache_key(
            model.require_teacher().model,
            inst,
            [str(self.dataset_dicts[i].get("file_name", i)) for i in first_images],
            {
                "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
                "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
                "format": cfg.INPUT.FORMAT,
            },
            list(model.distill_in_features),
            model.distiller.strides,
            self._extract_autocast(),
        )

    def teacher_features(self, images: list[int]) -> list[Tensor]:
        """The teacher's features of the whole sample: in memory, else from the cache file when
        every rank can read it with this run's key, else extracted (and the file written)."""
        if self._teacher_features is not None:
            return self._teacher_features
        n = len(self.instances["cls"])
        key = self._teacher_key()
        cached = self.teacher_cache.load(key)
        if all(comm.all_gather(cached is not None)):
            self._teacher_features = cached
            return cached
        ids, feats = self._extract(self.student().require_teacher().features, images, "teacher")
        if sorted(ids.tolist()) != list(range(n)):
            raise RuntimeError(f"PGM: gathered {len(ids)} teacher instance features, expected {n}")
        table = SampleFeatures(n)
        table.fill(ids, feats)
        if comm.is_main_process():
            self.teacher_cache.save(key, table.levels)
        self._teacher_features = table.levels
        return table.levels

    def _harvested_rows(self, bank_iter: int) -> tuple[Tensor, list[Tensor]] | None:
        """Bank mode: the rows every rank harvested since the refresh of the bank in use
        (merged: collective), or None."""
        if self.harvest is None:
            return None
        self.harvest.merge()
        rows, feats = self.harvest.rows()
        self.last_counts["unplaced"] = self.harvest.unplaced
        if self.harvest.since != bank_iter or len(rows) == 0:
            return None
        self.last_counts["harvested"] = len(rows)
        return rows, feats

    def refresh(self, iteration: int) -> None:
        g = self.cfg.MODEL.GKD
        model = self.student()
        distiller = model.distiller
        num_classes, num_levels = distiller.protos_s.shape[1], distiller.protos_s.shape[0]
        start = time.perf_counter()
        self.last_counts = {"student_images": 0, "teacher_images": 0, "harvested": 0}
        if self.instances is None:
            self.instances = sample_instances(
                self.dataset_dicts,
                num_classes,
                g.MIN_BOX_SIZE,
                g.MAX_IMAGES_PER_CLASS,
                g.SAMPLE_SEED,
            )
        self._install_harvest()
        inst = self.instances
        n = len(inst["cls"])
        if n == 0:
            logger.warning(
                f"PGM: no training box is larger than {g.MIN_BOX_SIZE} px: no prototypes, every "
                "instance gets r = 1 (unweighted knowledge)"
            )
            distiller.bank_iter.fill_(iteration)
            self._put_summaries(time.perf_counter() - start, [[] for _ in range(num_classes)])
            return
        images = sorted(set(inst["image"].tolist()))

        def student_forward(inputs):
            ims = model.preprocess_image(inputs)
            return model.backbone(ims.tensor), ims

        # the student's features of the whole sample: harvested rows (bank mode, since the
        # bank now in use), the rest extracted in the test pipeline
        student = SampleFeatures(n)
        harvested = self._harvested_rows(int(distiller.bank_iter))
        if harvested is not None:
            student.fill(*harvested, current=False)

        was_training = model.training
        model.eval()
        try:
            with preserved_rng():
                missing = sorted(set(inst["image"][~student.have].tolist()))
                if missing:
                    student.fill(*self._extract(student_forward, missing, "student"))
                feats_t = self.teacher_features(images)
                picked = select_bank(
                    student.levels,
                    feats_t,
                    inst["cls"],
                    num_classes,
                    lambda xs, xt: select_prototypes(
                        xs,
                        xt,
                        g.NUM_PROTOTYPES,
                        g.ALPHA,
                        g.DENSITY_KERNEL,
                        g.DENSITY_QUANTILE,
                        g.EXCLUDE_PICKED,
                    ),
                    model.device,
                )
                # the prototypes themselves from the current student (bank mode: the picks
                # came from harvested features up to a period old)
                rows = torch.cat([p for per_class in picked for p in per_class])
                stale = rows[~student.current[rows]]
                if len(stale):
                    again = sorted(set(inst["image"][stale].tolist()))
                    student.fill(*self._extract(student_forward, again, "student"))
        finally:
            model.train(was_training)
        device = distiller.protos_s.device
        for c in range(num_classes):
            for lvl in range(num_levels):
                picks = picked[c][lvl]
                distiller.set_bank(
                    lvl,
                    c,
                    student.levels[lvl][picks].to(device),
                    feats_t[lvl][picks].to(device),
                    index=picks,
                )
        distiller.bank_iter.fill_(iteration)
        if self.harvest is not None:
            self.harvest.reset(iteration)
        seconds = time.perf_counter() - start
        empty = [c for c in range(num_classes) if not bool((inst["cls"] == c).any())]
        if empty:
            logger.warning(
                f"PGM: classes {empty} have no instance larger than {g.MIN_BOX_SIZE} px: no "
                "prototypes, their instances get r = 1 (unweighted knowledge)"
            )
        counts = self.last_counts
        logger.info(
            f"PGM refresh at iteration {iteration} ({self.mode}): {n} instances in "
            f"{len(images)} images; this rank forwarded {counts['student_images']} images "
            f"through the student and {counts['teacher_images']} through the teacher"
            + (f", {counts['harvested']} instances harvested" if self.harvest else "")
            + f"; {seconds:.1f}s"
        )
        self._put_summaries(seconds, picked)

    def metric_class_names(self, num_classes: int) -> list[str]:
        """Metric-safe names of the training set's classes (``thing_classes``), else indices."""
        names = None
        if self.cfg.DATASETS.TRAIN:
            names = MetadataCatalog.get(self.cfg.DATASETS.TRAIN[0]).get("thing_classes", None)
        if names is None or len(names) != num_classes:
            return [str(c) for c in range(num_classes)]
        # a "/" would nest the metric one level deeper in TensorBoard; spaces read badly in tags
        return [re.sub(r"[\s/]+", "_", str(n)) for n in names]

    def _put_summaries(self, seconds: float, picked: list[list[Tensor]]) -> None:
        """Write a refresh's summaries to the EventStorage (metrics.json, TensorBoard).

        Args:
            seconds: the refresh's wall time.
            picked: per class, per level, the (m,) sample rows picked as prototypes.
        """
        inst = self.instances
        num_classes = len(picked)
        per_class = torch.bincount(inst["cls"], minlength=num_classes).tolist()
        scalars = {
            "gkd/refresh_seconds": seconds,
            "gkd/pgm_instances": float(len(inst["cls"])),
            # a class without prototypes trains with r = 1 for all its instances
            "gkd/pgm_classes_without_prototypes": float(
                sum(1 for p in picked if sum(len(x) for x in p) == 0)
            ),
            "gkd/pgm_student_images": float(self.last_counts.get("student_images", 0)),
            "gkd/pgm_teacher_images": float(self.last_counts.get("teacher_images", 0)),
        }
        if self.harvest is not None and len(inst["cls"]):
            scalars["gkd/pgm_harvested"] = self.last_counts.get("harvested", 0) / len(inst["cls"])
            # sampled training images not harvested (flipped ones unless BANK_HARVEST_FLIPPED,
            # an augmentation the harvest cannot follow such as a crop): the refresh extracts them
            scalars["gkd/pgm_unplaced_images"] = float(self.last_counts.get("unplaced", 0))
        for c, name in enumerate(self.metric_class_names(num_classes)):
            scalars[f"gkd/pgm_instances/{name}"] = float(per_class[c])
            # distinct instances over all levels: one instance often represents several
            distinct = torch.unique(torch.cat(picked[c])) if picked[c] else []
            scalars[f"gkd/pgm_picks/{name}"] = float(len(distinct))
        self.trainer.storage.put_scalars(**scalars, smoothing_hint=False)

    def state_dict(self) -> dict:
        ret = {} if self.instances is None else {"instances": self.instances}
        if self.harvest is not None:  # merged over ranks in after_step, before the save
            ret["harvest"] = self.harvest.state_dict()
        return ret

    def load_state_dict(self, state_dict: dict) -> None:
        if "instances" in state_dict:
            self.instances = state_dict["instances"]
        if "harvest" in state_dict:
            if self.harvest is not None:
                self.harvest.load_state_dict(state_dict["harvest"])
            else:
                self._harvest_state = state_dict["harvest"]
