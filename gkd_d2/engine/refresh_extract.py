"""The refresh's features of the instance sample: box-crop features of the sampled instances in
this rank's images through the test pipeline, gathered from every rank, and the table they fill.

As the official PGM hook (pgm_hook.py): a separate eval-mode pass in the test pipeline, no flip;
here each image is forwarded once per refresh (not once per class it holds), the images
sharded over ranks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator

import torch
from detectron2.config import CfgNode
from detectron2.structures import ImageList
from detectron2.utils import comm
from torch import Tensor, nn

from ..distill import box_crop_mean
from .feature_harvest import rows_by_image
from .refresh_inputs import Batch, refresh_batches
from .teacher_cache import TeacherFeatureCache, teacher_cache_key
from .training_inputs import boxes_in_input

logger = logging.getLogger(__name__)

# A forward of a batch of detectron2 input dicts to (FPN features by name, their ImageList).
FeatureFn = Callable[[list[dict]], tuple[dict[str, Tensor], ImageList]]


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the context, in its own mode again after it."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


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


@dataclasses.dataclass
class SampleExtraction:
    """The features of the instance sample through the test pipeline as a config says it when
    the refresh runs (test-time mapper and resize, loader workers, EXTRACT_BATCH_SIZE, CUDA
    autocast with EXTRACT_AMP), each rank extracting its share of the images."""

    cfg: CfgNode
    model: nn.Module  # the GKD student: its levels, strides, size divisibility and device
    dataset_dicts: list[dict]
    mapper: Callable[[dict], dict]
    instances: dict[str, Tensor]  # the sample
    counts: dict[str, int]  # "<label>_images" forwarded by this process, added to

    @property
    def autocast(self) -> bool:
        """Whether the extraction runs under autocast: MODEL.GKD.EXTRACT_AMP, on CUDA only."""
        return bool(self.cfg.MODEL.GKD.EXTRACT_AMP) and self.model.device.type == "cuda"

    def batches(self, shard: list[int]) -> Iterable[Batch]:
        """The images ``shard`` (dataset indices), loaded in batches."""
        cfg = self.cfg
        return refresh_batches(
            self.dataset_dicts,
            shard,
            self.mapper,
            cfg.MODEL.GKD.EXTRACT_BATCH_SIZE,
            cfg.DATALOADER.NUM_WORKERS,
            cfg.INPUT.MIN_SIZE_TEST,
            cfg.INPUT.MAX_SIZE_TEST,
            self.model.backbone.size_divisibility,
        )

    def gather(self, forward: FeatureFn, images: list[int], label: str) -> tuple:
        """This rank's share of ``images`` extracted, every rank's all-gathered: the
        instances' ``(ids, feats)`` of :func:`extract_instance_features`."""
        shard = images[comm.get_rank() :: comm.get_world_size()]
        key = f"{label}_images"
        self.counts[key] = self.counts.get(key, 0) + len(shard)
        ids, feats = extract_instance_features(
            forward,
            self.batches(shard),
            self.instances,
            list(self.model.distill_in_features),
            self.model.distiller.strides,
            label,
            len(shard),
            self.autocast,
        )
        return gather_features(ids, feats)

    def gather_teacher(self, teacher, images: list[int], cache: TeacherFeatureCache) -> list:
        """The teacher's (a ``FrozenTeacher``) features of the whole sample, per level (N, C):
        from ``cache`` when every rank can read it with this extraction's key (all-gathered),
        else extracted from ``images`` and gathered (and the file written)."""
        n = len(self.instances["cls"])
        key = self.teacher_cache_key(teacher.model)
        cached = cache.load(key)
        if all(comm.all_gather(cached is not None)):
            return cached
        ids, feats = self.gather(teacher.features, images, "teacher")
        if sorted(ids.tolist()) != list(range(n)):
            raise RuntimeError(f"PGM: gathered {len(ids)} teacher instance features, expected {n}")
        table = SampleFeatures(n)
        table.fill(ids, feats)
        if comm.is_main_process():
            cache.save(key, table.levels)
        return table.levels

    def teacher_cache_key(self, teacher_model: nn.Module) -> dict:
        """What the teacher's features of the sample extracted here depend on
        (:func:`~gkd_d2.engine.teacher_cache.teacher_cache_key`)."""
        cfg, model, inst = self.cfg, self.model, self.instances
        first_images = torch.unique_consecutive(inst["image"]).tolist()
        return teacher_cache_key(
            teacher_model,
            inst,
            [str(self.dataset_dicts[i].get("file_name", i)) for i in first_images],
            {
                "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
                "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
                "format": cfg.INPUT.FORMAT,
            },
            list(model.distill_in_features),
            model.distiller.strides,
            self.autocast,
        )
