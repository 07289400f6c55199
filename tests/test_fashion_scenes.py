"""The Fashion-MNIST-on-photos benchmark generator and its detectron2 registration."""

import json

import numpy as np
import pytest
from conftest import dir_digest

from benchmarks import fashion_scenes as fs
from benchmarks.fashion_scenes import (
    FASHION_CLASSES,
    FASHION_SPLITS,
    FashionSceneSpec,
    generate_fashion_split,
    load_fashion_mnist,
    register_fashion_datasets,
    render_fashion_scene,
)

_MISSING = [
    what
    for what, ok in (
        (f"Fashion-MNIST ({fs.FASHION_MNIST_DIR})", fs.FASHION_MNIST_DIR.is_dir()),
        ("background photos (opencv-doc)", bool(fs.background_paths())),
    )
    if not ok
]
pytestmark = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"{', '.join(_MISSING)} not installed; run tools/install_benchmark_data.sh",
)

SPEC = FashionSceneSpec(num_images=10, image_size=128, max_side=64)


def _scenes(split, spec=SPEC, n=40, return_masks=False):
    products, labels = load_fashion_mnist(fs.source_file(split))
    backgrounds = fs.load_backgrounds()
    return [
        render_fashion_scene(
            spec, np.random.default_rng([5, i]), products, labels, backgrounds, return_masks
        )
        for i in range(n)
    ]


def test_generation_is_deterministic_seeded_and_cached(tmp_path):
    a = generate_fashion_split(tmp_path / "a", "train", SPEC, seed=1)
    b = generate_fashion_split(tmp_path / "b", "train", SPEC, seed=1)
    c = generate_fashion_split(tmp_path / "c", "train", SPEC, seed=2)
    assert a.name == b.name != c.name
    assert dir_digest(a) == dir_digest(b) != dir_digest(c)
    assert len(list(a.glob("images/*.png"))) == SPEC.num_images
    mtime = (a / "annotations.json").stat().st_mtime_ns
    assert generate_fashion_split(tmp_path / "a", "train", SPEC, seed=1) == a
    assert (a / "annotations.json").stat().st_mtime_ns == mtime
    data = json.loads((a / "annotations.json").read_text())
    assert [c["name"] for c in data["categories"]] == list(FASHION_CLASSES)
    for ann in data["annotations"]:
        assert {"occluded", "blurred", "visible_fraction", "source_index"} <= ann.keys()
        assert ann["occluded"] == (ann["visible_fraction"] < SPEC.occluded_below)
        assert SPEC.min_visible <= ann["visible_fraction"] <= 1.0


def test_boxes_are_tight_boxes_of_visible_masks():
    n = 0
    for img, objs in _scenes("train", return_masks=True):
        assert img.shape == (128, 128, 3) and img.dtype == np.uint8
        for o in objs:
            x, y, w, h = o["bbox"]
            vis, full = o["visible_mask"], o["full_mask"]
            ys, xs = np.nonzero(vis)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
            assert not (vis & ~full).any()
            assert o["visible_fraction"] == pytest.approx(vis.sum() / full.sum(), abs=1e-4)
            assert o["occluded"] == (o["visible_fraction"] < SPEC.occluded_below)
            n += 1
    assert n > 150


def test_hand_check_one_object_box_from_its_product_silhouette():
    # a single unblurred object on a black background: its box must be the box of the resized
    # product's pixels with alpha > 0.5, i.e. brightness > 255 / 6, shifted to where it was pasted
    products, labels = load_fashion_mnist("t10k")
    black = (np.zeros((200, 200, 3), np.uint8),)
    spec = FashionSceneSpec(1, image_size=64, min_objects=1, max_objects=1, min_side=28,
                            max_side=28.0001, blur_prob=0.0)  # fmt: skip
    _, objs = render_fashion_scene(spec, np.random.default_rng(0), products, labels, black, True)
    (o,) = objs
    prod = products[o["source_index"]]
    ys, xs = np.nonzero(prod.astype(np.float32) / 255.0 * 3.0 > 0.5)
    full_ys, full_xs = np.nonzero(o["full_mask"])
    # 28 px side = no resampling; a flip only mirrors the product in x
    assert full_ys.max() - full_ys.min() == ys.max() - ys.min()
    assert full_xs.max() - full_xs.min() == xs.max() - xs.min()
    assert o["bbox"][2:] == [xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert o["visible_fraction"] == 1.0 and not o["occluded"]
    assert o["category_id"] == labels[o["source_index"]]


def test_val_objects_come_only_from_t10k_and_train_from_train(tmp_path):
    assert fs.source_file("val") == "t10k" and fs.source_file("train") == "train"
    n_t10k = len(load_fashion_mnist("t10k")[0])
    val = generate_fashion_split(tmp_path, "val", SPEC, seed=0)
    data = json.loads((val / "annotations.json").read_text())
    assert data["info"]["object_source"] == "fashion-mnist t10k"
    idx = [a["source_index"] for a in data["annotations"]]
    assert idx and max(idx) < n_t10k
    # labels recorded in the json are those of the t10k products
    labels = load_fashion_mnist("t10k")[1]
    assert all(labels[a["source_index"]] + 1 == a["category_id"] for a in data["annotations"])
    # train draws from the 60k file: indices beyond t10k's range do occur
    train_idx = [o["source_index"] for _, objs in _scenes("train") for o in objs]
    assert max(train_idx) >= n_t10k


def test_classes_balanced_sizes_blur_and_occlusion():
    spec = FashionSceneSpec(num_images=1)
    objs = [o for _, os_ in _scenes("val", spec=spec, n=100) for o in os_]
    assert 5 < len(objs) / 100 < 9  # about 7 boxes per image
    counts = np.bincount([o["category_id"] for o in objs], minlength=len(FASHION_CLASSES))
    assert counts.min() > 0.5 * counts.mean() and counts.max() < 1.5 * counts.mean()
    areas = np.array([o["bbox"][2] * o["bbox"][3] for o in objs])
    assert (areas < 32**2).mean() > 0.25 and ((areas >= 32**2) & (areas < 96**2)).mean() > 0.25
    assert 0.2 < np.mean([o["blurred"] for o in objs]) < 0.4
    assert np.mean([o["occluded"] for o in objs]) > 0.05


def test_missing_data_raises_with_install_hint(monkeypatch, tmp_path):
    monkeypatch.setattr(fs, "FASHION_MNIST_DIR", tmp_path / "nope")
    load_fashion_mnist.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
            generate_fashion_split(tmp_path, "train", SPEC, seed=0)
    finally:
        load_fashion_mnist.cache_clear()
    monkeypatch.setattr(fs, "BACKGROUND_DIRS", (tmp_path / "nope",))
    with pytest.raises(FileNotFoundError, match="opencv-doc"):
        fs.load_backgrounds()


def test_registered_tiny_split_loads_as_detectron2_dicts():
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.structures import BoxMode

    register_fashion_datasets()
    register_fashion_datasets()  # again: harmless
    dicts = DatasetCatalog.get("gkd_fashion_tiny_val")
    meta = MetadataCatalog.get("gkd_fashion_tiny_val")
    assert len(dicts) == 8 and all(d["height"] == d["width"] == 128 for d in dicts)
    assert meta.thing_classes == list(FASHION_CLASSES) and meta.evaluator_type == "coco"
    annos = [a for d in dicts for a in d["annotations"]]
    assert annos and all(a["bbox_mode"] == BoxMode.XYWH_ABS for a in annos)
    assert {a["category_id"] for a in annos} <= set(range(len(FASHION_CLASSES)))
    assert all({"occluded", "blurred", "visible_fraction"} <= a.keys() for a in annos)
    assert {"gkd_fashion_train", "gkd_fashion_val", "gkd_fashion_tiny_train"} <= set(
        DatasetCatalog.list()
    )


def test_a_shorter_split_is_the_first_images_of_the_longer(tmp_path):
    """gkd_fashion_train_<n> (the benchmark's distillation epochs) relies on a scene's RNG
    being its split, seed and index: n images are the first n of the 3000."""
    from PIL import Image

    short = generate_fashion_split(tmp_path, "train", FashionSceneSpec(4, 128, max_side=64), 0)
    long = generate_fashion_split(tmp_path, "train", FashionSceneSpec(7, 128, max_side=64), 0)
    a, b = (json.loads((d / "annotations.json").read_text()) for d in (short, long))
    assert len(a["images"]) == 4 and len(b["images"]) == 7
    assert a["annotations"] == [x for x in b["annotations"] if x["image_id"] in {1, 2, 3, 4}]
    for img in a["images"]:
        pixels = [np.asarray(Image.open(d / "images" / img["file_name"])) for d in (short, long)]
        assert np.array_equal(*pixels)
    full = FASHION_SPLITS["gkd_fashion_train"]
    for n in (120, 160, 240):
        split, spec, seed = FASHION_SPLITS[f"gkd_fashion_train_{n}"]
        assert (split, seed) == (full[0], full[2]) and spec.num_images == n
        assert spec == FashionSceneSpec(**{**vars(full[1]), "num_images": n})
