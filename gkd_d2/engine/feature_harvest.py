"""Bank mode (MODEL.GKD.REFRESH_MODE "bank"): the student's features of the PGM sample, taken
from the training forwards of an epoch instead of a separate pass over the sample, and, with
MODEL.GKD.BANK_TEACHER_ROWS "training_forward", the teacher's of the same forwards.

When a training batch holds an image of the fixed sample, each of its sampled boxes is pooled
at every distilled level with the pooling r uses (``box_crop_mean``) on the features r is
computed from (the training forward's, or the eval-mode descriptor pass's with train-mode BN).
The box is placed by the batch's own resize and horizontal flip: as the training mapper
recorded them (``TransformRecordingMapper``'s ``"applied_transforms"``), or else read off the
image's ground truth. An image that cannot be placed (another augmentation, e.g. a crop), a
flipped one when flipped inputs are not harvested, or, when the teacher's rows come from the
test pipeline, one whose input size is not the test-time size (its student row would not pair
with the teacher's), is left to the refresh, which extracts it as in full mode. Each rank
harvests its own batches; the rows are merged over ranks (latest iteration first, then lowest
rank) before a checkpoint and at the refresh, so that every rank, and a resumed run, holds the
same harvest.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from detectron2.data import transforms as T
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import Tensor

from ..distill import box_crop_mean
from .training_inputs import placed_boxes, placed_by_transforms


def latest_rows(rows: Tensor, iters: Tensor) -> Tensor:
    """Positions of each distinct row's latest entry (the first such entry on equal
    iterations), in ascending row order.

    Args:
        rows, iters: (E,) int64 sample row and harvest iteration of each entry.
    """
    if len(rows) == 0:
        return torch.zeros(0, dtype=torch.long)
    # stable sorts, least significant key first: position, then latest iteration, then row
    order = torch.arange(len(rows))
    order = order[torch.argsort(-iters[order], stable=True)]
    order = order[torch.argsort(rows[order], stable=True)]
    first = torch.ones(len(order), dtype=torch.bool)
    first[1:] = rows[order][1:] != rows[order][:-1]
    return order[first]


def rows_by_image(image: Tensor) -> dict[int, Tensor]:
    """The sample's rows of each image, grouped once (a scan of all instances per image would
    be O(images x N)).

    Args:
        image: (N,) int64 dataset index of each sampled instance.

    Returns:
        dataset index -> (n_i,) int64 rows, in sample order.
    """
    order = torch.argsort(image, stable=True)
    images, counts = torch.unique_consecutive(image[order], return_counts=True)
    return dict(zip(images.tolist(), order.split(counts.tolist())))


def per_level_cat(parts: list[tuple], field: int) -> list[Tensor]:
    """Per level, the ``field``-th entry of every part (a list of per-level tensors, empty
    when nothing was pooled for it) concatenated over the parts."""
    return [torch.cat([p[field][k] for p in parts]) for k in range(len(parts[0][field]))]


class FeatureHarvest:
    """The student's (and optionally the teacher's) box-crop features of the sample's
    instances, from training forwards.

    Call it (the model does, through ``DistilledDetector.feature_harvest``) with each training
    forward's inputs, the features r is computed from, the inputs' image sizes and, when
    ``teacher_rows``, the teacher's features of the same forward.

    Args:
        instances: the PGM sample (``sample_instances``).
        file_names: per dataset index, the image's ``file_name`` (how a training input is
            found in the sample).
        level_names, strides: the distilled levels.
        harvest_flipped: also harvest horizontally flipped inputs (their features are not the
            unflipped image's: bank mode's picks then move further from full mode's).
        test_size: (H, W) original -> (H, W) of its test-time input; given, an input of
            another size is not harvested (its teacher row comes from the test pipeline).
        teacher_rows: also pool the teacher's features of the same forward, so that both rows
            of an instance see the same input.
    """

    def __init__(
        self,
        instances: dict[str, Tensor],
        file_names: list[str],
        level_names: list[str],
        strides: list[int],
        harvest_flipped: bool = True,
        test_size: Callable[[int, int], tuple[int, int]] | None = None,
        teacher_rows: bool = False,
    ):
        self.instances = instances
        self.harvest_flipped = harvest_flipped
        self.test_size, self.teacher_rows = test_size, teacher_rows
        self.level_names, self.strides = list(level_names), list(strides)
        self.rows_of = {
            file_names[i]: rows for i, rows in rows_by_image(instances["image"]).items()
        }
        # the refresh this harvest follows; sampled images seen whose boxes could not be placed
        self.reset(-1)

    @classmethod
    def of_model(
        cls,
        model: torch.nn.Module,
        instances: dict[str, Tensor],
        dataset_dicts: list[dict],
        cfg,
    ) -> FeatureHarvest:
        """The harvest of a GKD student's distilled levels, for the sample ``instances`` of the
        training set ``dataset_dicts``, as MODEL.GKD.BANK_* says."""
        g, short, longest = cfg.MODEL.GKD, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST
        teacher_rows = g.BANK_TEACHER_ROWS == "training_forward"

        def test_size(h: int, w: int) -> tuple[int, int]:
            return T.ResizeShortestEdge.get_output_shape(h, w, short, longest) if short else (h, w)

        return cls(
            instances,
            [d.get("file_name", str(i)) for i, d in enumerate(dataset_dicts)],
            list(model.distill_in_features),
            model.distiller.strides,
            g.BANK_HARVEST_FLIPPED,
            None if teacher_rows else test_size,
            teacher_rows,
        )

    def reset(self, since: int) -> None:
        """Start a new harvest after the refresh at iteration ``since``."""
        self.since = since
        self.unplaced = 0  # merged over ranks
        self._unplaced_local = 0  # this rank's, since the last merge
        self.merged = self._empty()
        self.local: list[tuple[Tensor, Tensor, list[Tensor], list[Tensor]]] = []

    def _empty(self) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
        """(rows, iterations, student features per level, teacher features per level; the
        latter empty when the teacher's rows are not harvested)."""
        z = torch.zeros(0, dtype=torch.long)
        teacher = [torch.zeros(0, 0) for _ in self.level_names] if self.teacher_rows else []
        return z, z.clone(), [torch.zeros(0, 0) for _ in self.level_names], teacher

    def placed(self, x: dict, image_size: tuple[int, int]) -> Tensor | None:
        """The sampled boxes of training input ``x`` (a sampled image) as they lie in it, or
        None when it is left to the refresh's extraction."""
        sel = self.rows_of[x["file_name"]]
        h, w = image_size
        original = (x.get("height", h), x.get("width", w))
        if self.test_size is not None and tuple(self.test_size(*original)) != (h, w):
            return None  # another scale than the teacher's test-pipeline row
        if "applied_transforms" in x:
            return placed_by_transforms(
                self.instances["box"][sel],
                original,
                (h, w),
                x["applied_transforms"],
                self.harvest_flipped,
            )
        gt = x["instances"].gt_boxes.tensor if "instances" in x else torch.zeros(0, 4)
        return placed_boxes(self.instances["box"][sel], original, (h, w), gt, self.harvest_flipped)

    @torch.no_grad()
    def __call__(
        self,
        batched_inputs: list[dict],
        features: dict[str, Tensor],
        image_sizes: list[tuple[int, int]],
        teacher_features: dict[str, Tensor] | None = None,
    ) -> None:
        """Pool the sampled boxes of a training forward's sampled images.

        Args:
            batched_inputs: the forward's inputs (dataset dicts after the mapper).
            features: level name -> (B, C_S, H, W) the features r is computed from.
            image_sizes: (H, W) of each input, unpadded.
            teacher_features: level name -> (B, C_T, H', W') the teacher's features of the same
                inputs; needed when the teacher's rows are harvested.
        """
        if self.teacher_rows and teacher_features is None:
            raise ValueError(
                "MODEL.GKD.BANK_TEACHER_ROWS 'training_forward' harvests the teacher's features "
                "of the training forward, but the model handed none to the harvest"
            )
        boxes, batch_idx, rows = [], [], []
        for j, x in enumerate(batched_inputs):
            if x.get("file_name") not in self.rows_of:
                continue
            placed = self.placed(x, image_sizes[j])
            if placed is None:
                self._unplaced_local += 1
                continue
            sel = self.rows_of[x["file_name"]]
            boxes.append(placed)
            batch_idx.append(torch.full((len(sel),), j, dtype=torch.long))
            rows.append(sel)
        if not rows:
            return
        device = features[self.level_names[0]].device
        boxes_t, bidx = torch.cat(boxes).to(device), torch.cat(batch_idx).to(device)

        # kept on the device until merged: no host synchronisation in the step
        def pooled(maps: dict[str, Tensor]) -> list[Tensor]:
            return [
                box_crop_mean(maps[n].detach(), boxes_t, bidx, s).float()
                for n, s in zip(self.level_names, self.strides)
            ]

        teacher = pooled(teacher_features) if self.teacher_rows else []
        rows_t = torch.cat(rows)
        iters = torch.full_like(rows_t, get_event_storage().iter)
        self.local.append((rows_t, iters, pooled(features), teacher))

    def merge(self) -> None:
        """Merge every rank's new rows into the harvest all ranks hold (collective)."""
        if self.local:
            rows = torch.cat([part[0].cpu() for part in self.local])
            iters = torch.cat([part[1].cpu() for part in self.local])
            feats = [f.cpu() for f in per_level_cat(self.local, 2)]
            teacher = [f.cpu() for f in per_level_cat(self.local, 3)]
        else:
            rows, iters, feats, teacher = self._empty()
        self.local = []
        parts = comm.all_gather((rows, iters, feats, teacher, self._unplaced_local))
        self.unplaced += sum(p[4] for p in parts)
        self._unplaced_local = 0
        parts = [self.merged] + [p[:4] for p in parts]
        parts = [p for p in parts if len(p[0])]
        if not parts:
            return
        rows = torch.cat([p[0] for p in parts])
        iters = torch.cat([p[1] for p in parts])
        keep = latest_rows(rows, iters)
        feats = [f[keep] for f in per_level_cat(parts, 2)]
        teacher = [f[keep] for f in per_level_cat(parts, 3)]
        self.merged = (rows[keep], iters[keep], feats, teacher)

    def rows(self) -> tuple[Tensor, list[Tensor]]:
        """The merged harvest: (n,) sample rows and per level their (n, C_S) features."""
        return self.merged[0], self.merged[2]

    def teacher_rows_of(self) -> list[Tensor]:
        """Per level the (n, C_T) teacher features of :meth:`rows`' rows (``teacher_rows``)."""
        return self.merged[3]

    def state_dict(self) -> dict:
        """The merged part (call :meth:`merge` first on all ranks to include everything)."""
        rows, iters, feats, teacher = self.merged
        state = {"since": self.since, "rows": rows, "iters": iters, "features": feats}
        if self.teacher_rows:
            state["teacher_features"] = teacher
        return state

    def load_state_dict(self, state: dict) -> None:
        self.reset(int(state["since"]))
        teacher = list(state.get("teacher_features", []))
        if self.teacher_rows and len(teacher) != len(self.level_names):
            # a harvest saved without the teacher's rows cannot pair them: start over
            return
        self.merged = (state["rows"], state["iters"], list(state["features"]), teacher)
