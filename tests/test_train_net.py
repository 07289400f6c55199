"""train_net.py end to end on the CPU: train, evaluate, resume, eval-only; and the launcher."""

import json
import os
import subprocess
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO, TINY_CONFIG, TINY_ENV, setup_test_cfg


def run(python, *argv, timeout=600):
    """``python *argv`` from the repository root, the tiny test splits registered in it."""
    proc = subprocess.run(
        [python, *argv],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore", **TINY_ENV},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def metrics_iterations(out):
    rows = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    return [r["iteration"] for r in rows if "total_loss" in r]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, python):
    """4 iterations with a checkpoint every 2, then evaluation on the tiny val split."""
    out = tmp_path_factory.mktemp("train")
    log = run(
        python,
        "train_net.py",
        "--config-file",
        str(TINY_CONFIG),
        "OUTPUT_DIR",
        str(out),
        "SOLVER.MAX_ITER",
        "4",
        "TEST.EVAL_PERIOD",
        "0",
    )
    return out, log


def test_trainer_returns_final_evaluation(tmp_path):
    from gkd_d2.engine import Trainer

    cfg = setup_test_cfg(TINY_CONFIG, "OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "1")
    results = Trainer(cfg).train()
    assert set(results["bbox"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    assert 0.0 <= results["bbox"]["AP50"] <= 100.0


def test_train_writes_checkpoints_and_evaluates(trained):
    out, log = trained
    assert (out / "model_0000001.pth").is_file() and (out / "model_final.pth").is_file()
    assert (out / "last_checkpoint").read_text().strip() == "model_final.pth"
    ckpt = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == 3
    assert {"model", "trainer", "iteration"} <= ckpt.keys()
    # optimizer (momentum) and LR scheduler state, needed for an exact resume
    assert ckpt["trainer"]["_trainer"]["optimizer"]["state"]
    assert ckpt["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == 4
    assert metrics_iterations(out)[-1] == 3
    # COCO AP table printed by COCOEvaluator at the end of training, by detectron2's C++ COCOeval
    assert "Evaluation results for bbox" in log and "|  AP   |  AP50  |" in log
    assert "Evaluating predictions with unofficial COCO API" in log
    assert (out / "inference" / "gkd_scenes_tiny_val" / "coco_instances_results.json").is_file()


def test_resume_continues_from_last_checkpoint(trained, tmp_path, python):
    src, _ = trained
    out = tmp_path / "resumed"
    out.mkdir()
    for name in ("model_final.pth", "last_checkpoint", "metrics.json"):
        (out / name).write_bytes((src / name).read_bytes())
    log = run(
        python,
        "train_net.py",
        "--config-file",
        str(TINY_CONFIG),
        "--resume",
        "OUTPUT_DIR",
        str(out),
        "SOLVER.MAX_ITER",
        "7",
        "TEST.EVAL_PERIOD",
        "0",
    )
    assert f"Loading from {out / 'model_final.pth'}" in log
    assert "Starting training from iteration 4" in log
    # one row from the first run (its last iteration), one from the resumed run
    assert metrics_iterations(out) == [3, 6]
    ckpt = torch.load(out / "model_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == 6


def test_eval_only_reproduces_final_evaluation(trained, tmp_path, python):
    from gkd_d2.engine.results import read_results

    src, _ = trained
    run(
        python,
        "train_net.py",
        "--config-file",
        str(TINY_CONFIG),
        "--eval-only",
        "MODEL.WEIGHTS",
        str(src / "model_final.pth"),
        "OUTPUT_DIR",
        str(tmp_path),
    )
    # each run's results.json (nan dumped as NaN on both sides, so that they compare)
    assert read_results(str(tmp_path))["bbox"]
    assert json.dumps(read_results(str(tmp_path))) == json.dumps(read_results(str(src)))


def test_two_cpu_processes_end_with_identical_parameters(tmp_path, python):
    run(
        python,
        "tests/helpers/dist_train.py",
        str(tmp_path),
        "2",
        "SOLVER.MAX_ITER",
        "3",
        "SOLVER.IMS_PER_BATCH",
        "4",
    )
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert (r0["rank"], r1["rank"]) == (0, 1) and (r0["local_rank"], r1["local_rank"]) == (0, 1)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["threads"] == r1["threads"] == 1
    assert r0["ddp"] == r1["ddp"] == "DistributedDataParallel"
    # DDP of a CPU module takes no device ids: detectron2's create_ddp_model was wrapped while
    # DefaultTrainer's constructor ran, and detectron2's modules hold their own names again
    assert r0["ddp_device_ids"] is None and r1["ddp_device_ids"] is None
    assert r0["patch_in_init"] and r1["patch_in_init"]
    assert r0["detectron2_changed"] == r1["detectron2_changed"] == []
    assert r0["final"].keys() == r1["final"].keys()
    changed = 0
    for k, v in r0["final"].items():
        assert torch.equal(v, r1["final"][k]), k
        assert torch.equal(r0["initial"][k], r1["initial"][k]), k
        changed += not torch.equal(v, r0["initial"][k])
    assert changed > len(r0["final"]) // 2


def test_launch_rejects_bad_counts():
    from gkd_d2.engine import launch

    with pytest.raises(ValueError, match="must be >= 1"):
        launch(print, 0)
    with pytest.raises(ValueError, match="one machine only"):
        launch(print, 1, num_machines=2, dist_url="auto")


def test_single_process_launch_runs_in_place():
    from gkd_d2.engine import launch

    assert launch(lambda x: x + 1, 1, args=(41,)) == 42


def test_setup_falls_back_to_cpu(tmp_path):
    from gkd_d2.engine import setup_cfg

    args = SimpleNamespace(
        config_file=str(TINY_CONFIG),
        eval_only=False,
        resume=False,
        opts=["MODEL.DEVICE", "cuda", "OUTPUT_DIR", str(tmp_path)],
    )
    cfg = setup_cfg(args)
    assert cfg.MODEL.DEVICE == ("cuda" if torch.cuda.is_available() else "cpu")
    assert cfg.NUM_THREADS == 0
    assert (tmp_path / "config.yaml").is_file()


def test_evaluator_by_dataset_type_and_clear_error(tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator

    from gkd_d2.engine import Trainer

    cfg = setup_test_cfg(TINY_CONFIG, "OUTPUT_DIR", str(tmp_path))
    assert isinstance(Trainer.build_evaluator(cfg, "gkd_scenes_tiny_val"), COCOEvaluator)
    assert isinstance(Trainer.build_evaluator(cfg, "voc_2007_test"), PascalVOCDetectionEvaluator)
    DatasetCatalog.register("untyped_set", list)
    with pytest.raises(ValueError, match="'untyped_set'.*evaluator_type is None"):
        Trainer.build_evaluator(cfg, "untyped_set")
    MetadataCatalog.remove("untyped_set")
    DatasetCatalog.remove("untyped_set")


def test_base_faster_rcnn_config_trains_on_cpu(tmp_path, python):
    """configs/Base-RCNN-FPN.yaml with the narrow backbone: 2 iterations, then COCO evaluation."""
    log = run(
        python,
        "train_net.py",
        "--config-file",
        str(REPO / "configs" / "Base-RCNN-FPN.yaml"),
        *"MODEL.DEVICE cpu MODEL.WEIGHTS '' MODEL.BACKBONE.NAME build_basic_resnet_fpn_backbone "
        "MODEL.BACKBONE.FREEZE_AT 0 MODEL.RESNETS.DEPTH 18 MODEL.RESNETS.NORM BN "
        "MODEL.RESNETS.STEM_OUT_CHANNELS 16 MODEL.RESNETS.RES2_OUT_CHANNELS 16 "
        "MODEL.FPN.OUT_CHANNELS 32 MODEL.ROI_HEADS.NUM_CLASSES 6 "
        "MODEL.ROI_HEADS.SCORE_THRESH_TEST 0.0 "
        "MODEL.ROI_BOX_HEAD.FC_DIM 64 DATALOADER.NUM_WORKERS 0 "
        "DATASETS.TRAIN ('gkd_scenes_tiny_train',) DATASETS.TEST ('gkd_scenes_tiny_val',) "
        "INPUT.MIN_SIZE_TRAIN (128,) INPUT.MAX_SIZE_TRAIN 128 INPUT.MIN_SIZE_TEST 128 "
        "INPUT.MAX_SIZE_TEST 128 SOLVER.IMS_PER_BATCH 2 SOLVER.BASE_LR 0.01 SOLVER.MAX_ITER 2 "
        "SOLVER.STEPS () SOLVER.WARMUP_ITERS 1".split(),
        "OUTPUT_DIR",
        str(tmp_path),
    )
    assert "GeneralizedRCNN" in log and "Evaluation results for bbox" in log
    assert (tmp_path / "model_final.pth").is_file()


def test_demo_prints_teacher_student_gkd_table(tmp_path, python):
    tiny = [
        "--output",
        str(tmp_path),
        "--teacher-config",
        "tests/configs/tiny_retinanet.yaml",
        "--student-config",
        "tests/configs/tiny_gkd_retinanet.yaml",
    ]
    out = run(python, "tools/demo.py", "--student-iters", "2", *tiny)
    lines = out.splitlines()
    head = lines.index("| model | AP | AP50 | AP75 | APs | APm | APl | minutes |")
    rows = [line.split("|") for line in lines[head + 2 : head + 5]]
    assert [r[1].strip() for r in rows] == [
        "teacher (trained now)",
        "student alone, 2 it",
        "GKD student, 2 it",
    ]
    for r in rows:
        values = [float(v) for v in r[2:8]]
        assert values[1] >= values[0] >= 0 or values[0] != values[0]  # AP50 >= AP (or nan)
    assert (tmp_path / "tiny_retinanet" / "model_final.pth").is_file()
    assert (tmp_path / "demo_gkd_student" / "model_final.pth").is_file()
    # a second run reuses the cached teacher
    out = run(python, "tools/demo.py", "--student-iters", "1", *tiny)
    assert "| teacher (cached " in out


def test_format_table():
    from tools import demo

    table = demo.format_table(
        [("m", {"AP": 12.345, "AP50": 30, "AP75": 1, "APs": 2, "APm": 3}, 1.25)]
    )
    assert table.splitlines()[2] == "| m | 12.3 | 30.0 | 1.0 | 2.0 | 3.0 | nan | 1.2 |"
