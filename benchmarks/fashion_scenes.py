"""Seeded COCO-format scenes of Fashion-MNIST products pasted on real photos (a benchmark set).

Each image is a random crop of a real photo (OpenCV's sample images, Debian ``opencv-doc``) on
which several Fashion-MNIST products are pasted: object side log-uniform in 14-110 px (a mix of
COCO small and medium boxes), tinted with a colour that stands out from the background under
it, 30 % of them Gaussian-blurred, later pastes occluding earlier ones. Boxes are the tight boxes
of the *visible* mask (alpha > 0.5, alpha = clip(3 I / 255, 0, 1) since the products lie on
black); objects less than 30 % visible are dropped. Every annotation records
``visible_fraction``, ``occluded`` (< 90 % visible), ``blurred`` and ``source_index`` (index of
the product in its Fashion-MNIST file).

Train splits take products from the 60k ``train`` file only, validation splits from the 10k
``t10k`` file only, so no product is seen in both. Each image draws from its own RNG seeded by
``(seed, split, index)`` (as in :mod:`gkd_d2.data.scenes`), so the same parameters give the same
bytes. Splits are written once under ``root/fashion-<split>-v<version>-<hash>/`` where the hash
covers the parameters, the seed, the classes and the list of background files.

:func:`register_fashion_datasets` registers the splits of ``FASHION_SPLITS`` with detectron2 (the
benchmark scripts and their tests call it before building a config that names them). Sizes,
measured on a shared 2-core machine:
``gkd_fashion_train`` 3000 images of 256 px (7.2 boxes per image, 51 % small / 48 % medium, ~34 s,
~235 MB of PNG), ``gkd_fashion_val`` 500 images of 256 px (7.3 boxes per image, ~4.4 s),
``gkd_fashion_tiny_train`` / ``gkd_fashion_tiny_val`` 16 / 8 images of 128 px (< 0.5 s). Rendering
alone is ~3 ms per 256 px image; writing the PNG is most of the rest. Later loads reuse the files.

Needs ``apt-get install -y dataset-fashion-mnist opencv-doc`` (``tools/install_benchmark_data.sh``).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import json
import math
import os
from pathlib import Path

import cv2
import numpy as np

from gkd_d2.data.builtin import register_generated_split, scenes_root
from gkd_d2.data.scenes import (
    paste_object,
    split_seed_sequence,
    visible_objects,
    write_coco_split,
)

FASHION_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
FASHION_GENERATOR_VERSION = 1
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
BACKGROUND_DIRS = (Path("/usr/share/doc/opencv-doc/examples/data"),)
INSTALL_HINT = (
    "install them with `tools/install_benchmark_data.sh` "
    "(or `apt-get install -y dataset-fashion-mnist opencv-doc`)"
)
# OpenCV's stereo/camera calibration shots are near-identical chessboards: not natural scenes.
_EXCLUDED_PREFIXES = ("left", "right", "chessboard")
_MIN_BACKGROUND_SIDE = 120  # logos and icons smaller than this are not photos


@dataclasses.dataclass(frozen=True)
class FashionSceneSpec:
    """Parameters of one generated Fashion-MNIST scene split."""

    num_images: int
    image_size: int = 256
    min_objects: int = 4
    max_objects: int = 11
    min_side: float = 14.0  # side of the 28x28 product frame in px, log-uniform in [min, max]
    max_side: float = 110.0
    blur_prob: float = 0.3
    min_visible: float = 0.3  # drop objects less visible than this (occlusion)
    occluded_below: float = 0.9  # an object is flagged occluded when less visible than this
    color_draws: int = 3  # more draws = more contrast between objects and background


def source_file(split: str) -> str:
    """Fashion-MNIST file prefix the products of ``split`` come from: val never sees train."""
    return "train" if split == "train" else "t10k"


@functools.lru_cache(maxsize=2)
def load_fashion_mnist(which: str) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, 28, 28) uint8 and labels (N,) uint8 of the ``train`` or ``t10k`` file."""
    images_path = FASHION_MNIST_DIR / f"{which}-images-idx3-ubyte.gz"
    labels_path = FASHION_MNIST_DIR / f"{which}-labels-idx1-ubyte.gz"
    if not (images_path.is_file() and labels_path.is_file()):
        raise FileNotFoundError(
            f"Fashion-MNIST not found ({images_path}, {labels_path}): Debian package "
            f"dataset-fashion-mnist; {INSTALL_HINT}"
        )
    # idx format: 16-byte header for images, 8-byte header for labels
    images = np.frombuffer(gzip.open(images_path).read(), np.uint8, offset=16).reshape(-1, 28, 28)
    labels = np.frombuffer(gzip.open(labels_path).read(), np.uint8, offset=8)
    if len(images) != len(labels):
        raise ValueError(f"{images_path} and {labels_path} disagree in length")
    return images, labels


def background_paths() -> list[Path]:
    """Sorted list of the background photos present (empty if none is installed)."""
    paths = []
    for d in BACKGROUND_DIRS:
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.suffix.lower() in (".jpg", ".png") and not p.name.lower().startswith(
                _EXCLUDED_PREFIXES
            ):
                paths.append(p)
    # sorted by full path so the background i of a seed is the same on every machine
    return sorted(paths)


@functools.lru_cache(maxsize=1)
def _load_backgrounds(paths: tuple[Path, ...]) -> tuple[np.ndarray, ...]:
    """Decoded (H, W, 3) uint8 BGR photos; unreadable or tiny files are skipped."""
    out = []
    for p in paths:
        img = cv2.imread(str(p), cv2.IMREAD_COLOR)
        if img is not None and min(img.shape[:2]) >= _MIN_BACKGROUND_SIDE:
            out.append(img)
    return tuple(out)


def load_backgrounds() -> tuple[np.ndarray, ...]:
    """The usable background photos, in a fixed order; raises if none is installed."""
    backgrounds = _load_backgrounds(tuple(background_paths()))
    if not backgrounds:
        raise FileNotFoundError(
            "no background photos found in "
            + ", ".join(str(d) for d in BACKGROUND_DIRS)
            + f": Debian package opencv-doc; {INSTALL_HINT}"
        )
    return backgrounds


def _background_crop(
    backgrounds: tuple[np.ndarray, ...], size: int, rng: np.random.Generator
) -> np.ndarray:
    """(size, size, 3) float32 crop in [0, 255] of a random photo, randomly rescaled/flipped."""
    photo = backgrounds[int(rng.integers(len(backgrounds)))]
    h, w = photo.shape[:2]
    # crop a square of side in [size/2, min(h, w)] and resize it: varies the scale of the scene
    side = int(rng.integers(min(size // 2, min(h, w)), min(h, w) + 1))
    y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = photo[y0 : y0 + side, x0 : x0 + side]
    interp = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    crop = cv2.resize(crop, (size, size), interpolation=interp)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return crop.astype(np.float32)


def render_fashion_scene(
    spec: FashionSceneSpec,
    rng: np.random.Generator,
    products: np.ndarray,
    labels: np.ndarray,
    backgrounds: tuple[np.ndarray, ...],
    return_masks: bool = False,
) -> tuple[np.ndarray, list[dict]]:
    """Render one scene.

    Args:
        products: (N, 28, 28) uint8 Fashion-MNIST images to draw objects from.
        labels: (N,) uint8 class ids of ``products``.
        backgrounds: (H, W, 3) uint8 BGR photos, at least ``image_size / 2`` on a side.

    Returns:
        image: (S, S, 3) uint8 BGR image.
        objects: one dict per kept object, in paste order, with ``category_id`` (0-based index
        into FASHION_CLASSES), ``bbox`` [x, y, w, h] of the visible mask, ``visible_fraction``,
        ``occluded``, ``blurred`` and ``source_index`` (row of ``products``); with
        ``return_masks`` also the (S, S) bool masks ``full_mask`` and ``visible_mask``.
    """
    S = spec.image_size
    img = _background_crop(backgrounds, S, rng)
    n = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    full_masks: list[np.ndarray] = []
    visible: list[np.ndarray] = []
    meta: list[dict] = []
    for _ in range(n):
        idx = int(rng.integers(len(products)))
        log_side = rng.uniform(math.log(spec.min_side), math.log(spec.max_side))
        side = int(np.clip(round(math.exp(log_side)), 6, S))
        gray = products[idx].astype(np.float32)
        if rng.random() < 0.5:
            gray = gray[:, ::-1]
        interp = cv2.INTER_AREA if side < 28 else cv2.INTER_LINEAR
        gray = cv2.resize(np.ascontiguousarray(gray), (side, side), interpolation=interp)
        gray = np.clip(gray, 0, 255) / 255.0
        # the product lies on black, so its brightness is a clean opacity
        alpha = np.clip(3.0 * gray, 0.0, 1.0).astype(np.float32)
        x0, y0 = int(rng.integers(0, S - side + 1)), int(rng.integers(0, S - side + 1))
        # tint: the best of a few colours against the background under the object, modulated by
        # the product's own shading so its texture (folds, prints) stays visible
        local = img[y0 : y0 + side, x0 : x0 + side].reshape(-1, 3).mean(axis=0)
        candidates = rng.uniform(0, 255, (spec.color_draws, 3)).astype(np.float32)
        color = candidates[np.argmax(np.linalg.norm(candidates - local, axis=1))]
        tex = (color * (0.45 + 0.55 * gray[..., None])).astype(np.float32)
        blurred = bool(rng.random() < spec.blur_prob)
        if blurred:
            sigma = float(rng.uniform(0.8, 2.0)) * max(1.0, side / 32)
            alpha = cv2.GaussianBlur(alpha, (0, 0), sigmaX=sigma)
            tex = cv2.GaussianBlur(tex, (0, 0), sigmaX=sigma)
        paste_object(img, alpha, tex, x0, y0, full_masks, visible)
        meta.append({"category_id": int(labels[idx]), "blurred": blurred, "source_index": idx})
    objects = visible_objects(
        full_masks, visible, meta, spec.min_visible, spec.occluded_below, return_masks
    )
    return np.clip(np.round(img), 0, 255).astype(np.uint8), objects


def fashion_spec_key(spec: FashionSceneSpec, seed: int, split: str) -> str:
    """Folder name that changes with the generator, its parameters, the seed or the backgrounds."""
    blob = json.dumps(
        [
            FASHION_GENERATOR_VERSION,
            dataclasses.asdict(spec),
            seed,
            split,
            source_file(split),
            FASHION_CLASSES,
            [p.name for p in background_paths()],
        ],
        sort_keys=True,
    )
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return f"fashion-{split}-v{FASHION_GENERATOR_VERSION}-{digest}"


def generate_fashion_split(
    root: str | os.PathLike, split: str, spec: FashionSceneSpec, seed: int
) -> Path:
    """Write ``spec.num_images`` scenes and a COCO json under ``root``, once; return the folder.

    ``split == "train"`` draws products from Fashion-MNIST's train file, any other split from
    t10k. Raises FileNotFoundError (naming the package and the install command) if the products
    or the background photos are not installed.
    """
    out = Path(root) / fashion_spec_key(spec, seed, split)
    if (out / "annotations.json").is_file():
        return out
    products, labels = load_fashion_mnist(source_file(split))
    backgrounds = load_backgrounds()

    def render(i: int) -> tuple[np.ndarray, list[dict]]:
        rng = np.random.default_rng(split_seed_sequence(seed, split, i))
        return render_fashion_scene(spec, rng, products, labels, backgrounds)

    info = {
        "description": f"gkd_d2 Fashion-MNIST scenes, split {split}, seed {seed}",
        "generator_version": FASHION_GENERATOR_VERSION,
        "spec": dataclasses.asdict(spec),
        "object_source": f"fashion-mnist {source_file(split)}",
        "backgrounds": [p.name for p in background_paths()],
    }
    return write_coco_split(out, spec.num_images, render, FASHION_CLASSES, info)


# name -> (split, spec, seed) of the Fashion-MNIST benchmark; "train" takes products from the 60k
# file, "val" from t10k. Generated once: ~34 s for train, ~4 s for val (2 cores).
FASHION_SPLITS: dict[str, tuple[str, FashionSceneSpec, int]] = {
    "gkd_fashion_train": ("train", FashionSceneSpec(num_images=3000), 0),
    "gkd_fashion_val": ("val", FashionSceneSpec(num_images=500), 0),
    "gkd_fashion_tiny_train": ("train", FashionSceneSpec(16, image_size=128, max_side=64), 0),
    "gkd_fashion_tiny_val": ("val", FashionSceneSpec(8, image_size=128, max_side=64), 0),
    # the first n images of gkd_fashion_train (a scene's RNG is its split, seed and index), for
    # the accuracy benchmark's distillation epochs (protocol P: epochs of 30 iterations, --quick 15)
    **{
        f"gkd_fashion_train_{n}": ("train", FashionSceneSpec(num_images=n), 0)
        for n in (120, 160, 240)
    },
}


def register_fashion_datasets() -> None:
    """Register every split of ``FASHION_SPLITS`` with detectron2; nothing is generated until a
    split is loaded. Lists the installed background photos (their names are in each split's
    folder name), so it belongs to the benchmark, not to ``import gkd_d2``."""
    root = scenes_root()
    for name, (split, spec, seed) in FASHION_SPLITS.items():
        register_generated_split(
            name,
            FASHION_CLASSES,
            root / fashion_spec_key(spec, seed, split),
            lambda split=split, spec=spec, seed=seed: generate_fashion_split(
                root, split, spec, seed
            ),
        )
