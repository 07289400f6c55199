"""Installing: the detectron2 that tools/install_detectron2.py built from the official source (main
at the pinned commit, or v0.6) with its C++ ops; the installer's sources and patches; and the
package metadata that ``pip install -e .`` reads."""

import configparser
import importlib.util
import os
import re
import sys
import tarfile

import numpy as np
import pytest
import torch
from conftest import REPO
from detectron2 import _C

spec = importlib.util.spec_from_file_location(
    "install_detectron2", REPO / "tools" / "install_detectron2.py"
)
inst = importlib.util.module_from_spec(spec)
spec.loader.exec_module(inst)


# ---- the installed build ---------------------------------------------------------------------
def test_build_marker_names_the_build():
    import detectron2
    from detectron2._gkd_d2_build import GKD_D2_BUILD

    assert detectron2.__version__ == "0.6"  # main says 0.6 too
    assert GKD_D2_BUILD["compiled"] is True
    assert _C.__file__.endswith(".so")  # the compiled extension
    assert GKD_D2_BUILD == inst.installed_build(sys.executable)
    assert GKD_D2_BUILD["patch_level"] == inst.PATCH_LEVEL


@pytest.mark.skipif(
    "DETECTRON2_SOURCE" not in os.environ, reason="DETECTRON2_SOURCE not set (make sets it)"
)
def test_installed_build_is_the_requested_one():
    """`make test DETECTRON2_SOURCE=...` tests the build it names, not another one."""
    build = inst.installed_build(sys.executable)
    assert build["source"] == inst.resolve_source(os.environ["DETECTRON2_SOURCE"])


def test_compiled_ops_run():
    """A rotated-box NMS and a deformable convolution: ops that only the C++ extension has."""
    from detectron2.layers import DeformConv, nms_rotated

    boxes = torch.tensor([[10.0, 10, 8, 4, 0], [10.0, 10, 8, 4, 5], [40.0, 40, 6, 6, 30]])
    keep = nms_rotated(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5)
    assert keep.tolist() == [0, 2]  # the second box overlaps the first almost entirely
    conv = DeformConv(2, 3, kernel_size=3, padding=1, bias=False)
    torch.nn.init.constant_(conv.weight, 1.0)
    x = torch.ones(1, 2, 5, 5)
    # zero offsets: an ordinary 3x3 convolution of ones, 2 channels x 9 taps = 18 inside
    out = conv(x, torch.zeros(1, 18, 5, 5))
    assert out[0, :, 2, 2].tolist() == [18.0, 18.0, 18.0]
    assert "GCC" in _C.get_compiler_version() or "clang" in _C.get_compiler_version().lower()


def test_collect_env_works():
    # default_setup() calls collect_env_info(), which reads _C
    from detectron2.utils.collect_env import collect_env_info

    info = collect_env_info()
    assert "detectron2" in info


def test_model_zoo_config_files_shipped():
    from detectron2 import model_zoo

    path = model_zoo.get_config_file("COCO-Detection/retinanet_R_101_FPN_3x.yaml")
    assert path.endswith("retinanet_R_101_FPN_3x.yaml")
    cfg = model_zoo.get_config("COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml")
    assert cfg.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"


def test_pillow_and_numpy_aliases_patched():
    from detectron2.data.build import print_instances_class_histogram
    from detectron2.data.transforms import ExtentTransform
    from PIL import Image

    t = ExtentTransform(src_rect=(0, 0, 8, 8), output_size=(4, 4))
    assert t.interp == Image.BILINEAR
    out = t.apply_image(np.zeros((8, 8, 3), np.uint8))
    assert out.shape == (4, 4, 3)
    # v0.6 uses np.int here (patched); every training data loader calls it
    print_instances_class_histogram([{"annotations": [{"category_id": 0}]}], ["a"])


def test_fast_cpp_cocoeval_equals_pycocotools():
    """detectron2's C++ COCOeval (COCOEvaluator's default) gives pycocotools' AP, all 12 numbers,
    on noisy detections of the tiny validation set (not only perfect ones)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation.fast_eval_api import COCOeval_opt
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    import gkd_d2  # noqa: F401

    DatasetCatalog.get("gkd_scenes_tiny_val")  # generated on first use
    gt = COCO(MetadataCatalog.get("gkd_scenes_tiny_val").json_file)
    rng = np.random.default_rng(0)
    dets = []
    for a in gt.dataset["annotations"]:
        x, y, w, h = a["bbox"]
        for _ in range(3):  # shifted copies with random scores: true and false positives
            dx, dy = rng.normal(0, 0.2 * w), rng.normal(0, 0.2 * h)
            dets.append(
                {
                    "image_id": a["image_id"],
                    "category_id": a["category_id"],
                    "bbox": [x + dx, y + dy, w, h],
                    "score": float(rng.uniform()),
                }
            )
    dt = gt.loadRes(dets)
    stats = {}
    for impl in (COCOeval_opt, COCOeval):
        ev = impl(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        stats[impl] = ev.stats
    fast, slow = stats[COCOeval_opt], stats[COCOeval]
    assert 0.05 < slow[0] < 0.95  # neither trivial nor perfect
    np.testing.assert_allclose(fast, slow, atol=1e-12)


def test_coco_evaluator_uses_the_fast_cocoeval(tmp_path):
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import COCOEvaluator

    import gkd_d2  # noqa: F401

    DatasetCatalog.get("gkd_scenes_tiny_val")  # generated on first use
    ev = COCOEvaluator(
        "gkd_scenes_tiny_val", tasks=("bbox",), distributed=False, output_dir=str(tmp_path)
    )
    assert ev._use_fast_impl is True


# ---- the installer: sources and patches --------------------------------------------------------
def snapshot(name: str):
    """The official snapshot ``name`` in the vendor folder beside the checkout (machines that
    build from git have none: the same patches are tested on a v0.6-like tree below)."""
    path = inst.VENDOR / name
    if not path.is_file():
        pytest.skip(f"no local snapshot {name} on this machine")
    return path


def v06_like_snapshot(folder) -> tuple:
    """A .tar.gz of a small tree with what the patches look for in v0.6: the model zoo's
    ``pkg_resources`` lines, 19 removed NumPy aliases and one ``Image.LINEAR``; and its sha256."""
    root = folder / "detectron2-fake"
    (root / "detectron2" / "layers" / "csrc").mkdir(parents=True)
    (root / "detectron2" / "layers" / "csrc" / "vision.cpp").write_text("// ops\n")
    (root / "setup.py").write_text("from setuptools import setup\n")
    (root / "detectron2" / "utils").mkdir()
    (root / "detectron2" / "utils" / "comm.py").write_text("def get_rank():\n    return 0\n")
    (root / "detectron2" / "model_zoo").mkdir()
    zoo = "import os\n" + "".join(old for old, _ in inst.ZOO_EDITS) + "\n"
    (root / "detectron2" / "model_zoo" / "model_zoo.py").write_text(zoo)
    aliases = ["np.int", "np.float", "np.str", "np.bool"] * 4 + ["np.int", "np.float", "np.bool"]
    (root / "detectron2" / "old.py").write_text(
        "import numpy as np\nfrom PIL import Image\n"
        + "".join(f"x{i} = {a}(0)\n" for i, a in enumerate(aliases))
        + "y = Image.LINEAR\nz = np.int64(0)  # not an alias\n"
    )
    path = folder / "detectron2-fake.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(root, arcname=root.name)
    return path, inst.sha256_of(path)


def test_v06_like_snapshot_checked_and_patched(tmp_path, monkeypatch):
    """The sha256 check of an unknown snapshot (DETECTRON2_SHA256), both patches and their
    idempotence, on every machine."""
    path, digest = v06_like_snapshot(tmp_path)
    monkeypatch.setenv("DETECTRON2_SHA256", "0" * 64)
    with pytest.raises(inst.PatchError, match=rf"{path}: sha256 {digest} does not match"):
        inst.unpack_source(str(path), tmp_path / "refused")
    monkeypatch.setenv("DETECTRON2_SHA256", digest)
    tree, build_id, what = inst.unpack_source(str(path), tmp_path / "src")
    assert build_id == "sha256-" + digest[:16] and what == "detectron2-fake.tar.gz (0.6)"
    assert inst.patch_source_tree(tree) == [
        "model_zoo without pkg_resources",
        "NumPy/Pillow aliases",
    ]
    old = (tree / "detectron2" / "old.py").read_text()
    assert "x0 = int(0)" in old and "x18 = bool(0)" in old and "z = np.int64(0)" in old
    assert "y = Image.BILINEAR" in old and not inst.NP_ALIAS.search(old)
    zoo = (tree / "detectron2" / "model_zoo" / "model_zoo.py").read_text()
    assert "pkg_resources" not in zoo and inst.ZOO_EDITS[1][1] in zoo
    assert inst.patch_source_tree(tree) == []  # a patched tree needs nothing more


@pytest.mark.parametrize(
    "name, patched",
    [
        ("detectron2-02b5c4e2.tar.gz", ["model_zoo without pkg_resources"]),
        ("detectron2-v0.6.tar.gz", ["model_zoo without pkg_resources", "NumPy/Pillow aliases"]),
    ],
)
def test_source_snapshot_checked_and_patched(name, patched, tmp_path):
    tree, build_id, what = inst.unpack_source(str(snapshot(name)), tmp_path)
    assert build_id == "sha256-" + inst.SNAPSHOTS[name][0][:16]
    assert what == inst.SNAPSHOTS[name][1]
    assert (tree / "detectron2" / "layers" / "csrc" / "vision.cpp").is_file()
    assert inst.patch_source_tree(tree) == patched
    text = "".join(p.read_text() for p in (tree / "detectron2").rglob("*.py"))
    assert "pkg_resources" not in text and not inst.NP_ALIAS.search(text)
    assert "Image.LINEAR" not in text
    assert inst.patch_source_tree(tree) == []  # a patched tree needs nothing more


def test_unexpected_tree_fails_loudly(tmp_path):
    """A v0.6-like tree with one more NumPy alias, or a model zoo written otherwise, is refused
    with the file and the difference named, never half-patched silently."""
    path, digest = v06_like_snapshot(tmp_path)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("DETECTRON2_SHA256", digest)
        tree, _, _ = inst.unpack_source(str(path), tmp_path / "src")
    extra = tree / "detectron2" / "utils" / "extra.py"
    extra.write_text("import numpy as np\nx = np.float(1)\n")
    with pytest.raises(inst.PatchError, match="found 20 removed NumPy aliases"):
        inst.patch_source_tree(tree)
    zoo = tree / "detectron2" / "model_zoo" / "model_zoo.py"
    zoo.write_text("import pkg_resources\n")
    with pytest.raises(inst.PatchError, match=r"model_zoo\.py: expected exactly one occurrence"):
        inst.patch_source_tree(tree)


def test_damaged_snapshot_is_refused_by_name(tmp_path):
    fake = tmp_path / "detectron2-02b5c4e2.tar.gz"
    with tarfile.open(fake, "w:gz") as tar:
        tar.add(REPO / "setup.cfg", arcname="detectron2-02b5c4e2/setup.cfg")
    with pytest.raises(inst.PatchError, match=rf"{fake}: sha256 [0-9a-f]{{64}} does not match"):
        inst.unpack_source(str(fake), tmp_path / "x")


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(inst.PatchError, match="'/no/such/detectron2': no such file or folder"):
        inst.unpack_source("/no/such/detectron2", tmp_path)
    with pytest.raises(inst.PatchError, match="'v0.7': no such file or folder .*'v0.6'"):
        inst.unpack_source(inst.resolve_source("v0.7"), tmp_path)
    with pytest.raises(inst.PatchError, match="a git source is git\\+URL@commit"):
        inst.unpack_source("git+https://example.com/detectron2.git", tmp_path)
    (tmp_path / "folder").mkdir()
    with pytest.raises(inst.PatchError, match="folder: not a detectron2 source tree"):
        inst.unpack_source(str(tmp_path / "folder"), tmp_path / "copy")
    with pytest.raises(inst.PatchError, match="not a detectron2 source tree"):
        inst.patch_source_tree(tmp_path / "folder")


@pytest.mark.parametrize("given, name", [("", "main"), ("main", "main"), ("v0.6", "v0.6")])
def test_named_sources(given, name):
    """Unset is main at the pinned commit; `v0.6` the release tag: each from its local snapshot
    when there is one, else from the official git repository at the full commit."""
    file, commit = inst.NAMED[name]
    source = inst.resolve_source(given)
    if (inst.VENDOR / file).is_file():
        assert source == str(inst.VENDOR / file)
        assert inst.SNAPSHOTS[file][1].split()[1] == commit[:8]
    else:
        assert source == f"git+{inst.OFFICIAL_GIT}@{commit}"
    assert inst.resolve_source("/some/folder") == "/some/folder"


# ---- package metadata ----------------------------------------------------------------------------
def install_requires() -> list[str]:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    lines = cfg["options"]["install_requires"].splitlines()
    return [re.split(r"[<>=!~;\[ ]", line.strip(), maxsplit=1)[0] for line in lines if line.strip()]


def test_install_requires_names_no_opencv():
    """OpenCV is one import (cv2) under several distributions (opencv-python, -headless,
    -contrib-python...); naming one would install a second OpenCV beside a user's own."""
    names = install_requires()
    assert "torch" in names and "detectron2" in names  # the parse found the list
    opencv = [n for n in names if re.sub(r"[-_.]+", "-", n.lower()).startswith("opencv")]
    assert not opencv, f"setup.cfg install_requires names OpenCV: {opencv}"
