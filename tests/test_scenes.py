"""The embedded scene generator and its detectron2 registration."""

import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, dir_digest

from gkd_d2.data import SHAPE_CLASSES, SceneSpec, generate_split, render_scene

SPEC = SceneSpec(num_images=12, image_size=96, max_objects=9, min_side=8, max_side=70)


def _scenes(spec, n=40, **kw):
    return [render_scene(spec, np.random.default_rng([7, i]), **kw) for i in range(n)]


def test_boxes_are_tight_boxes_of_visible_masks_inside_image():
    n_objects = 0
    for img, objs in _scenes(SPEC, return_masks=True):
        assert img.shape == (96, 96, 3) and img.dtype == np.uint8
        for o in objs:
            x, y, w, h = o["bbox"]
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 96 and y + h <= 96
            vis, full = o["visible_mask"], o["full_mask"]
            ys, xs = np.nonzero(vis)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
            assert not (vis & ~full).any()
            assert o["visible_fraction"] == pytest.approx(vis.sum() / full.sum(), abs=1e-4)
            assert o["occluded"] == (o["visible_fraction"] < SPEC.occluded_below)
            assert 0 <= o["category_id"] < len(SHAPE_CLASSES)
            n_objects += 1
    assert n_objects > 100


def test_visible_masks_do_not_overlap_and_later_objects_occlude_earlier():
    for _, objs in _scenes(SPEC, return_masks=True):
        for i, a in enumerate(objs):
            for b in objs[i + 1 :]:
                assert not (a["visible_mask"] & b["visible_mask"]).any()
                # what a later object covers is hidden in the earlier one
                assert not (a["visible_mask"] & b["full_mask"]).any()


def test_visible_area_rule_drops_exactly_the_mostly_hidden_objects():
    # min_visible does not change what is drawn, only which objects are kept
    keep_all = dataclasses.replace(SPEC, min_visible=0.0)
    dropped = 0
    for (img_all, all_objs), (img, objs) in zip(_scenes(keep_all), _scenes(SPEC)):
        np.testing.assert_array_equal(img_all, img)
        expected = [o for o in all_objs if o["visible_fraction"] >= SPEC.min_visible]
        assert objs == expected
        dropped += len(all_objs) - len(objs)
    assert dropped > 0, "the test scenes should contain heavily occluded objects"


def test_scenes_have_small_to_large_blurred_and_occluded_objects():
    objs = [o for _, os_ in _scenes(SceneSpec(num_images=1), n=200) for o in os_]
    areas = np.array([o["bbox"][2] * o["bbox"][3] for o in objs])
    assert (areas < 32**2).mean() > 0.3 and (areas > 96**2).sum() > 0
    assert 0.1 < np.mean([o["blurred"] for o in objs]) < 0.4
    assert np.mean([o["occluded"] for o in objs]) > 0.05
    assert {o["category_id"] for o in objs} == set(range(len(SHAPE_CLASSES)))


def test_generation_is_deterministic_and_seeded(tmp_path):
    a = generate_split(tmp_path / "a", "train", SPEC, seed=3)
    b = generate_split(tmp_path / "b", "train", SPEC, seed=3)
    c = generate_split(tmp_path / "c", "train", SPEC, seed=4)
    val = generate_split(tmp_path / "a", "val", SPEC, seed=3)
    assert a.name == b.name != c.name
    assert dir_digest(a) == dir_digest(b)
    assert dir_digest(a) != dir_digest(c)
    # train and val splits draw different images
    assert (a / "images" / "000000.png").read_bytes() != (
        val / "images" / "000000.png"
    ).read_bytes()
    assert len(list(a.glob("images/*.png"))) == SPEC.num_images
    # reused, not regenerated
    mtime = (a / "annotations.json").stat().st_mtime_ns
    assert generate_split(tmp_path / "a", "train", SPEC, seed=3) == a
    assert (a / "annotations.json").stat().st_mtime_ns == mtime


def test_ground_truth_scores_ap_one_with_pycocotools(tmp_path):
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    folder = generate_split(tmp_path, "val", SPEC, seed=0)
    gt = COCO(str(folder / "annotations.json"))
    data = json.loads((folder / "annotations.json").read_text())
    assert [c["name"] for c in data["categories"]] == list(SHAPE_CLASSES)
    dets = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 1.0,
        }
        for a in data["annotations"]
    ]
    ev = COCOeval(gt, gt.loadRes(dets), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    assert ev.stats[0] == pytest.approx(1.0)  # AP
    assert ev.stats[1] == pytest.approx(1.0)  # AP50


# run in a fresh interpreter: which datasets `import gkd_d2` registers, and which directories
# and files outside Python's installation and the working directory it lists or opens
IMPORT_PROBE = """
import json, os, sys, tempfile
touched = []
sys.addaudithook(
    lambda event, args: touched.append(str(args[0]))
    if event in ("os.listdir", "os.scandir", "open") and args and isinstance(args[0], str)
    else None
)
from detectron2.data import DatasetCatalog
before = set(DatasetCatalog.list())
import gkd_d2
roots = [os.path.abspath(p) for p in sys.path if p] + [sys.prefix, sys.base_prefix, os.getcwd()]
outside = [
    p for p in touched
    if not os.path.abspath(p).startswith((*roots, tempfile.gettempdir(), "/proc/", "/dev/"))
]
print(json.dumps({"added": sorted(set(DatasetCatalog.list()) - before), "outside": outside}))
"""


def test_import_registers_the_quickstart_splits_and_reads_nothing_outside(tmp_path):
    """``import gkd_d2``: the quick-start splits only (the tests' and the benchmark's register
    elsewhere), generated on first load, and no directory outside the project listed (the
    Fashion-MNIST benchmark's background photos are listed when the benchmark registers)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["DETECTRON2_DATASETS"] = str(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_PROBE],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = json.loads(proc.stdout.strip().splitlines()[-1])
    assert probe["added"] == ["gkd_scenes_train", "gkd_scenes_val"]
    assert probe["outside"] == []
    assert list(tmp_path.iterdir()) == []  # nothing generated


def test_registered_dataset_loads_as_detectron2_dicts():
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.structures import BoxMode

    dicts = DatasetCatalog.get("gkd_scenes_tiny_train")
    meta = MetadataCatalog.get("gkd_scenes_tiny_train")
    assert len(dicts) == 32
    assert meta.thing_classes == list(SHAPE_CLASSES) and meta.evaluator_type == "coco"
    annos = [a for d in dicts for a in d["annotations"]]
    assert annos and all(a["bbox_mode"] == BoxMode.XYWH_ABS for a in annos)
    assert {a["category_id"] for a in annos} <= set(range(len(SHAPE_CLASSES)))
    assert all({"occluded", "blurred", "visible_fraction"} <= a.keys() for a in annos)
    assert all(d["height"] == d["width"] == 128 for d in dicts)


def test_opencv_is_needed_only_to_generate(tmp_path):
    """`pip install -e .` installs no OpenCV (a detectron2 user has one under one of its
    names): without it gkd_d2 imports, and only the scene generator asks for it, naming the
    package to install."""
    code = (
        "import sys; sys.modules['cv2'] = None\n"
        "import numpy as np, gkd_d2\n"
        "from gkd_d2.data.scenes import SceneSpec, render_scene\n"
        "try:\n"
        "    render_scene(SceneSpec(num_images=1), np.random.default_rng(0))\n"
        "except ImportError as e:\n"
        "    print('ERROR', e)\n"
    )
    env = {**os.environ, "DETECTRON2_DATASETS": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ERROR" in out.stdout and "pip install opencv-python-headless" in out.stdout
