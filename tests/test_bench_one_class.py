"""The one-class soft-label benchmark: its derived one-class splits and its tables (no training)."""

import json
import math

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog

from benchmarks import bench_one_class as b
from benchmarks.one_class_scenes import (
    ONE_CLASS_SPLITS,
    one_class_dicts,
    register_one_class_datasets,
    register_one_class_split,
)


def test_one_class_split_keeps_the_class_annotations_only():
    register_one_class_split("gkd_scenes_tiny_square_val", "gkd_scenes_tiny_val")
    register_one_class_split("gkd_scenes_tiny_square_val", "gkd_scenes_tiny_val")  # harmless
    base = DatasetCatalog.get("gkd_scenes_tiny_val")
    derived = DatasetCatalog.get("gkd_scenes_tiny_square_val")
    square = MetadataCatalog.get("gkd_scenes_tiny_val").thing_classes.index("square")
    assert len(derived) == len(base)
    kept = 0
    for d, o in zip(derived, base):
        assert {k: v for k, v in d.items() if k != "annotations"} == {
            k: v for k, v in o.items() if k != "annotations"
        }
        want = [{**a, "category_id": 0} for a in o["annotations"] if a["category_id"] == square]
        assert d["annotations"] == want
        kept += len(want)
    assert 0 < kept < sum(len(o["annotations"]) for o in base)  # squares and others in the split
    # the base dicts are not modified
    assert any(
        a["category_id"] != 0
        for o in DatasetCatalog.get("gkd_scenes_tiny_val")
        for a in o["annotations"]
    )
    meta = MetadataCatalog.get("gkd_scenes_tiny_square_val")
    assert meta.thing_classes == ["square"]
    assert meta.evaluator_type == "coco"
    assert not hasattr(meta, "json_file")  # COCOEvaluator converts the dicts


def test_one_class_dicts_leaves_its_input_alone():
    dicts = [{"image_id": 1, "annotations": [{"category_id": 1}, {"category_id": 2}]}]
    assert one_class_dicts(dicts, 2) == [{"image_id": 1, "annotations": [{"category_id": 0}]}]
    assert dicts[0]["annotations"] == [{"category_id": 1}, {"category_id": 2}]


def test_benchmark_splits_register_without_loading():
    register_one_class_datasets()
    register_one_class_datasets()  # again: harmless
    for name in ONE_CLASS_SPLITS:
        assert name in DatasetCatalog.list()
        assert MetadataCatalog.get(name).thing_classes == ["square"]
    with pytest.raises(KeyError, match="not a class"):
        register_one_class_split("gkd_scenes_tiny_nothing_val", "gkd_scenes_tiny_val", "nothing")


def test_arms_and_their_overrides():
    assert len(b.ARMS) == 7
    assert b.arm_overrides(b.ALONE, 0.1) == ["MODEL.META_ARCHITECTURE", "RetinaNet"]
    assert b.arm_overrides("GKD, soft off", 0.1) == ["MODEL.GKD.SOFT_WEIGHT", "0.0"]
    assert b.arm_overrides("local-only KD, sigmoid x w_c", 0.03) == [
        "MODEL.GKD.ROBUST_WEIGHTS",
        "False",
        "MODEL.GKD.SOFT_LABEL",
        "sigmoid",
        "MODEL.GKD.SOFT_WEIGHT",
        "0.03",
    ]
    with pytest.raises(KeyError):
        b.arm_overrides("GKD, softmax", 1.0)
    assert b.one_significant_figure(0.0347) == 0.03
    assert b.one_significant_figure(2.71) == 3.0
    pairs = [p for ps in b.comparisons().values() for p in ps]
    assert ("GKD, sigmoid x1", "GKD, soft off") in pairs
    assert ("GKD, sigmoid x w_c", "local-only KD, sigmoid x w_c") in pairs
    assert len(pairs) == 4 + 3 + 6


def _run(ap, **extra):
    return {
        "AP": ap,
        "AP50": 2 * ap,
        "APs": ap / 2,
        "APm": ap,
        "APl": None,
        "minutes": 2.0,
        **extra,
    }


def test_tables_on_hand_made_numbers(tmp_path):
    # GKD sigmoid x1 is 1, 2, 3 below GKD soft off (AP 5, 6, 7); the student alone at 1
    runs = {}
    for s, ap in enumerate([5.0, 6.0, 7.0]):
        runs[f"GKD, soft off | seed {s}"] = _run(ap)
        runs[f"GKD, sigmoid x1 | seed {s}"] = _run(ap - s - 1, run_dir=f"runs/x1_seed{s}")
        runs[f"{b.ALONE} | seed {s}"] = _run(1.0)
    (tmp_path / "runs" / "x1_seed0").mkdir(parents=True)
    (tmp_path / "runs" / "x1_seed0" / "metrics.json").write_text(
        "\n".join(
            json.dumps({"iteration": i, "loss_cls": 0.5, "loss_box_reg": 0.4, "loss_gkd_soft": 9.0})
            for i in (19, 99)
        )
    )
    st = b.summarise(runs, 3)
    assert st["GKD, soft off"]["AP"] == (6.0, 1.0)
    assert st["GKD, sigmoid x1"]["AP"] == (4.0, 0.0)
    assert math.isnan(st["GKD, soft off"]["APl"][0])  # null (nan) APl
    assert "local-only KD, soft off" not in st  # no run: no row
    p = b.paired(runs, 3, [("GKD, sigmoid x1", "GKD, soft off")])
    d = p["GKD, sigmoid x1"]["GKD, soft off"]["AP"]
    assert (d["n"], d["mean"]) == (3, -2.0)
    # t quantile 4.303 (df 2) x standard error 1 / sqrt(3)
    assert d["lo"] == pytest.approx(-2.0 - 4.3027 / 3**0.5, abs=1e-3)
    assert p["GKD, sigmoid x1"]["GKD, soft off"]["AP50"]["mean"] == -4.0
    results = {
        "teacher": {**_run(20.0), "minutes": None},
        "w_c": {"w_c": 0.03, "ratio": 0.0347, "iterations": 20, "mean loss_gkd_soft": {"a": 0.1}},
        "runs": runs,
    }
    text = b.report(results, 3, tmp_path)
    assert (tmp_path / "table.md").read_text() == text + "\n"
    assert "w_c = 0.03" in text
    assert "| teacher (800 it, 1 run) | 20.0 | 40.0 | 10.0 | 20.0 | - | - |" in text
    assert "| GKD, soft off (3 seeds) | 6.0 +- 1.0 |" in text
    assert "| GKD, sigmoid x1 - GKD, soft off | -2.00 [-4.48, +0.48] (p 0.07, n 3) |" in text
    assert "| GKD, soft off - student alone | +5.00 [+2.52, +7.48] (p 0.01, n 3) |" in text
    assert "| GKD, sigmoid x1 | 99 | 0.500 | 0.400 | - | - | 9.000 | - |" in text
    assert "| GKD, sigmoid x1 | 199 | - | - | - | - | - | - |" in text
    paired = json.loads((tmp_path / "paired.json").read_text())
    assert "GKD - local-only KD, at each soft variant" in paired


# round 2: --keep-class and --student


def test_splits_of_every_class_register_by_name():
    from benchmarks.one_class_scenes import one_class_splits

    assert one_class_splits("ring") == {
        "gkd_scenes_ring_train": "gkd_scenes_train",
        "gkd_scenes_ring_val": "gkd_scenes_val",
    }
    assert one_class_splits() == ONE_CLASS_SPLITS  # the first round's: square
    register_one_class_datasets()
    for keep in ("ring", "circle"):
        for name in one_class_splits(keep):
            assert MetadataCatalog.get(name).thing_classes == [keep]
    assert b.dataset_overrides("ring") == [
        "DATASETS.TRAIN",
        '("gkd_scenes_ring_train",)',
        "DATASETS.TEST",
        '("gkd_scenes_ring_val",)',
    ]


def test_outputs_are_keyed_by_class_and_student(tmp_path):
    assert b.default_output("square", "r18") == b.REPO / "output" / "bench_one_class"  # round 1
    assert b.default_output("ring", "mobilenet").name == "bench_one_class_ring_mobilenet"
    mb = b.OneClassBench(tmp_path / "ring_mb", 3, 1, "ring", "mobilenet")
    assert mb.student_cfg == "configs/bench/scenes_one_class_gkd_mobilenet.yaml"
    # one teacher per class: the r18 benchmark's
    assert mb.teacher_dir == b.default_output("ring", "r18") / "teacher"
    r18 = b.OneClassBench(tmp_path / "ring_r18", 3, 1, "ring", "r18")
    assert r18.teacher_dir == tmp_path / "ring_r18" / "teacher"
    assert r18.student_cfg == b.STUDENT_CFG
    assert "gkd_scenes_ring_val" in " ".join(r18.data)
    # a first-round results.json (no class, no student) is square's and r18's
    first = tmp_path / "first"
    first.mkdir()
    (first / "results.json").write_text(json.dumps({"w_c": {"w_c": 0.02}, "runs": {}}))
    assert b.OneClassBench(first, 3, 1).results["keep_class"] == "square"
    with pytest.raises(SystemExit, match="keep_class 'square'"):
        b.OneClassBench(first, 3, 1, "ring", "r18")
    r18.save()
    with pytest.raises(SystemExit, match="student 'r18'"):
        b.OneClassBench(tmp_path / "ring_r18", 3, 1, "ring", "mobilenet")


def test_max_minutes_starts_no_run(tmp_path, monkeypatch):
    bench = b.OneClassBench(tmp_path, 1, 1, "ring", "r18", max_minutes=-1.0)
    monkeypatch.setattr(b, "train_net", lambda *a, **k: pytest.fail("a run was started"))
    bench.run_arm(b.ALONE, 0, tmp_path / "t.pth", 0.02)
    assert bench.results["runs"] == {}


def test_report_title_names_class_and_student(tmp_path):
    text = b.report({"keep_class": "ring", "student": "mobilenet", "runs": {}}, 3, tmp_path)
    assert text.startswith(
        "### One-class scenes (ring), ImageNet MobileNetV2-FPN RetinaNet student, 300 iterations"
    )
    assert b.report({"runs": {}}, 3, tmp_path).startswith(
        "### One-class scenes (square), quarter-width RetinaNet student"
    )


def test_mobilenet_student_config():
    from gkd_d2.config import load_config

    config = str(b.REPO / "configs/bench/scenes_one_class_gkd_mobilenet.yaml")
    cfg = load_config(config, b.dataset_overrides("ring"))
    assert cfg.MODEL.BACKBONE.NAME == "build_retinanet_mobilenetv2_fpn_backbone"
    assert cfg.MODEL.MOBILENETV2.PRETRAINED == "imagenet"
    assert cfg.MODEL.MOBILENETV2.NORM == "FrozenBN"
    assert cfg.INPUT.FORMAT == "RGB"
    assert list(cfg.MODEL.PIXEL_MEAN) == [123.675, 116.28, 103.53]
    assert (cfg.MODEL.FPN.OUT_CHANNELS, cfg.MODEL.RETINANET.NUM_CONVS) == (64, 1)
    assert cfg.MODEL.RETINANET.NUM_CLASSES == 1
    assert cfg.MODEL.META_ARCHITECTURE == "GKDRetinaNet"
    assert (cfg.SOLVER.MAX_ITER, cfg.INPUT.MIN_SIZE_TEST) == (300, 160)
    assert cfg.MODEL.TEACHER.CONFIG_FILE.endswith("configs/bench/scenes_one_class_teacher.yaml")
    assert cfg.DATASETS.TRAIN == ("gkd_scenes_ring_train",)
