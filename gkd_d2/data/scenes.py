"""Seeded generator of COCO-format detection scenes (the embedded dataset).

Each image is a textured background with distractors (lines, soft blobs, noise) on which several
procedural objects of ``SHAPE_CLASSES`` are pasted, from small to large, some blurred, later
objects occluding earlier ones. Boxes are taken from the *visible* part of each object's mask and
objects with less than ``min_visible`` of their area visible are dropped, so every box is exact.

The same ``SceneSpec`` and seed give the same bytes: each image draws from its own RNG seeded by
``(seed, split, index)``, so the result does not depend on generation order.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np

SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "ring", "star")
GENERATOR_VERSION = 2
_SUPERSAMPLE = 4  # masks are drawn 4x larger and area-downsampled: anti-aliased edges


def _import_cv2():
    """OpenCV, imported when the generator first draws, not on ``import gkd_d2``: `pip install -e .`
    installs no OpenCV, since it would clash with the one a detectron2 user has."""
    try:
        import cv2
    except ImportError as e:
        raise ImportError(
            "gkd_d2's scene generator (the quick-start datasets gkd_scenes_*) needs OpenCV: "
            "pip install opencv-python-headless (or opencv-python; one of them, not both)"
        ) from e
    return cv2


@dataclasses.dataclass(frozen=True)
class SceneSpec:
    """Parameters of one generated dataset split."""

    num_images: int
    image_size: int = 160
    min_objects: int = 2
    max_objects: int = 7
    min_side: float = 10.0  # object side in px, log-uniform between min_side and max_side
    max_side: float = 110.0
    blur_prob: float = 0.25
    min_visible: float = 0.3  # drop objects less visible than this (occlusion)
    occluded_below: float = 0.9  # an object is flagged occluded when less visible than this
    num_distractors: int = 4
    color_draws: int = 3  # more draws = more contrast between objects and background


def _shape_mask(cls: str, w: int, h: int, angle: float, rng: np.random.Generator) -> np.ndarray:
    """Anti-aliased alpha mask (h, w) float32 in [0, 1] of one object that fills its box."""
    cv2 = _import_cv2()
    s = _SUPERSAMPLE
    W, H = w * s, h * s
    canvas = np.zeros((H, W), np.uint8)
    cx, cy = W / 2.0, H / 2.0
    rx, ry = W / 2.0 - 1, H / 2.0 - 1

    def poly(points: np.ndarray) -> None:
        c, si = math.cos(angle), math.sin(angle)
        rot = points @ np.array([[c, si], [-si, c]])
        # rescale so that the rotated polygon spans the box
        rot = rot / np.abs(rot).max(axis=0)
        pts = np.stack([cx + rot[:, 0] * rx, cy + rot[:, 1] * ry], axis=1)
        cv2.fillPoly(canvas, [np.round(pts).astype(np.int32)], 255)

    if cls == "circle":
        cv2.ellipse(canvas, (int(cx), int(cy)), (int(rx), int(ry)), 0, 0, 360, 255, -1)
    elif cls == "ring":
        cv2.ellipse(canvas, (int(cx), int(cy)), (int(rx), int(ry)), 0, 0, 360, 255, -1)
        inner = rng.uniform(0.45, 0.65)
        cv2.ellipse(
            canvas, (int(cx), int(cy)), (int(rx * inner), int(ry * inner)), 0, 0, 360, 0, -1
        )
    elif cls == "square":
        poly(np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64))
    elif cls == "triangle":
        t = np.deg2rad([90, 210, 330])
        poly(np.stack([np.cos(t), -np.sin(t)], axis=1))
    elif cls == "cross":
        a = rng.uniform(0.28, 0.4)
        for pts in ([[-1, -a], [1, -a], [1, a], [-1, a]], [[-a, -1], [a, -1], [a, 1], [-a, 1]]):
            poly_pts = np.array(pts, np.float64)
            c, si = math.cos(angle), math.sin(angle)
            rot = poly_pts @ np.array([[c, si], [-si, c]]) / math.sqrt(1 + a * a)
            pts_px = np.stack([cx + rot[:, 0] * rx, cy + rot[:, 1] * ry], axis=1)
            cv2.fillPoly(canvas, [np.round(pts_px).astype(np.int32)], 255)
    elif cls == "star":
        t = np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.5))
        poly(np.stack([r * np.cos(t), -r * np.sin(t)], axis=1))
    else:
        raise ValueError(f"unknown shape class {cls!r}; known: {SHAPE_CLASSES}")
    return cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def _background(size: int, n_distractors: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float32 image in [0, 255]: gradient, low-frequency noise, distractors."""
    cv2 = _import_cv2()
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    c0, c1 = rng.uniform(30, 220, 3), rng.uniform(30, 220, 3)
    d = rng.uniform(-1, 1, 2)
    t = np.clip(0.5 + (xx - 0.5) * d[0] + (yy - 0.5) * d[1], 0, 1)[..., None]
    img = c0 * (1 - t) + c1 * t
    coarse = rng.normal(0, 18, (size // 16 + 1, size // 16 + 1, 3)).astype(np.float32)
    img = img + cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    for _ in range(n_distractors):
        col = tuple(float(v) for v in rng.uniform(0, 255, 3))
        if rng.random() < 0.5:
            p0 = tuple(int(v) for v in rng.integers(0, size, 2))
            p1 = tuple(int(v) for v in rng.integers(0, size, 2))
            cv2.line(img, p0, p1, col, int(rng.integers(1, 3)), cv2.LINE_AA)
        else:
            blob = np.zeros((size, size), np.float32)
            center = tuple(int(v) for v in rng.integers(0, size, 2))
            axes = tuple(int(v) for v in rng.integers(4, size // 3, 2))
            cv2.ellipse(blob, center, axes, float(rng.uniform(0, 180)), 0, 360, 0.5, -1)
            blob = cv2.GaussianBlur(blob, (0, 0), sigmaX=float(rng.uniform(3, 8)))[..., None]
            img = img * (1 - blob) + np.asarray(col, np.float32) * blob
    img = img + rng.normal(0, 4, img.shape)
    return img.astype(np.float32)


def paste_object(
    img: np.ndarray,
    alpha: np.ndarray,
    tex: np.ndarray,
    x0: int,
    y0: int,
    full_masks: list[np.ndarray],
    visible_masks: list[np.ndarray],
) -> None:
    """Alpha-blend one object into ``img`` in place and update the occlusion bookkeeping.

    Args:
        img: (S, S, 3) float32 canvas in [0, 255], modified in place.
        alpha: (h, w) float32 in [0, 1], the object's opacity.
        tex: (h, w, 3) float32, the object's colours (clipped to [0, 255] here).
        x0, y0: top-left corner of the object in ``img``; the object must lie inside it.
        full_masks, visible_masks: (S, S) bool masks of the objects pasted so far; the new
            object's mask (alpha > 0.5) is appended to both and removed from earlier visible
            masks, because a later paste hides what it covers.
    """
    S = img.shape[0]
    h, w = alpha.shape
    a = alpha[..., None]
    patch = img[y0 : y0 + h, x0 : x0 + w]
    img[y0 : y0 + h, x0 : x0 + w] = patch * (1 - a) + np.clip(tex, 0, 255) * a
    mask = np.zeros((S, S), bool)
    mask[y0 : y0 + h, x0 : x0 + w] = alpha > 0.5
    for v in visible_masks:
        v &= ~mask
    full_masks.append(mask)
    visible_masks.append(mask.copy())


def visible_objects(
    full_masks: list[np.ndarray],
    visible_masks: list[np.ndarray],
    meta: list[dict],
    min_visible: float,
    occluded_below: float,
    return_masks: bool = False,
) -> list[dict]:
    """Annotations of the pasted objects that stay visible enough, in paste order.

    Each kept object is its ``meta`` dict (which must hold ``category_id``; any other keys, such as
    ``blurred``, are carried along) plus ``bbox`` [x, y, w, h], the tight box of the (S, S)
    visible mask, ``visible_fraction`` and ``occluded`` (``visible_fraction < occluded_below``).
    Objects with less than ``min_visible`` of their area visible are dropped: their box would
    no longer describe the object.
    """
    objects = []
    for full, vis, extra in zip(full_masks, visible_masks, meta):
        full_area = int(full.sum())
        vis_area = int(vis.sum())
        if vis_area == 0 or vis_area < min_visible * full_area:
            continue
        ys, xs = np.nonzero(vis)
        bx, by = int(xs.min()), int(ys.min())
        bw, bh = int(xs.max()) + 1 - bx, int(ys.max()) + 1 - by
        frac = vis_area / full_area
        obj = {
            **extra,
            "bbox": [bx, by, bw, bh],
            "visible_fraction": round(frac, 4),
            "occluded": bool(frac < occluded_below),
        }
        if return_masks:
            obj.update(full_mask=full, visible_mask=vis)
        objects.append(obj)
    return objects


def render_scene(
    spec: SceneSpec, rng: np.random.Generator, return_masks: bool = False
) -> tuple[np.ndarray, list[dict]]:
    """Render one scene.

    Returns:
        image: (S, S, 3) uint8 BGR image.
        objects: one dict per kept object, in paste order, with ``category_id`` (0-based index
        into SHAPE_CLASSES), ``bbox`` [x, y, w, h] of the visible mask, ``visible_fraction``,
        ``occluded`` and ``blurred``; with ``return_masks`` also the (S, S) bool masks
        ``full_mask`` (alpha > 0.5) and ``visible_mask``.
    """
    cv2 = _import_cv2()
    S = spec.image_size
    img = _background(S, spec.num_distractors, rng)
    n = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    full_masks, visible, meta = [], [], []
    for _ in range(n):
        cls_id = int(rng.integers(len(SHAPE_CLASSES)))
        side = math.exp(rng.uniform(math.log(spec.min_side), math.log(spec.max_side)))
        aspect = math.exp(rng.uniform(-0.3, 0.3))
        w = int(np.clip(round(side * aspect), 6, S))
        h = int(np.clip(round(side / aspect), 6, S))
        x0, y0 = int(rng.integers(0, S - w + 1)), int(rng.integers(0, S - h + 1))
        alpha = _shape_mask(SHAPE_CLASSES[cls_id], w, h, float(rng.uniform(0, 2 * np.pi)), rng)
        # appearance: a colour that stands out from the background under the object (the best
        # of a few random draws), a stripe texture and a tint
        local = img[y0 : y0 + h, x0 : x0 + w].reshape(-1, 3).mean(axis=0)
        candidates = rng.uniform(0, 255, (spec.color_draws, 3)).astype(np.float32)
        color = candidates[np.argmax(np.linalg.norm(candidates - local, axis=1))]
        period = rng.uniform(3, 9)
        phase = (np.arange(w)[None, :] * math.cos(period) + np.arange(h)[:, None]) / period
        stripes = (0.5 + 0.5 * np.sin(phase))[..., None].astype(np.float32)
        tex = color * (0.75 + 0.25 * stripes) + rng.uniform(-25, 25, 3).astype(np.float32)
        blurred = bool(rng.random() < spec.blur_prob)
        if blurred:
            sigma = float(rng.uniform(0.8, 2.0)) * max(1.0, min(w, h) / 24)
            alpha = cv2.GaussianBlur(alpha, (0, 0), sigmaX=sigma)
            tex = cv2.GaussianBlur(tex, (0, 0), sigmaX=sigma)
        paste_object(img, alpha, tex, x0, y0, full_masks, visible)
        meta.append({"category_id": cls_id, "blurred": blurred})

    objects = visible_objects(
        full_masks, visible, meta, spec.min_visible, spec.occluded_below, return_masks
    )
    return np.clip(np.round(img), 0, 255).astype(np.uint8), objects


def spec_key(spec: SceneSpec, seed: int, split: str) -> str:
    """Folder name that changes whenever the generator, its parameters or the seed change."""
    blob = json.dumps(
        [GENERATOR_VERSION, dataclasses.asdict(spec), seed, split, SHAPE_CLASSES], sort_keys=True
    )
    return f"{split}-v{GENERATOR_VERSION}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def _split_salt(split: str) -> int:
    return int.from_bytes(hashlib.sha256(split.encode()).digest()[:4], "little")


def split_seed_sequence(seed: int, split: str, index: int) -> list[int]:
    """Entropy of image ``index``'s own RNG: independent of generation order and of other splits."""
    return [seed, _split_salt(split), index]


def write_coco_split(
    out: Path,
    num_images: int,
    render: Callable[[int], tuple[np.ndarray, list[dict]]],
    class_names: tuple[str, ...] | list[str],
    info: dict,
) -> Path:
    """Write ``num_images`` rendered images and a COCO json to ``out``, once; return ``out``.

    ``render(i)`` returns an (H, W, 3) uint8 BGR image and its objects (0-based ``category_id``,
    ``bbox`` [x, y, w, h]; every other key is stored as is in the annotation). ``out`` holds
    ``images/*.png`` and ``annotations.json``; if it exists it is reused as is. Generation goes to
    a temporary folder renamed at the end, so concurrent processes (one per rank) never see a
    half-written split.
    """
    if (out / "annotations.json").is_file():
        return out
    cv2 = _import_cv2()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    images, annotations = [], []
    for i in range(num_images):
        img, objects = render(i)
        file_name = f"{i:06d}.png"
        cv2.imwrite(str(tmp / "images" / file_name), img, [cv2.IMWRITE_PNG_COMPRESSION, 3])
        images.append(
            {"id": i + 1, "file_name": file_name, "width": img.shape[1], "height": img.shape[0]}
        )
        for obj in objects:
            w, h = obj["bbox"][2], obj["bbox"][3]
            extra = {k: v for k, v in obj.items() if k not in ("category_id", "bbox")}
            annotations.append(
                {
                    **extra,
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": obj["category_id"] + 1,
                    "bbox": obj["bbox"],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": info,
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": n} for k, n in enumerate(class_names)],
    }
    (tmp / "annotations.json").write_text(json.dumps(coco, sort_keys=True))
    try:
        tmp.rename(out)
    except OSError:  # another process finished first; its result is identical
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "annotations.json").is_file():
            raise
    return out


def generate_split(root: str | os.PathLike, split: str, spec: SceneSpec, seed: int) -> Path:
    """Write ``spec.num_images`` scenes and a COCO json under ``root``, once; return the folder.

    The folder ``root/<spec_key>`` holds ``images/*.png`` and ``annotations.json`` (see
    :func:`write_coco_split`).
    """

    def render(i: int) -> tuple[np.ndarray, list[dict]]:
        return render_scene(spec, np.random.default_rng(split_seed_sequence(seed, split, i)))

    info = {
        "description": f"gkd_d2 embedded scenes, split {split}, seed {seed}",
        "generator_version": GENERATOR_VERSION,
        "spec": dataclasses.asdict(spec),
    }
    out = Path(root) / spec_key(spec, seed, split)
    return write_coco_split(out, spec.num_images, render, SHAPE_CLASSES, info)
