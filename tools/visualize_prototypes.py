#!/usr/bin/env python
"""Pictures of a GKD checkpoint's global knowledge: its prototypes and its robustness weights.

    python tools/visualize_prototypes.py --config-file CONFIG --checkpoint MODEL.pth \\
        --output DIR [--max-images N] [--r-source training|box] [--split train|test] \\
        [--cell-size PX] [--context F] [--classes A,B] [KEY VALUE ...]

CONFIG is the GKD config the checkpoint was trained with (trailing ``KEY VALUE`` pairs override
it, e.g. ``MODEL.TEACHER.WEIGHTS path``); MODEL.pth a GKD training checkpoint (model state with
the prototype bank, hook state with the PGM instance sample). Writes to DIR:

* ``prototypes.png``: one grid for all levels. One row per (class, FPN level), classes outer,
  levels inner (class 0 at P3..P7, then class 1, ...); one column per prototype slot (M =
  ``MODEL.GKD.NUM_PROTOTYPES``). A cell is the prototype instance's image crop (a square of
  side (1 + 2 * context) * the box's longer side, centred on the box, clipped to the image),
  scaled to fit ``--cell-size`` pixels, with the box in red and a caption (sample row, dataset
  image index); empty slots are grey. Each row starts with a label: class name, level name and
  stride, prototype count. Size: ``LABEL_WIDTH + M * (cell + GAP) + GAP`` by
  ``HEADER_HEIGHT + rows * (cell + CAPTION_HEIGHT + GAP) + GAP`` pixels.
* ``robustness.png``: the histogram (20 bins on [0, 1]) of the robustness weight r of the
  ground-truth boxes of the first ``--max-images`` training images, 800 x 500 pixels. By
  default (``--r-source training``) r is the one that weighted training: each image goes
  through the student's training forward (at the test-time input size, no flip, buffers
  restored after each image), and the distiller's own r of every instance is recorded:
  RetinaNet's positive anchors at their own level, Faster R-CNN's positive sampled proposals
  (and, for its soft labels, r from their RoI features). A box's r is the mean over the
  positives matched to it (the min is reported too). ``--r-source box`` gives the older,
  different quantity: r of the box itself, box-crop means at its size's level
  (``assign_levels``), which never weights a loss. Either way the prototypes are the
  checkpoint's, and a class without prototypes has r = 1, as in training.
* ``robustness.json``: ``r_source`` (which r), r's count, mean, quantiles (p10, p25, median,
  p75, p90) and share below 0.5, overall, per class, per level, per COCO size class
  (``size``: small < 32^2 <= medium < 96^2 <= large, box area in original pixels) and, when
  the annotations carry ``occluded`` / ``blurred`` flags (the embedded scenes do), for flagged
  vs unflagged boxes; the histogram's counts. With the training r also: the min over each
  box's positives and Faster R-CNN's soft-label r (overall and by size), positives per box,
  boxes without positives, and ``fg_overlap``: the share of foreground mask cells covered by
  more than one instance and the mean mask weight under each ``MODEL.GKD.FG_OVERLAP`` rule.
  The per-class means and the groups are printed too.
* ``robustness_groups.png``: per group (size, occluded, blurred) the normalised histogram of
  r of each member. The paper's mechanism predicts lower r on small, occluded and blurred
  instances.

``--split test`` computes r on the ground-truth boxes of ``DATASETS.TEST[0]`` instead of the
training images (the prototypes are always the checkpoint's).

Works for GKDRetinaNet and GKDRCNN students; needs the teacher's weights
(``MODEL.TEACHER.WEIGHTS``) for r, not for the prototypes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, DatasetMapper
from detectron2.data.detection_utils import read_image
from detectron2.structures import BoxMode
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from gkd_d2.checkpoint import CheckpointLoadError, GKDCheckpointer, read_pth
from gkd_d2.engine.refresh_report import class_names

# COCO's size classes (area in original pixels), the ones training logs r by
from gkd_d2.modeling.distiller import SIZE_GROUPS

# the layout of prototypes.png, in pixels
LABEL_WIDTH = 120  # row labels on the left
HEADER_HEIGHT = 24  # title line
CAPTION_HEIGHT = 14  # under each crop
GAP = 4  # between and around cells
# the layout of robustness.png: 800 x 500 pixels
HIST_FIGSIZE, HIST_DPI, HIST_BINS = (8.0, 5.0), 100, 20

BACKGROUND = (255, 255, 255)
EMPTY_CELL = (225, 225, 225)
CELL_BACKGROUND = (40, 40, 40)
BOX_COLOUR = (255, 40, 40)
TEXT = (0, 0, 0)

HOOK_KEY = ("trainer", "hooks", "PrototypeRefresh", "instances")


class CheckpointError(ValueError):
    """The checkpoint lacks what the pictures need (named in the message)."""


def build_cfg(config_file: str, opts: list[str]) -> CfgNode:
    """The frozen config of ``config_file`` with ``KEY VALUE`` overrides, on the CPU when CUDA
    is asked for but absent. Unlike ``setup_cfg`` it writes nothing to OUTPUT_DIR."""
    from gkd_d2.config import load_config

    cfg = load_config(config_file, opts)  # unknown keys named, with the closest ones
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def load_bank_state(path: str) -> dict:
    """The prototype bank and the PGM instance sample of a GKD training checkpoint.

    Returns:
        ``proto_index`` (L, K, M) int64, ``proto_counts`` (L, K), ``bank_iter`` (int) and
        ``instances`` (the sample: ``image`` (N,), ``cls`` (N,), ``box`` (N, 4) XYXY original
        pixels).

    Raises:
        CheckpointError naming the file and the missing key: no bank index (a checkpoint
        saved before ``proto_index`` existed), no hook state (not a GKD training checkpoint, or
        a model-only export), or a bank with prototypes whose instances were not recorded.
    """
    try:
        ckpt = read_pth(path)
    except CheckpointLoadError as e:
        raise CheckpointError(str(e)) from None
    model_state = ckpt.get("model", {}) if isinstance(ckpt, dict) else {}
    out: dict = {}
    for name in ("proto_index", "proto_counts", "bank_iter"):
        key = f"distiller.{name}"
        if key not in model_state:
            hint = (
                " (saved before GKD recorded which instances the prototypes are: train again, "
                "or resume training past a prototype refresh, with this version)"
                if name == "proto_index" and "distiller.protos_s" in model_state
                else " (not a GKD checkpoint?)"
            )
            raise CheckpointError(f"{path}: no '{key}' in the checkpoint's model state{hint}")
        out[name] = model_state[key]
    state = ckpt
    for depth, key in enumerate(HOOK_KEY):
        if not isinstance(state, dict) or key not in state:
            where = "/".join(HOOK_KEY[: depth + 1])
            raise CheckpointError(
                f"{path}: no '{where}' in the checkpoint: the PGM instance sample is hook state "
                "of a GKD training checkpoint written by gkd_d2's Trainer (the local-only "
                "baseline, MODEL.GKD.ROBUST_WEIGHTS False, has no prototypes)"
            )
        state = state[key]
    out["instances"] = state
    out["bank_iter"] = int(out["bank_iter"])
    index, counts = out["proto_index"], out["proto_counts"]
    filled = torch.arange(index.shape[2])[None, None, :] < counts[:, :, None]
    if bool((index[filled] < 0).any()):
        raise CheckpointError(
            f"{path}: 'distiller.proto_index' is -1 for prototypes that exist: the bank came "
            "from a checkpoint without instance indices and has not been refreshed since"
        )
    if bool((index[filled] >= len(state["cls"])).any()):
        raise CheckpointError(
            f"{path}: 'distiller.proto_index' points past the {len(state['cls'])} instances of "
            f"'{'/'.join(HOOK_KEY)}'"
        )
    return out


def _fit(draw: ImageDraw.ImageDraw, text: str, width: int, font) -> str:
    """``text`` shortened (with "...") to fit ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def crop_with_box(image: np.ndarray, box: Tensor, cell: int, context: float) -> Image.Image:
    """A ``cell`` x ``cell`` picture of one instance: a square window around its box.

    Args:
        image: (H, W, 3) uint8 RGB image.
        box: (4,) XYXY box in the image's pixels.
        cell: side of the output in pixels.
        context: margin on each side, as a fraction of the box's longer side.

    Returns:
        The crop scaled to fit the cell (aspect kept, centred on a dark background), the box
        drawn in red.
    """
    h, w = image.shape[:2]
    x1, y1, x2, y2 = box.tolist()
    # a square window, so that long thin boxes keep their surroundings on the short side
    half = max(x2 - x1, y2 - y1, 1.0) * (0.5 + context)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    left, top = int(max(0, np.floor(cx - half))), int(max(0, np.floor(cy - half)))
    right, bottom = int(min(w, np.ceil(cx + half))), int(min(h, np.ceil(cy + half)))
    right, bottom = max(right, left + 1), max(bottom, top + 1)
    crop = Image.fromarray(np.ascontiguousarray(image[top:bottom, left:right]))
    scale = cell / max(right - left, bottom - top)
    size = (max(1, round((right - left) * scale)), max(1, round((bottom - top) * scale)))
    crop = crop.resize(size, Image.BILINEAR)
    out = Image.new("RGB", (cell, cell), CELL_BACKGROUND)
    ox, oy = (cell - size[0]) // 2, (cell - size[1]) // 2
    out.paste(crop, (ox, oy))
    ImageDraw.Draw(out).rectangle(
        [
            ox + (x1 - left) * scale,
            oy + (y1 - top) * scale,
            ox + (x2 - left) * scale - 1,
            oy + (y2 - top) * scale - 1,
        ],
        outline=BOX_COLOUR,
        width=2,
    )
    return out


def draw_prototypes(
    bank: dict,
    dataset_dicts: list[dict],
    names: list[str],
    level_names: list[str],
    strides: list[int],
    cell: int = 96,
    context: float = 0.5,
    classes: list[int] | None = None,
    title: str = "",
) -> Image.Image:
    """The prototype grid (layout: module docstring).

    Args:
        bank: :func:`load_bank_state`'s output; ``proto_index`` (L, K, M).
        dataset_dicts: the training set in loader order (``instances["image"]`` indexes it).
        names: K class names; level_names, strides: the L distilled levels.
        classes: the classes to draw (rows), default all.
    """
    index, counts, inst = bank["proto_index"], bank["proto_counts"], bank["instances"]
    L, K, M = index.shape
    classes = list(range(K)) if classes is None else classes
    rows = [(c, lvl) for c in classes for lvl in range(L)]
    width = LABEL_WIDTH + M * (cell + GAP) + GAP
    height = HEADER_HEIGHT + len(rows) * (cell + CAPTION_HEIGHT + GAP) + GAP
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    draw.text((GAP, GAP), _fit(draw, title, width - 2 * GAP, font), fill=TEXT, font=font)
    images: dict[int, np.ndarray] = {}  # an image holds prototypes of several rows: read once
    for r, (c, lvl) in enumerate(rows):
        y = HEADER_HEIGHT + r * (cell + CAPTION_HEIGHT + GAP)
        m = int(counts[lvl, c])
        label = [names[c], f"{level_names[lvl]} (stride {strides[lvl]})", f"{m} prototypes"]
        for i, line in enumerate(label):
            draw.text(
                (GAP, y + i * 14),
                _fit(draw, line, LABEL_WIDTH - 2 * GAP, font),
                fill=TEXT,
                font=font,
            )
        for j in range(M):
            x = LABEL_WIDTH + GAP + j * (cell + GAP)
            if j >= m:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=EMPTY_CELL)
                continue
            row = int(index[lvl, c, j])
            image_id = int(inst["image"][row])
            if image_id not in images:
                images[image_id] = read_image(dataset_dicts[image_id]["file_name"], format="RGB")
            canvas.paste(crop_with_box(images[image_id], inst["box"][row], cell, context), (x, y))
            caption = _fit(draw, f"#{row} img {image_id}", cell, font)
            draw.text((x, y + cell + 1), caption, fill=TEXT, font=font)
    return canvas


def gt_boxes_of(d: dict, height: int, width: int) -> tuple[Tensor, Tensor, list[dict]]:
    """A dataset dict's non-crowd ground truth, boxes scaled to a resized image.

    Returns:
        boxes: (n, 4) XYXY in the resized (``height``, ``width``) image's pixels;
        classes: (n,) int64; annotations: the n annotation dicts (for their flags).
    """
    anns = [a for a in d.get("annotations", []) if not a.get("iscrowd", 0)]
    boxes = torch.tensor(
        [BoxMode.convert(list(a["bbox"]), a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns],
        dtype=torch.float32,
    ).reshape(-1, 4)
    boxes = boxes * torch.tensor([width / d["width"], height / d["height"]] * 2)
    return boxes, torch.tensor([a["category_id"] for a in anns], dtype=torch.long), anns


@torch.no_grad()
def robustness_of_boxes(
    model: nn.Module, teacher, cfg: CfgNode, dataset_dicts: list[dict], max_images: int
) -> dict:
    """r of every ground-truth box of the first ``max_images`` training images.

    Each image goes alone through the test-time mapper, the student's and the teacher's
    backbones (eval mode); a box's descriptors are the box-crop means at its level (official
    box-size rule over the distilled levels), and r is ``model.distiller.robustness_at``.

    Returns:
        ``r`` (N,) float, ``cls`` (N,) int64, ``level`` (N,) int64, ``area`` (N,) float (box
        area in original pixels) and ``occluded`` / ``blurred`` (N,) int8 (1 flagged, 0 not,
        -1 no flag); ``images``: images used.
    """
    from gkd_d2.distill import assign_levels, pool_at_levels

    model.eval()
    distiller = model.distiller
    level_names, strides = list(model.distill_in_features), distiller.strides
    mapper = DatasetMapper(cfg, is_train=False)
    out: dict[str, list] = {k: [] for k in ("r", "cls", "level", "area", "occluded", "blurred")}
    used = dataset_dicts[:max_images]
    for d in used:
        inputs = [mapper(dict(d))]
        images = model.preprocess_image(inputs)
        feats_s = model.backbone(images.tensor)
        feats_t, _ = teacher.features(inputs)
        h, w = images.image_sizes[0]
        boxes, classes, anns = gt_boxes_of(d, h, w)
        if len(boxes) == 0:
            continue
        device = images.tensor.device
        boxes, classes = boxes.to(device), classes.to(device)
        levels = assign_levels(boxes, len(level_names))
        batch_idx = torch.zeros_like(classes)
        at = (boxes, batch_idx, strides, levels)
        desc_s = pool_at_levels([feats_s[name] for name in level_names], *at)
        desc_t = pool_at_levels([feats_t[name] for name in level_names], *at)
        out["r"].append(distiller.robustness_at(desc_s, desc_t, classes, levels).float().cpu())
        out["cls"].append(classes.cpu())
        out["level"].append(levels.cpu())
        # COCO's size classes use the annotation's area in original pixels (its box's area here)
        orig = gt_boxes_of(d, d["height"], d["width"])[0]
        out["area"].append((orig[:, 2] - orig[:, 0]) * (orig[:, 3] - orig[:, 1]))
        for flag in ("occluded", "blurred"):
            values = [int(bool(a[flag])) if flag in a else -1 for a in anns]
            out[flag].append(torch.tensor(values, dtype=torch.int8))
    result = {
        k: torch.cat(v)
        if v
        else torch.zeros(0, dtype=torch.float32 if k in ("r", "area") else torch.long)
        for k, v in out.items()
    }
    result["images"] = len(used)
    return result


def _flags_of_rows(
    d: dict, image_size: tuple[int, int], boxes: Tensor, classes: Tensor
) -> dict[str, list[int]]:
    """The ``occluded`` / ``blurred`` flag of each ground-truth row of a mapped input (1, 0,
    -1 when the dataset does not record it): that of the non-crowd annotation of the same
    class whose box, scaled to the input's ``image_size``, is nearest (the mapper drops empty
    boxes, so rows and annotations need not align one to one)."""
    ann_boxes, ann_classes, anns = gt_boxes_of(d, *image_size)
    if not len(boxes) or not anns:
        return {"occluded": [-1] * len(boxes), "blurred": [-1] * len(boxes)}
    dist = (boxes[:, None, :].cpu() - ann_boxes[None, :, :]).abs().sum(dim=2)
    dist = dist.masked_fill(classes[:, None].cpu() != ann_classes[None, :], float("inf"))
    nearest = dist.argmin(dim=1).tolist()
    return {
        flag: [int(bool(anns[j][flag])) if flag in anns[j] else -1 for j in nearest]
        for flag in ("occluded", "blurred")
    }


def training_mapper(cfg: CfgNode) -> DatasetMapper:
    """The mapper of the training-r pass: ground truth kept (a training input), at the
    test-time size and without flip, so that the result does not depend on chance."""
    from detectron2.data import transforms as T

    resize = T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)
    return DatasetMapper(cfg, is_train=True, augmentations=[resize])


def per_box_mean_min(values: Tensor, rows: Tensor, num_boxes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Mean and min of the instances' ``values`` per ground-truth box.

    Args:
        values: (N,) a value per instance (r of a positive anchor / proposal).
        rows: (N,) int64 each instance's ground-truth row, -1 for none (ignored).
        num_boxes: G.

    Returns:
        (G,) mean, (G,) min (inf for a box without instances), (G,) instance count.
    """
    keep = rows >= 0
    v, rows = values.detach().float().cpu()[keep], rows.cpu()[keep]
    count = torch.bincount(rows, minlength=num_boxes)
    mean = torch.zeros(num_boxes).index_add_(0, rows, v) / count.clamp(min=1)
    low = torch.full((num_boxes,), float("inf")).scatter_reduce_(0, rows, v, "amin")
    return mean, low, count


def training_batches(
    mapper: DatasetMapper, dataset_dicts: list[dict], size: int
) -> Iterator[tuple[list[int], list[dict]]]:
    """The mapped images that keep ground truth, ``size`` at a time, as (their indices in
    ``dataset_dicts``, the mapped inputs); a leftover single image joins the last batch
    (train-mode BN needs more than one value per channel). Maps lazily: at most two batches
    are held."""
    pending: tuple[list[int], list[dict]] | None = None
    batch: tuple[list[int], list[dict]] = ([], [])
    for i, d in enumerate(dataset_dicts):
        x = mapper(dict(d))
        if not len(x["instances"]):
            continue
        batch[0].append(i)
        batch[1].append(x)
        if len(batch[0]) == size:
            if pending is not None:
                yield pending
            pending, batch = batch, ([], [])
    if pending is not None and len(batch[0]) == 1:
        pending = (pending[0] + batch[0], pending[1] + batch[1])
        batch = ([], [])
    if pending is not None:
        yield pending
    if batch[0]:
        yield batch


@torch.no_grad()
def robustness_in_training(
    model: nn.Module,
    cfg: CfgNode,
    dataset_dicts: list[dict],
    max_images: int,
    seed: int = 0,
    batch_size: int = 0,
) -> dict:
    """r exactly as the training step computes it, aggregated per ground-truth box.

    The first ``max_images`` images with ground truth go, ``batch_size`` at a time (0:
    ``SOLVER.IMS_PER_BATCH``, a training step's batch on one process; a leftover image joins
    the last batch, as train-mode BN needs more than one value per channel), through the
    student's training forward (``model.train()``: detectron2's own labelling and sampling), at
    the test-time input size without flip (:func:`training_mapper`); each instance's r is
    recorded from the distiller itself (:meth:`GKDDistiller.recording_instances`). The model's
    buffers (BN running statistics, loss normaliser) are restored after every batch and torch's
    RNG is seeded with ``seed`` (Faster R-CNN samples its RoIs), so the result depends only on
    the checkpoint, the images and the seed.

    The instances are RetinaNet's positive anchors, r at each anchor's own level (or the
    official box-size level, ``ANCHOR_OWN_LEVEL False``), or Faster R-CNN's positive sampled
    proposals, r at the proposal's level for the fg mask and, for the soft labels, r from the
    RoI features (``r_soft``). A box's r is the mean (and the min) over its positives.

    Returns:
        per ground-truth box with at least one positive: ``r`` (mean over its positives),
        ``r_min``, ``r_soft`` / ``r_soft_min`` (Faster R-CNN; else absent), ``positives``
        (count), ``cls``, ``level`` (the level most of its positives are at), ``area``
        (original pixels), ``occluded`` / ``blurred`` (1, 0, -1 not recorded); ``images``:
        images used; ``boxes_without_positives``: ground truths no positive matched;
        ``records``: the distiller's :class:`InstanceRecord` of each batch (for
        :func:`overlap_statistics`).
    """
    from detectron2.utils.events import EventStorage

    from gkd_d2.modeling.distilled_detector import gt_areas_in_original

    mapper = training_mapper(cfg)
    batches = training_batches(
        mapper, dataset_dicts[:max_images], batch_size or cfg.SOLVER.IMS_PER_BATCH
    )
    buffers = list(model.buffers())
    saved = [b.clone() for b in buffers]
    keys = ("r", "r_min", "r_soft", "r_soft_min", "positives", "cls", "level", "area")
    out: dict[str, list] = {k: [] for k in (*keys, "occluded", "blurred")}
    records, unmatched, images = [], 0, 0
    torch.manual_seed(seed)
    model.train()
    try:
        with EventStorage(0):
            for batch, batch_inputs in batches:
                images += len(batch)
                seen: list = []
                with model.distiller.recording_instances(seen.append):
                    model(batch_inputs)
                for buf, value in zip(buffers, saved):
                    buf.copy_(value)
                rec = seen[-1]
                records.append(rec)
                gts = [x["instances"] for x in batch_inputs]
                G = sum(len(g) for g in gts)
                rows = rec.instance_gt.cpu()
                r_mean, r_min, count = per_box_mean_min(rec.r, rows, G)
                has = count > 0
                unmatched += int((~has).sum())
                out["r"].append(r_mean[has])
                out["r_min"].append(r_min[has])
                if rec.soft_r is not None:
                    soft_mean, soft_min, _ = per_box_mean_min(rec.soft_r, rows, G)
                    out["r_soft"].append(soft_mean[has])
                    out["r_soft_min"].append(soft_min[has])
                out["positives"].append(count[has])
                out["cls"].append(torch.cat([g.gt_classes for g in gts])[has])
                matched = rows >= 0
                per_level = torch.zeros(G, len(rec.map_shapes)).index_put_(
                    (rows[matched], rec.levels.cpu()[matched]),
                    torch.ones(int(matched.sum())),
                    accumulate=True,
                )
                out["level"].append(per_level.argmax(dim=1)[has])
                out["area"].append(gt_areas_in_original(gts, batch_inputs)[has])
                flags = [
                    _flags_of_rows(dataset_dicts[i], g.image_size, g.gt_boxes.tensor, g.gt_classes)
                    for i, g in zip(batch, gts)
                ]
                for flag in ("occluded", "blurred"):
                    values = [v for f in flags for v in f[flag]]
                    out[flag].append(torch.tensor(values, dtype=torch.int8)[has])
    finally:
        for buf, value in zip(buffers, saved):
            buf.copy_(value)
        model.eval()
    int8 = ("occluded", "blurred")
    result: dict = {
        k: torch.cat(v) if v else torch.zeros(0, dtype=torch.int8 if k in int8 else torch.float32)
        for k, v in out.items()
        if v or k not in ("r_soft", "r_soft_min")  # soft-label r: Faster R-CNN only
    }
    result["images"] = images
    result["boxes_without_positives"] = unmatched
    result["records"] = records
    return result


def overlap_statistics(records: list, strides: list[int]) -> dict:
    """How often foreground instances overlap in the masks, and what the two overlap rules
    (``MODEL.GKD.FG_OVERLAP``) make of it, over the recorded training steps.

    Returns:
        ``fg_cells``: cells covered by at least one instance (all levels and images);
        ``shared_share``: the share of them covered by more than one instance;
        ``mean_weight_max`` / ``mean_weight_last``: the mean mask weight over the fg cells
        under "max" and under "last" (the official rule, row order);
        ``mean_abs_difference_shared``: mean |max - last| over the shared cells;
        ``changed_share``: the share of fg cells whose weight differs between the rules.
    """
    from gkd_d2.distill import box_cells, foreground_mask

    fg = shared = changed = 0
    sum_max = sum_last = diff_shared = 0.0
    for rec in records:
        for lvl, (B, H, W) in enumerate(rec.map_shapes):
            sel = rec.levels == lvl
            if not bool(sel.any()):
                continue
            boxes, bidx, w = rec.boxes[sel], rec.batch_idx[sel], rec.weights[sel]
            inside, _ = box_cells(boxes, strides[lvl], (H, W))
            counts = torch.zeros(B, H * W).index_add_(0, bidx.cpu(), inside.float().cpu())
            m_max, covered = foreground_mask(boxes, bidx, w, strides[lvl], (B, H, W), "max")
            m_last, _ = foreground_mask(boxes, bidx, w, strides[lvl], (B, H, W), "last")
            cov = covered.view(B, H * W).cpu()
            many = counts > 1
            a, b = m_max.view(B, H * W).cpu(), m_last.view(B, H * W).cpu()
            fg += int(cov.sum())
            shared += int(many.sum())
            sum_max += float(a[cov].sum())
            sum_last += float(b[cov].sum())
            diff_shared += float((a - b).abs()[many].sum())
            changed += int(((a - b).abs() > 1e-7)[cov].sum())
    return {
        "fg_cells": fg,
        "shared_share": shared / fg if fg else None,
        "mean_weight_max": sum_max / fg if fg else None,
        "mean_weight_last": sum_last / fg if fg else None,
        "mean_abs_difference_shared": diff_shared / shared if shared else None,
        "changed_share": changed / fg if fg else None,
    }


# what robustness.json's "r_source" says of each way of computing r
R_SOURCES = {
    "training": "training: r of each positive anchor / proposal as the training step computes "
    "it, per ground-truth box the mean over its positives",
    "box": "box: r of the ground-truth box itself, box-crop means at its size's level "
    "(not the r that weights training)",
}
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def _mean_of(r: Tensor) -> dict:
    """Count, mean, quantiles (p10 ... p90) and share below 0.5 of a group's r (None if empty)."""
    if not len(r):
        return {"instances": 0, "mean_r": None, "below_0.5": None}
    q = torch.quantile(r.double(), torch.tensor(QUANTILES, dtype=torch.float64)).tolist()
    return {
        "instances": len(r),
        "mean_r": float(r.mean()),
        **{f"p{round(100 * p)}": v for p, v in zip(QUANTILES, q)},
        "below_0.5": float((r < 0.5).double().mean()),
    }


def groups_of(result: dict) -> dict[str, dict[str, Tensor]]:
    """The (N,) masks of the diagnostic groups: sizes, and each flag the dataset records."""
    area = result["area"]
    out = {"size": {k: (area >= lo) & (area < hi) for k, (lo, hi) in SIZE_GROUPS.items()}}
    for flag in ("occluded", "blurred"):
        flags = result[flag]
        if bool((flags >= 0).any()):  # only datasets that record the flag
            out[flag] = {"true": flags == 1, "false": flags == 0}
    return out


def summarize(result: dict, names: list[str], level_names: list[str]) -> dict:
    """robustness.json's content from :func:`robustness_of_boxes`' output."""
    r = result["r"]
    # [0, 1] unless r is unclamped (MODEL.GKD.CLAMP_R False) and leaves it
    lo = min(0.0, float(r.min())) if len(r) else 0.0
    hi = max(1.0, float(r.max())) if len(r) else 1.0
    counts, edges = np.histogram(r.numpy(), bins=HIST_BINS, range=(lo, hi))
    summary = {
        "images": result["images"],
        **_mean_of(r),
        "per_class": {n: _mean_of(r[result["cls"] == c]) for c, n in enumerate(names)},
        "per_level": {n: _mean_of(r[result["level"] == i]) for i, n in enumerate(level_names)},
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
    }
    for group, masks in groups_of(result).items():
        summary[group] = {k: _mean_of(r[m]) for k, m in masks.items()}
    # the training r (robustness_in_training): per box also the min over its positives, and
    # Faster R-CNN's soft-label r, by size group too
    for key, label in (("r_min", "min_over_positives"), ("r_soft", "soft_label_r")):
        if key in result:
            v = result[key]
            summary[label] = {
                "all": _mean_of(v),
                **{k: _mean_of(v[m]) for k, m in groups_of(result)["size"].items()},
            }
    if "positives" in result:
        summary["positives_per_box"] = (
            float(result["positives"].float().mean()) if len(result["positives"]) else None
        )
        summary["boxes_without_positives"] = result["boxes_without_positives"]
    return summary


def draw_histogram(r: Tensor, summary: dict, path: Path, title: str) -> None:
    """robustness.png: the histogram of r, HIST_FIGSIZE at HIST_DPI (800 x 500 pixels)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=HIST_FIGSIZE, dpi=HIST_DPI)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    edges = summary["histogram"]["edges"]
    ax.hist(r.numpy(), bins=edges, color="tab:blue", edgecolor="white")
    if summary["mean_r"] is not None:
        ax.axvline(summary["mean_r"], color="tab:red", linestyle="--", label="mean")
        ax.legend()
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("robustness weight r")
    ax.set_ylabel("ground-truth boxes")
    mean = "-" if summary["mean_r"] is None else f"{summary['mean_r']:.3f}"
    ax.set_title(
        f"{title}\n{summary['instances']} boxes in {summary['images']} images, mean {mean}"
    )
    fig.tight_layout()
    # no bbox_inches="tight": the file keeps the figure's exact pixel size
    fig.savefig(path, dpi=HIST_DPI)


def draw_group_histograms(result: dict, summary: dict, path: Path, title: str) -> None:
    """robustness_groups.png: one panel per group (size, and the flags the dataset records),
    the normalised histogram of r of each member, with its mean and share below 0.5."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = groups_of(result)
    fig = Figure(figsize=(4.0 * len(groups), 3.6), dpi=HIST_DPI)
    FigureCanvasAgg(fig)
    edges = summary["histogram"]["edges"]
    for i, (group, masks) in enumerate(groups.items()):
        ax = fig.add_subplot(1, len(groups), i + 1)
        for k, m in masks.items():
            s = summary[group][k]
            if s["instances"]:
                label = f"{k}: {s['instances']}, mean {s['mean_r']:.2f}, <0.5 {s['below_0.5']:.0%}"
                ax.hist(
                    result["r"][m].numpy(),
                    bins=edges,
                    density=True,
                    histtype="step",
                    linewidth=1.5,
                    label=label,
                )
        ax.set_title(group)
        ax.set_xlabel("r")
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=HIST_DPI)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config-file", required=True, help="the GKD config of the checkpoint")
    parser.add_argument("--checkpoint", required=True, help="a GKD training checkpoint (.pth)")
    parser.add_argument("--output", required=True, help="folder for the pictures and json")
    parser.add_argument("--max-images", type=int, default=200, help="images for r")
    parser.add_argument(
        "--split",
        choices=("train", "test"),
        default="train",
        help="whose ground-truth boxes r is computed on: DATASETS.TRAIN or DATASETS.TEST[0]",
    )
    parser.add_argument(
        "--r-source",
        choices=sorted(R_SOURCES),
        default="training",
        help="training: r of the positives as the training step computes it, per box their "
        "mean (default); box: r of the box itself, pooled at its size's level",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="images per training forward for --r-source training (0: SOLVER.IMS_PER_BATCH)",
    )
    parser.add_argument("--cell-size", type=int, default=96, help="crop side in pixels")
    parser.add_argument(
        "--context", type=float, default=0.5, help="crop margin per side / the box's longer side"
    )
    parser.add_argument(
        "--classes", default="", help="comma-separated class names or indices to draw (all)"
    )
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return parser.parse_args(argv)


def _select_classes(spec: str, names: list[str]) -> list[int] | None:
    if not spec:
        return None
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item in names:
            out.append(names.index(item))
        elif item.isdigit() and int(item) < len(names):
            out.append(int(item))
        else:
            raise ValueError(f"--classes: {item!r} is not one of {names} nor an index")
    return out


def run(args: argparse.Namespace) -> None:
    """Write the pictures and the json (module docstring); CheckpointError when they cannot be."""
    import gkd_d2  # noqa: F401  (registers datasets, backbones, meta-architectures)
    from gkd_d2.engine import Trainer
    from gkd_d2.engine.schedule import train_dataset_dicts
    from gkd_d2.teacher import build_teacher

    bank = load_bank_state(args.checkpoint)  # first: a wrong file fails before any building
    cfg = build_cfg(args.config_file, args.opts)
    model = Trainer.build_model(cfg)
    if not hasattr(model, "distiller"):
        raise CheckpointError(
            f"{args.config_file} builds a {type(model).__name__}, not a GKD student "
            "(GKDRetinaNet, GKDRCNN)"
        )
    if bank["proto_index"].shape != model.distiller.proto_index.shape:
        raise CheckpointError(
            f"{args.checkpoint}: a bank of shape {tuple(bank['proto_index'].shape)} (levels, "
            f"classes, prototypes) but {args.config_file} gives "
            f"{tuple(model.distiller.proto_index.shape)}"
        )
    GKDCheckpointer(model).load(args.checkpoint)
    model.eval()
    dataset_dicts = train_dataset_dicts(cfg)
    sample = bank["instances"]
    if len(sample["image"]) and int(sample["image"].max()) >= len(dataset_dicts):
        raise CheckpointError(
            f"{args.checkpoint}: the instance sample indexes images past the "
            f"{len(dataset_dicts)} of {cfg.DATASETS.TRAIN}: trained on another training set"
        )
    names = class_names(cfg, bank["proto_index"].shape[1])
    level_names, strides = list(model.distill_in_features), list(model.distiller.strides)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)

    title = (
        f"{Path(args.checkpoint).name}: prototypes of the refresh at iteration "
        f"{bank['bank_iter']} ({len(sample['cls'])} sampled instances)"
    )
    grid = draw_prototypes(
        bank,
        dataset_dicts,
        names,
        level_names,
        strides,
        args.cell_size,
        args.context,
        _select_classes(args.classes, names),
        title,
    )
    grid.save(out / "prototypes.png")
    print(f"wrote {out / 'prototypes.png'} ({grid.width} x {grid.height})")

    teacher = build_teacher(cfg)
    if args.split == "test":
        if not cfg.DATASETS.TEST:
            raise CheckpointError(f"--split test: {args.config_file} has no DATASETS.TEST")
        boxes_from = DatasetCatalog.get(cfg.DATASETS.TEST[0])
        split = cfg.DATASETS.TEST[0]
    else:
        boxes_from, split = dataset_dicts, ",".join(cfg.DATASETS.TRAIN)
    if args.r_source == "training":
        model.attach_teacher(teacher)
        result = robustness_in_training(
            model, cfg, boxes_from, args.max_images, cfg.SEED, args.batch_size
        )
        r_source = R_SOURCES["training"]
    else:
        result = robustness_of_boxes(model, teacher, cfg, boxes_from, args.max_images)
        r_source = R_SOURCES["box"]
    summary = {
        "checkpoint": str(args.checkpoint),
        "bank_iter": bank["bank_iter"],
        "split": split,
        "r_source": r_source,
        **summarize(result, names, level_names),
    }
    if "records" in result:
        summary["fg_overlap"] = overlap_statistics(result["records"], strides)
    (out / "robustness.json").write_text(json.dumps(summary, indent=1) + "\n")
    name = f"{Path(args.checkpoint).name}, {split}"
    draw_histogram(result["r"], summary, out / "robustness.png", name)
    draw_group_histograms(result, summary, out / "robustness_groups.png", name)
    print(f"r: {r_source}")
    print(f"r of {summary['instances']} ground-truth boxes in {summary['images']} images:")
    for name, s in summary["per_class"].items():
        mean = "-" if s["mean_r"] is None else f"{s['mean_r']:.3f}"
        print(f"  {name:<20} {s['instances']:6d} boxes  mean r {mean}")
    for group in ("size", "occluded", "blurred"):
        if group in summary:
            parts = [
                f"{k} {v['mean_r']:.3f}, <0.5 {v['below_0.5']:.0%} ({v['instances']} boxes)"
                for k, v in summary[group].items()
                if v["mean_r"] is not None
            ]
            print(f"  {group}: " + "; ".join(parts))
    print(
        f"wrote {out / 'robustness.png'}, {out / 'robustness_groups.png'} and "
        f"{out / 'robustness.json'}"
    )


def main(argv: list[str] | None = None) -> int:
    """The command line (module docstring); 0 on success, 2 on an unusable checkpoint."""
    args = parse_args(argv)
    try:
        run(args)
    except CheckpointError as e:
        print(f"visualize_prototypes: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
