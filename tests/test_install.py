"""The detectron2 that tools/install_detectron2.py installed: compiled from the official source,
or the patched pure-Python 0.6 fallback. A test of what one build alone has is skipped on the
other."""

import numpy as np
import pytest
import torch
from detectron2 import _C

PURE_PYTHON = getattr(_C, "PURE_PYTHON_STANDIN", False)
pure_only = pytest.mark.skipif(not PURE_PYTHON, reason="the compiled build has no stand-in")
compiled_only = pytest.mark.skipif(PURE_PYTHON, reason="the pure-Python build has no C++ ops")


def test_build_marker_names_the_build():
    import detectron2
    from detectron2._gkd_d2_build import GKD_D2_BUILD

    assert detectron2.__version__ == "0.6"  # main says 0.6 too
    assert GKD_D2_BUILD["compiled"] is (not PURE_PYTHON)
    assert (GKD_D2_BUILD["source"] == "pypi") is PURE_PYTHON
    # the compiled build's _C is the extension module, the fallback's the stand-in
    assert _C.__file__.endswith(".py" if PURE_PYTHON else ".so")


@pure_only
def test_detectron2_imports_with_standin():
    assert _C.PURE_PYTHON_STANDIN is True
    assert "pure-Python" in _C.get_compiler_version()
    assert _C.has_cuda() is False


@pure_only
def test_standin_raises_clear_error_for_compiled_ops():
    with pytest.raises(NotImplementedError, match=r"_C\.nms_rotated is a compiled op"):
        _C.nms_rotated  # noqa: B018
    # the op that the unpatched COCOeval_opt would reach for
    with pytest.raises(NotImplementedError, match="InstanceAnnotation"):
        _C.InstanceAnnotation  # noqa: B018


@compiled_only
def test_compiled_ops_run():
    """A rotated-box NMS and a deformable convolution: ops only the C++ build has."""
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
    assert ("pure-Python" in info) is PURE_PYTHON


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
    # used np.int before the patch
    print_instances_class_histogram([{"annotations": [{"category_id": 0}]}], ["a"])


@pure_only
def test_coco_evaluator_falls_back_to_pycocotools(tmp_path):
    """Perfect predictions through COCOEvaluator give AP 100 without the C++ COCOeval."""
    from detectron2.data import DatasetCatalog
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import Boxes, BoxMode, Instances

    import gkd_d2  # noqa: F401

    name = "gkd_scenes_tiny_val"
    dicts = DatasetCatalog.get(name)
    evaluator = COCOEvaluator(name, tasks=("bbox",), distributed=False, output_dir=str(tmp_path))
    assert evaluator._use_fast_impl is False
    evaluator.reset()
    for d in dicts:
        boxes = [
            BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in d["annotations"]
        ]
        inst = Instances((d["height"], d["width"]))
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.ones(len(boxes))
        inst.pred_classes = torch.tensor(
            [a["category_id"] for a in d["annotations"]], dtype=torch.long
        )
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    res = evaluator.evaluate()
    assert res["bbox"]["AP"] == pytest.approx(100.0)
    assert res["bbox"]["AP50"] == pytest.approx(100.0)


@pure_only
def test_direct_coco_evaluation_with_fast_impl_requested_uses_pycocotools():
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation.coco_evaluation import _evaluate_predictions_on_coco
    from pycocotools.coco import COCO

    import gkd_d2  # noqa: F401

    gt = COCO(MetadataCatalog.get("gkd_scenes_tiny_val").json_file)
    dets = [
        {
            "image_id": a["image_id"],
            "category_id": a["category_id"],
            "bbox": a["bbox"],
            "score": 1.0,
        }
        for a in gt.dataset["annotations"]
    ]
    ev = _evaluate_predictions_on_coco(gt, dets, "bbox", use_fast_impl=True)
    assert type(ev).__name__ == "COCOeval"
    assert ev.stats[0] == pytest.approx(1.0)


@compiled_only
def test_fast_cpp_cocoeval_equals_pycocotools():
    """detectron2's C++ COCOeval (COCOEvaluator's default when compiled) gives pycocotools' AP,
    all 12 numbers, on noisy detections of the tiny validation set (not only perfect ones)."""
    from detectron2.data import MetadataCatalog
    from detectron2.evaluation.fast_eval_api import COCOeval_opt
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    import gkd_d2  # noqa: F401

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


@compiled_only
def test_coco_evaluator_uses_the_fast_cocoeval(tmp_path):
    from detectron2.evaluation import COCOEvaluator

    import gkd_d2  # noqa: F401

    ev = COCOEvaluator(
        "gkd_scenes_tiny_val", tasks=("bbox",), distributed=False, output_dir=str(tmp_path)
    )
    assert ev._use_fast_impl is True
