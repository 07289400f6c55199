"""Bank mode (MODEL.GKD.REFRESH_MODE "bank"): the student's features of the PGM sample, taken
from the training forwards of an epoch instead of a separate pass over the sample.

When a training batch holds an image of the fixed sample, each of its sampled boxes is pooled
at every distilled level with the pooling r uses (``box_crop_mean``) on the features r is
computed from (the training forward's, or the eval-mode descriptor pass's with train-mode BN).
The box is placed by the batch's own resize and horizontal flip, read off the image's ground
truth; an image whose ground truth matches neither (another augmentation, e.g. a crop), or a
flipped one when flipped inputs are not harvested, is left to the refresh, which extracts it as
in full mode. Each rank harvests its own batches; the
rows are merged over ranks (latest iteration first, then lowest rank) before a checkpoint and
at the refresh, so that every rank, and a resumed run, holds the same harvest.
"""

from __future__ import annotations

import torch
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage
from torch import Tensor

from ..distill import box_crop_mean

# ground-truth and sampled boxes agree to float rounding; a wrong transform is pixels off
MATCH_TOLERANCE_PX = 0.5


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


def boxes_in_input(
    boxes: Tensor, original_size: tuple[int, int], image_size: tuple[int, int]
) -> Tensor:
    """(n, 4) XYXY boxes of an original (H, W) image scaled to its resized input's (H, W), as
    the test-time resize places them: one computation for the refresh and the harvest, so that
    a harvested box is the extracted one to the bit."""
    (h0, w0), (h, w) = original_size, image_size
    return boxes * torch.tensor([w / w0, h / h0] * 2)


def placed_boxes(
    boxes: Tensor,
    original_size: tuple[int, int],
    image_size: tuple[int, int],
    gt: Tensor,
    allow_flip: bool = True,
) -> Tensor | None:
    """The sampled boxes of one image as they lie in its training input, or None.

    The test-time placement scales by the input's size over the original (as the refresh
    does); the training input may also be flipped horizontally. The placement under which
    every box equals a ground-truth box (clipped to the image) is returned, unclipped, as the
    refresh pools it; None when neither fits.

    Args:
        boxes: (n, 4) XYXY in original pixels.
        original_size, image_size: (H, W) of the original image and of the input (unpadded).
        gt: (G, 4) the input's ground-truth boxes.
        allow_flip: False: a flipped input gives None.
    """
    h, w = image_size
    scaled = boxes_in_input(boxes, original_size, image_size)
    flipped = torch.stack([w - scaled[:, 2], scaled[:, 1], w - scaled[:, 0], scaled[:, 3]], 1)
    limit = torch.tensor([w, h, w, h], dtype=scaled.dtype)
    for placed in (scaled, flipped) if allow_flip else (scaled,):
        clipped = torch.minimum(placed.clamp(min=0), limit)
        if len(gt) and bool(
            ((clipped[:, None, :] - gt[None].to(clipped)).abs().amax(2) < MATCH_TOLERANCE_PX)
            .any(1)
            .all()
        ):
            return placed
    return None


class FeatureHarvest:
    """The student's box-crop features of the sample's instances, from training forwards.

    Call it (the model does, through ``DistilledDetector.feature_harvest``) with each training
    forward's inputs, the features r is computed from, and the inputs' image sizes.

    Args:
        instances: the PGM sample (``sample_instances``).
        file_names: per dataset index, the image's ``file_name`` (how a training input is
            found in the sample).
        level_names, strides: the distilled levels.
        harvest_flipped: also harvest horizontally flipped inputs (their features are not the
            unflipped image's: bank mode's picks then move further from full mode's).
    """

    def __init__(
        self,
        instances: dict[str, Tensor],
        file_names: list[str],
        level_names: list[str],
        strides: list[int],
        harvest_flipped: bool = True,
    ):
        self.instances = instances
        self.harvest_flipped = harvest_flipped
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
        harvest_flipped: bool = True,
    ) -> FeatureHarvest:
        """The harvest of a GKD student's distilled levels, for the sample ``instances`` of the
        training set ``dataset_dicts``."""
        return cls(
            instances,
            [d.get("file_name", str(i)) for i, d in enumerate(dataset_dicts)],
            list(model.distill_in_features),
            model.distiller.strides,
            harvest_flipped,
        )

    def reset(self, since: int) -> None:
        """Start a new harvest after the refresh at iteration ``since``."""
        self.since = since
        self.unplaced = 0  # merged over ranks
        self._unplaced_local = 0  # this rank's, since the last merge
        self.merged: tuple[Tensor, Tensor, list[Tensor]] = self._empty()
        self.local: list[tuple[Tensor, Tensor, list[Tensor]]] = []

    def _empty(self) -> tuple[Tensor, Tensor, list[Tensor]]:
        z = torch.zeros(0, dtype=torch.long)
        return z, z.clone(), [torch.zeros(0, 0) for _ in self.level_names]

    @torch.no_grad()
    def __call__(
        self,
        batched_inputs: list[dict],
        features: dict[str, Tensor],
        image_sizes: list[tuple[int, int]],
    ) -> None:
        boxes, batch_idx, rows = [], [], []
        for j, x in enumerate(batched_inputs):
            sel = self.rows_of.get(x.get("file_name"))
            if sel is None:
                continue
            gt = x["instances"].gt_boxes.tensor if "instances" in x else torch.zeros(0, 4)
            h, w = image_sizes[j]
            placed = placed_boxes(
                self.instances["box"][sel],
                (x.get("height", h), x.get("width", w)),
                (h, w),
                gt,
                self.harvest_flipped,
            )
            if placed is None:
                self._unplaced_local += 1
                continue
            boxes.append(placed)
            batch_idx.append(torch.full((len(sel),), j, dtype=torch.long))
            rows.append(sel)
        if not rows:
            return
        device = features[self.level_names[0]].device
        boxes_t, bidx = torch.cat(boxes).to(device), torch.cat(batch_idx).to(device)
        # kept on the device until merged: no host synchronisation in the step
        feats = [
            box_crop_mean(features[n].detach(), boxes_t, bidx, s).float()
            for n, s in zip(self.level_names, self.strides)
        ]
        rows_t = torch.cat(rows)
        iters = torch.full_like(rows_t, get_event_storage().iter)
        self.local.append((rows_t, iters, feats))

    def merge(self) -> None:
        """Merge every rank's new rows into the harvest all ranks hold (collective)."""
        if self.local:
            rows = torch.cat([r.cpu() for r, _, _ in self.local])
            iters = torch.cat([i.cpu() for _, i, _ in self.local])
            feats = [
                torch.cat([f[k] for _, _, f in self.local]).cpu()
                for k in range(len(self.level_names))
            ]
        else:
            rows, iters, feats = self._empty()
        self.local = []
        parts = comm.all_gather((rows, iters, feats, self._unplaced_local))
        self.unplaced += sum(p[3] for p in parts)
        self._unplaced_local = 0
        parts = [self.merged] + [p[:3] for p in parts]
        parts = [p for p in parts if len(p[0])]
        if not parts:
            return
        rows = torch.cat([p[0] for p in parts])
        iters = torch.cat([p[1] for p in parts])
        keep = latest_rows(rows, iters)
        feats = [torch.cat([p[2][k] for p in parts])[keep] for k in range(len(self.level_names))]
        self.merged = (rows[keep], iters[keep], feats)

    def rows(self) -> tuple[Tensor, list[Tensor]]:
        """The merged harvest: (n,) sample rows and per level their (n, C) features."""
        return self.merged[0], self.merged[2]

    def state_dict(self) -> dict:
        """The merged part (call :meth:`merge` first on all ranks to include everything)."""
        rows, iters, feats = self.merged
        return {"since": self.since, "rows": rows, "iters": iters, "features": feats}

    def load_state_dict(self, state: dict) -> None:
        self.reset(int(state["since"]))
        self.merged = (state["rows"], state["iters"], list(state["features"]))
