"""The patched pure-Python detectron2 0.6 that tools/install_detectron2.py installs."""

import numpy as np
import pytest
import torch


def test_detectron2_imports_with_standin():
    import detectron2
    from detectron2 import _C

    assert detectron2.__version__ == "0.6"
    assert _C.PURE_PYTHON_STANDIN is True
    assert "pure-Python" in _C.get_compiler_version()
    assert _C.has_cuda() is False


def test_standin_raises_clear_error_for_compiled_ops():
    from detectron2 import _C

    with pytest.raises(NotImplementedError, match=r"_C\.nms_rotated is a compiled op"):
        _C.nms_rotated  # noqa: B018
    # the op that the unpatched COCOeval_opt would reach for
    with pytest.raises(NotImplementedError, match="InstanceAnnotation"):
        _C.InstanceAnnotation  # noqa: B018


def test_collect_env_works():
    # default_setup() calls collect_env_info(), which reads the _C stand-in
    from detectron2.utils.collect_env import collect_env_info

    info = collect_env_info()
    assert "detectron2" in info and "pure-Python" in info


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
