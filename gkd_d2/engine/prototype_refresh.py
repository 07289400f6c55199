"""PGM in training: the fixed instance sample, feature extraction, and the refresh hook.

As the official code's PGM hook (hikvision-research/DAVAR-Lab-ML, ECCV22 GKD project,
pgm_hook.py and prototype_generation_module.py): a separate eval-mode pass in the test pipeline,
no flip, a fixed sample of up to MAX_IMAGES_PER_CLASS images per class drawn once (seed 1).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

import numpy as np
import torch
from detectron2.data import DatasetMapper, MetadataCatalog
from detectron2.engine import HookBase
from detectron2.structures import BoxMode, ImageList
from detectron2.utils import comm
from torch import Tensor

from ..distill import box_crop_mean, select_prototypes
from .rng import preserved_rng
from .schedule import refresh_period, train_dataset_dicts

logger = logging.getLogger(__name__)

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
    inputs_of: Callable[[int], dict],
    instances: dict[str, Tensor],
    image_ids: list[int],
    level_names: list[str],
    strides: list[int],
    batch_size: int = 1,
    label: str = "",
) -> tuple[Tensor, list[Tensor]]:
    """Box-crop features of the sampled instances that lie in ``image_ids``.

    Each image is forwarded once, whatever the number of classes it holds.

    Args:
        forward: batch of input dicts -> (features by level name, ImageList).
        inputs_of: dataset index -> detectron2 input dict (test-time mapper: "image", "height",
            "width").
        instances: the sample of :func:`sample_instances`.
        image_ids: dataset indices of the images to process (this rank's shard).

    Returns:
        ids: (n,) int64 row indices into ``instances`` of the instances covered;
        feats: per level, (n, C) float32 CPU tensors, rows in the order of ``ids``.
    """
    # rows of each image, grouped once (a scan of all instances per image is O(images x N))
    order = torch.argsort(instances["image"], stable=True)
    images_sorted, counts = torch.unique_consecutive(instances["image"][order], return_counts=True)
    rows_of = dict(zip(images_sorted.tolist(), order.split(counts.tolist())))
    ids_out: list[Tensor] = []
    feats_out: list[list[Tensor]] = [[] for _ in level_names]
    start, last_log = time.perf_counter(), time.perf_counter()
    for b0 in range(0, len(image_ids), batch_size):
        chunk = image_ids[b0 : b0 + batch_size]
        inputs = [inputs_of(i) for i in chunk]
        feats, images = forward(inputs)
        boxes, batch_idx, rows = [], [], []
        for j, (i, inp) in enumerate(zip(chunk, inputs)):
            sel = rows_of[i]
            h, w = images.image_sizes[j]
            scale = torch.tensor([w / inp["width"], h / inp["height"]] * 2)
            boxes.append(instances["box"][sel] * scale)
            batch_idx.append(torch.full((len(sel),), j, dtype=torch.long))
            rows.append(sel)
        device = feats[level_names[0]].device
        boxes_t, bidx = torch.cat(boxes).to(device), torch.cat(batch_idx).to(device)
        # every instance at every level
        for k, (name, stride) in enumerate(zip(level_names, strides)):
            feats_out[k].append(box_crop_mean(feats[name], boxes_t, bidx, stride).float().cpu())
        ids_out.append(torch.cat(rows))
        done = b0 + len(chunk)
        if time.perf_counter() - last_log > 10 or done == len(image_ids):
            elapsed = time.perf_counter() - start
            eta = elapsed / done * (len(image_ids) - done)
            logger.info(
                f"PGM {label}: {done}/{len(image_ids)} images, {elapsed:.0f}s, ETA {eta:.0f}s"
            )
            last_log = time.perf_counter()
    if not ids_out:
        return torch.zeros(0, dtype=torch.long), [torch.zeros(0, 0) for _ in level_names]
    return torch.cat(ids_out), [torch.cat(f) for f in feats_out]


def gather_features(ids: Tensor, feats: list[Tensor], total: int) -> list[Tensor]:
    """All-gather every rank's instance features; (total, C) per level in instance order."""
    parts = comm.all_gather((ids, feats))
    all_ids = torch.cat([p[0] for p in parts])
    out = []
    for k in range(len(feats)):
        rows = torch.cat([p[1][k] for p in parts if len(p[0])])
        full = torch.zeros(total, rows.shape[1])
        full[all_ids] = rows
        out.append(full)
    if sorted(all_ids.tolist()) != list(range(total)):
        raise RuntimeError(f"PGM: gathered {len(all_ids)} instance features, expected {total}")
    return out


class PrototypeRefresh(HookBase):
    """Refresh the prototype bank before iteration 0 and then every ``period`` iterations.

    The instance sample is drawn once and kept in the hook's checkpoint state; the teacher
    features are extracted once per process and cached; images are sharded over ranks and the
    features all-gathered, so every rank selects the same bank. The bank itself lives in the
    model (``distiller`` buffers), hence in every checkpoint; a resumed run skips the refresh
    that produced the bank it loaded. Each prototype's row in the instance sample goes to the
    bank too (``distiller.proto_index``), so that the checkpoint says which instances the
    prototypes are (``tools/visualize_prototypes.py`` draws them).

    Each refresh writes to the EventStorage (metrics.json, TensorBoard; not smoothed):
    ``gkd/refresh_seconds``, ``gkd/pgm_instances`` (the sample's size),
    ``gkd/pgm_classes_without_prototypes`` and, per class (``thing_classes`` of the first
    training set, else the index), ``gkd/pgm_instances/<class>`` (its instances in the sample)
    and ``gkd/pgm_picks/<class>`` (its distinct instances picked as prototypes, all levels).
    """

    def __init__(self, cfg, model: torch.nn.Module | None = None):
        self.cfg = cfg
        # the GKD student itself, not its DDP wrapper; None: the trainer's, at before_train
        self.model = model
        self.dataset_dicts = train_dataset_dicts(cfg)
        self.period = refresh_period(cfg)
        self.instances: dict[str, Tensor] | None = None
        self._teacher_cache: list[Tensor] | None = None
        self._mapper = DatasetMapper(cfg, is_train=False)
        self.images_forwarded = 0  # per refresh, by this process (both models counted once)

    def _inputs_of(self, index: int) -> dict:
        return self._mapper(dict(self.dataset_dicts[index]))

    def student(self) -> torch.nn.Module:
        """The GKD student: the one given, else the trainer's (unwrapped from DDP)."""
        if self.model is None:
            from .hooks import gkd_model_of

            self.model = gkd_model_of(self.trainer)
        return self.model

    def before_train(self) -> None:
        self.student().prepare_distillation()

    def before_step(self) -> None:
        it = self.trainer.iter
        if it % self.period == 0 and int(self.student().distiller.bank_iter) != it:
            self.refresh(it)

    def refresh(self, iteration: int) -> None:
        g = self.cfg.MODEL.GKD
        model = self.student()
        distiller = model.distiller
        num_classes, num_levels = distiller.protos_s.shape[1], distiller.protos_s.shape[0]
        start = time.perf_counter()
        if self.instances is None:
            self.instances = sample_instances(
                self.dataset_dicts,
                num_classes,
                g.MIN_BOX_SIZE,
                g.MAX_IMAGES_PER_CLASS,
                g.SAMPLE_SEED,
            )
        inst = self.instances
        if len(inst["cls"]) == 0:
            logger.warning(
                f"PGM: no training box is larger than {g.MIN_BOX_SIZE} px: no prototypes, every "
                "instance gets r = 1 (unweighted knowledge)"
            )
            distiller.bank_iter.fill_(iteration)
            self._put_summaries(time.perf_counter() - start, [[] for _ in range(num_classes)])
            return
        images = sorted(set(inst["image"].tolist()))
        shard = images[comm.get_rank() :: comm.get_world_size()]
        names = list(model.distill_in_features)
        strides = distiller.strides

        def student_forward(inputs):
            ims = model.preprocess_image(inputs)
            return model.backbone(ims.tensor), ims

        was_training = model.training
        model.eval()
        try:
            with preserved_rng():
                ids, feats_s = extract_instance_features(
                    student_forward,
                    self._inputs_of,
                    inst,
                    shard,
                    names,
                    strides,
                    g.EXTRACT_BATCH_SIZE,
                    "student",
                )
                if self._teacher_cache is None:
                    teacher = model.teacher
                    tid, feats_t = extract_instance_features(
                        teacher.features,
                        self._inputs_of,
                        inst,
                        shard,
                        names,
                        strides,
                        g.EXTRACT_BATCH_SIZE,
                        "teacher",
                    )
                    self._teacher_cache = gather_features(tid, feats_t, len(inst["cls"]))
        finally:
            model.train(was_training)
        self.images_forwarded = len(shard)
        feats_s = gather_features(ids, feats_s, len(inst["cls"]))
        feats_t = self._teacher_cache

        empty = []
        picked: list[list[Tensor]] = [[] for _ in range(num_classes)]  # per class, per level
        for c in range(num_classes):
            rows = torch.nonzero(inst["cls"] == c).flatten()
            if len(rows) == 0:
                empty.append(c)
            for lvl in range(num_levels):
                picks = rows[
                    select_prototypes(
                        feats_s[lvl][rows],
                        feats_t[lvl][rows],
                        g.NUM_PROTOTYPES,
                        g.ALPHA,
                        g.DENSITY_KERNEL,
                        g.DENSITY_QUANTILE,
                        g.EXCLUDE_PICKED,
                    )
                ]
                device = distiller.protos_s.device
                distiller.set_bank(
                    lvl,
                    c,
                    feats_s[lvl][picks].to(device),
                    feats_t[lvl][picks].to(device),
                    index=picks,
                )
                picked[c].append(picks)
        distiller.bank_iter.fill_(iteration)
        seconds = time.perf_counter() - start
        if empty:
            logger.warning(
                f"PGM: classes {empty} have no instance larger than {g.MIN_BOX_SIZE} px: no "
                "prototypes, their instances get r = 1 (unweighted knowledge)"
            )
        logger.info(
            f"PGM refresh at iteration {iteration}: {len(inst['cls'])} instances in {len(images)} "
            f"images ({len(shard)} on this rank), {seconds:.1f}s"
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
        }
        for c, name in enumerate(self.metric_class_names(num_classes)):
            scalars[f"gkd/pgm_instances/{name}"] = float(per_class[c])
            # distinct instances over all levels: one instance often represents several
            distinct = torch.unique(torch.cat(picked[c])) if picked[c] else []
            scalars[f"gkd/pgm_picks/{name}"] = float(len(distinct))
        self.trainer.storage.put_scalars(**scalars, smoothing_hint=False)

    def state_dict(self) -> dict:
        return {} if self.instances is None else {"instances": self.instances}

    def load_state_dict(self, state_dict: dict) -> None:
        if "instances" in state_dict:
            self.instances = state_dict["instances"]
