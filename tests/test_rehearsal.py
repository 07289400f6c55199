"""Rehearsals of the paper configs (python -m tools.rehearse) and their stand-in data and
weights."""

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import REPO
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.checkpoint.c2_model_loading import convert_basic_c2_names
from detectron2.data import MetadataCatalog
from detectron2.data.datasets import load_coco_json, load_voc_instances
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.evaluation.pascal_voc_evaluation import parse_rec
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model

from gkd_d2.config import load_config
from gkd_d2.engine.results import read_results, write_results
from tools import rehearse
from tools.rehearsal import (
    IMAGE_SIZES,
    MIN_SIDE,
    RehearsalDataError,
    c2_name,
    calibrate_frozen_bn,
    write_builtin_splits,
    write_coco_split,
    write_voc_split,
    write_weights,
)

COCO_THINGS = [c for c in COCO_CATEGORIES if c["isthing"]]
VOC_CLASSES = list(MetadataCatalog.get("voc_2007_trainval").thing_classes)


def test_coco_stand_in_has_coco_ids_every_class_and_coco_sizes(tmp_path):
    ids = MetadataCatalog.get("coco_2017_train").thing_dataset_id_to_contiguous_id
    cats = [next(c for c in COCO_THINGS if c["id"] == i) for i in sorted(ids, key=ids.get)]
    n = write_coco_split(str(tmp_path / "a.json"), str(tmp_path / "im"), cats, 4, 20, seed=0)
    assert n == 80
    meta_name = "rehearsal_test_coco"
    dicts = load_coco_json(str(tmp_path / "a.json"), str(tmp_path / "im"), meta_name)
    meta = MetadataCatalog.get(meta_name)
    # COCO's own non-contiguous ids (1..90, 80 of them) and the builtin contiguous mapping
    assert meta.thing_dataset_id_to_contiguous_id == ids
    assert max(ids) == 90 and len(ids) == 80
    assert meta.thing_classes == list(MetadataCatalog.get("coco_2017_train").thing_classes)
    classes = [a["category_id"] for d in dicts for a in d["annotations"]]
    assert sorted(classes) == list(range(80))  # every class once (contiguous after loading)
    for d in dicts:
        assert (d["width"], d["height"]) in IMAGE_SIZES
        for a in d["annotations"]:
            x, y, w, h = a["bbox"]
            assert w >= MIN_SIDE and h >= MIN_SIDE  # above PGM's MIN_BOX_SIZE 30
            assert x >= 0 and y >= 0 and x + w <= d["width"] and y + h <= d["height"]


def test_voc_stand_in_reads_with_detectron2_loader_and_evaluator(tmp_path):
    n = write_voc_split(str(tmp_path), "trainval", VOC_CLASSES, 2, 20, seed=3)
    assert n == 40
    dicts = load_voc_instances(str(tmp_path), "trainval", VOC_CLASSES)
    assert len(dicts) == 2
    assert {a["category_id"] for d in dicts for a in d["annotations"]} == set(range(20))
    first = dicts[0]
    recs = parse_rec(str(tmp_path / "Annotations" / f"{first['image_id']}.xml"))
    assert len(recs) == 20 and recs[0]["difficult"] == 0
    # detectron2 reads 1-based VOC pixels as 0-based boxes: the written box comes back
    x0, y0, x1, y1 = first["annotations"][0]["bbox"]
    assert recs[0]["bbox"] == [int(x0) + 1, int(y0) + 1, int(x1), int(y1)]
    assert (tmp_path / "JPEGImages" / f"{first['image_id']}.jpg").is_file()


def test_stand_in_refuses_a_dataset_that_is_not_builtin_coco_or_voc():
    # (the embedded scenes have a COCO json too: never overwritten)
    with pytest.raises(RehearsalDataError, match=r"'gkd_scenes_train' \(DATASETS.TRAIN\) is not"):
        write_builtin_splits(["gkd_scenes_train"], [], 4, 2, 20)


def test_c2_names_invert_detectron2s_conversion():
    cfg = load_config(str(REPO / "configs" / "voc" / "retinanet_R_50_FPN.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    keys = list(build_model(cfg).backbone.bottom_up.state_dict())
    kept = [k for k in keys if c2_name(k) is not None]
    # only the FrozenBN statistics are left out (the ImageNet files hold scale and bias)
    assert all(k.endswith(("running_mean", "running_var")) for k in set(keys) - set(kept))
    assert convert_basic_c2_names([c2_name(k) for k in kept]) == kept


def r50_retinanet():
    cfg = load_config(str(REPO / "configs" / "voc" / "retinanet_R_50_FPN.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg, build_model(cfg)


def test_calibrated_frozen_bn_normalises_each_layer_and_loads_through_detectron2(tmp_path):
    torch.manual_seed(0)
    cfg, model = r50_retinanet()
    images = [{"image": torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8)} for _ in range(2)]
    with torch.no_grad():
        raw = model.backbone(model.preprocess_image(images).tensor)["p7"].abs().max()
    assert calibrate_frozen_bn(model, images) == 53  # R50: stem + 52 in the blocks
    outputs = []
    hooks = [
        # (cloned: the blocks apply ReLU in place after the norm)
        m.register_forward_hook(lambda _m, _i, out: outputs.append(out.clone()))
        for m in model.modules()
        if isinstance(m, FrozenBatchNorm2d)
    ]
    with torch.no_grad():
        feats = model.backbone(model.preprocess_image(images).tensor)
    for h in hooks:
        h.remove()
    for out in outputs:  # zero mean, unit variance per channel on the calibration images
        var, mean = torch.var_mean(out, dim=(0, 2, 3))
        assert mean.abs().max() < 1e-3 and (var - 1).abs().max() < 1e-2
    assert feats["p7"].abs().max() < raw / 100  # identity FrozenBN lets activations grow

    for shipped in ("detectron2://COCO-Detection/x/model_final.pkl", "out/model_final.pth"):
        path = write_weights(model, shipped, tmp_path, shipped.split(".")[-1])
        _, fresh = r50_retinanet()
        DetectionCheckpointer(fresh).load(str(path))
        for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
            assert torch.equal(a, b), k
    # the MSRA ImageNet format: Caffe2 names of the bottom-up ResNet, detectron2's heuristics
    path = write_weights(
        model, "detectron2://ImageNetPretrained/MSRA/R-50.pkl", tmp_path, "imagenet"
    )
    _, fresh = r50_retinanet()
    DetectionCheckpointer(fresh).load(str(path))
    ours = model.backbone.bottom_up.state_dict()
    for k, v in fresh.backbone.bottom_up.state_dict().items():
        if k.endswith("running_var"):  # not in Caffe2 files: detectron2 fills ones (not 1 - eps)
            assert torch.equal(v, torch.ones_like(v)), k
        else:
            assert torch.equal(v, ours[k]), k


def test_results_round_trip_and_compare_with_nan_as_none(tmp_path):
    """train_net.py's results.json: nan is written as null and read back as nan; the rehearsal
    keeps the summary metrics, nan as None, so that two evaluations compare equal."""
    results = {"bbox": {"AP": 3.5, "AP50": 4.0, "APs": float("nan"), "AP-circle": 7.0}}
    write_results(str(tmp_path), results)
    assert json.loads((tmp_path / "results.json").read_text())["bbox"]["APs"] is None
    back = read_results(str(tmp_path))
    assert back["bbox"]["AP"] == 3.5 and back["bbox"]["APs"] != back["bbox"]["APs"]  # nan
    expected = {"bbox": {"AP": 3.5, "AP50": 4.0, "APs": None}}
    assert rehearse.final_results(tmp_path) == expected


def run_rehearsal(config: str, output) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DETECTRON2_DATASETS"}
    # a module run from the repository root: it imports tools/rehearsal.py
    cmd = [sys.executable, "-m", "tools.rehearse", "--config-file", config]
    return subprocess.run(
        [*cmd, "--output", str(output)], cwd=REPO, env=env, capture_output=True, text=True
    )


def test_a_failed_stage_names_itself_and_what_to_fix(tmp_path):
    proc = run_rehearsal("configs/quickstart_gkd_retinanet_cpu.yaml", tmp_path)
    assert proc.returncode == 1
    assert "failed at stage 'data'" in proc.stderr
    assert "DATASETS.TRAIN" in proc.stderr and "configs/quickstart_gkd_retinanet_cpu.yaml" in (
        proc.stderr
    )


PAPER_CONFIGS = {
    "coco-retinanet": ("configs/gkd.yaml", 80),
    "coco-faster_rcnn": ("configs/gkd_faster_rcnn.yaml", 80),
    "voc-retinanet": ("configs/voc/gkd_retinanet.yaml", 20),
    "voc-faster_rcnn": ("configs/voc/gkd_faster_rcnn.yaml", 20),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(PAPER_CONFIGS))
def test_paper_config_rehearsal(case, tmp_path):
    """The shipped config at 800 px with R101 -> R50: teacher check, the epoch refresh over all
    classes and levels at 0 and 2, resume with a refresh at 4, eval-only, export, and stock
    detectron2's evaluation of the export equal to eval-only (about 3 minutes each)."""
    config, classes = PAPER_CONFIGS[case]
    proc = run_rehearsal(config, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["teacher_check"]["images"] == 2
    assert [r["iteration"] for r in summary["refreshes"]] == [0, 2]
    assert all(r["images"] == 4 and r["instances"] == 80 for r in summary["refreshes"])
    protos = summary["prototypes"]
    assert (protos["levels"], protos["classes"]) == (5, classes)
    assert protos["min_per_class_level"] >= 1 and protos["iteration_of_bank"] == 2
    assert summary["resume"] == {"started_at": 3, "refreshes": [4]}
    assert summary["eval_only"] and summary["plain_eval"] == summary["eval_only"]
    if case.startswith("coco"):
        assert summary["same_detections"] and summary["detections"] == 200  # 100 per image
    # the shipped input size: 800 px shorter side
    used = yaml.safe_load((tmp_path / "train" / "config.yaml").read_text())
    assert used["INPUT"]["MIN_SIZE_TEST"] == 800 and max(used["INPUT"]["MIN_SIZE_TRAIN"]) == 800
