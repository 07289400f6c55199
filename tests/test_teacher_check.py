"""The teacher check: the teacher's AP on a seeded subset before iteration 0, and its floor."""

import importlib
import logging
import math
import re

import pytest
import torch
from conftest import REPO, setup_test_cfg
from detectron2.data import DatasetCatalog
from detectron2.structures import Boxes, BoxMode, Instances

import gkd_d2  # noqa: F401
from gkd_d2.engine import Trainer
from gkd_d2.engine.teacher_check import TeacherCheckError, check_subset, parse_teacher_check

CONFIGS = REPO / "tests" / "configs"
TEACHER_CFG = CONFIGS / "tiny_retinanet.yaml"
GKD_CFG = CONFIGS / "tiny_gkd_retinanet.yaml"


@pytest.fixture(scope="module")
def one_iteration_teacher(tmp_path_factory) -> str:
    """A teacher trained for a single iteration: it loads strictly, and is useless."""
    out = tmp_path_factory.mktemp("teacher")
    Trainer(setup_test_cfg(TEACHER_CFG, "SOLVER.MAX_ITER", "1", "OUTPUT_DIR", str(out))).train()
    return str(out / "model_final.pth")


def teacher_check_log(caplog, monkeypatch):
    """Collect what the teacher check logs in ``caplog`` (detectron2's setup_logger stops
    gkd_d2's records at "gkd_d2"; caplog listens at the root)."""
    monkeypatch.setattr(logging.getLogger("gkd_d2"), "propagate", True)
    return caplog.at_level(logging.INFO, logger="gkd_d2.engine.teacher_check")


def gkd_trainer(tmp_path, weights, *opts) -> Trainer:
    cfg = setup_test_cfg(
        GKD_CFG,
        "MODEL.TEACHER.WEIGHTS",
        weights,
        "SOLVER.MAX_ITER",
        "1",
        "OUTPUT_DIR",
        str(tmp_path),
        *opts,
    )
    return Trainer(cfg)


def test_a_one_iteration_teacher_is_refused_before_iteration_0(tmp_path, one_iteration_teacher):
    trainer = gkd_trainer(tmp_path, one_iteration_teacher, "MODEL.TEACHER.MIN_AP", "1.0")
    with pytest.raises(TeacherCheckError) as e:
        trainer.train()
    message = str(e.value)
    assert "Teacher check failed" in message
    assert "tests/configs/tiny_retinanet.yaml" in message and one_iteration_teacher in message
    assert "MODEL.TEACHER.MIN_AP 1" in message and "on 8 images of gkd_scenes_tiny_val" in message
    ap = trainer.storage.histories()["gkd/teacher_ap"].latest()
    assert 0.0 <= ap < 1.0 and f"bbox AP {ap:.2f}" in message
    # nothing was distilled: no refresh, no step
    assert int(trainer.model.distiller.bank_iter) == -1
    assert "loss_gkd_fg" not in trainer.storage.histories()
    assert not (tmp_path / "model_final.pth").exists()


def test_what_the_refusal_advises_works(tmp_path, one_iteration_teacher, monkeypatch):
    """The refusal's two pieces of advice, followed as written: its command evaluates the
    teacher alone on the check's dataset, and its MIN_AP override lets the run distil."""
    import shlex

    from detectron2.engine import default_argument_parser

    trainer = gkd_trainer(tmp_path, one_iteration_teacher, "MODEL.TEACHER.MIN_AP", "1.0")
    with pytest.raises(TeacherCheckError) as e:
        trainer.train()
    message = str(e.value)
    command = re.search(r"Evaluate it alone: (python .*?) \. ", message)[1]
    words = shlex.split(command)
    assert words[:2] == ["python", "train_net.py"], command
    monkeypatch.chdir(tmp_path)  # its results go to the teacher config's OUTPUT_DIR
    train_net = importlib.import_module("train_net")
    results = train_net.main(default_argument_parser().parse_args(words[2:]))
    ap = trainer.storage.histories()["gkd/teacher_ap"].latest()
    assert 0.0 <= results["bbox"]["AP"] < 1.0 or math.isnan(results["bbox"]["AP"])
    assert f"bbox AP {ap:.2f}" in message
    # "set MODEL.TEACHER.MIN_AP 0 to distil anyway", as written
    key, value = re.search(r"set (MODEL\.TEACHER\.MIN_AP) (\S+) to distil anyway", message).groups()
    distils = gkd_trainer(tmp_path / "anyway", one_iteration_teacher, key, value)
    distils.train()
    assert "loss_gkd_fg" in distils.storage.histories()


def test_a_student_start_no_worse_than_the_teacher_is_warned_about(
    tmp_path, one_iteration_teacher, caplog, monkeypatch
):
    """With MODEL.WEIGHTS, the student as loaded is scored on the same images; a teacher that
    is not better than it is named in a warning with both APs, and training goes on."""
    start = tmp_path / "student_start.pth"
    torch.manual_seed(0)
    model = gkd_trainer(tmp_path / "build", one_iteration_teacher).model
    torch.save({"model": model.state_dict()}, start)
    weights = ("MODEL.WEIGHTS", str(start), "MODEL.TEACHER.MIN_AP", "0")
    trainer = gkd_trainer(tmp_path / "weak", one_iteration_teacher, *weights)
    trainer.model.teacher.model.forward = nothing  # 0 AP: the student is not worse
    with teacher_check_log(caplog, monkeypatch):
        trainer.train()
    history = trainer.storage.histories()
    student_ap = history["gkd/student_start_ap"].latest()
    assert history["gkd/teacher_ap"].latest() == 0.0 and student_ap >= 0.0
    assert (
        f"The teacher (0.00 AP) is not better than the student it starts from ({student_ap:.2f} "
        "AP) on 8 images of gkd_scenes_tiny_val" in caplog.text
    )
    assert "loss_gkd_fg" in history
    # a teacher better than the start: scored, no warning
    caplog.clear()
    strong = gkd_trainer(tmp_path / "strong", one_iteration_teacher, *weights)
    strong.model.teacher.model.forward = oracle("gkd_scenes_tiny_val")
    with teacher_check_log(caplog, monkeypatch):
        strong.train()
    assert strong.storage.histories()["gkd/student_start_ap"].latest() == student_ap
    assert (
        "Student start: the student as loaded" in caplog.text and "is not better" not in caplog.text
    )
    # what tools/rehearse.py reads back is the teacher's line, not the student's
    assert parse_teacher_check(caplog.text)["ap"] == pytest.approx(100.0)
    # no MODEL.WEIGHTS: no student score
    plain = gkd_trainer(tmp_path / "plain", one_iteration_teacher, "MODEL.TEACHER.MIN_AP", "0")
    plain.train()
    assert "gkd/student_start_ap" not in plain.storage.histories()


def nothing(batched_inputs):
    """A detector that detects nothing (its outputs' fields present, empty)."""
    outputs = []
    for x in batched_inputs:
        inst = Instances((x["height"], x["width"]))
        inst.pred_boxes = Boxes(torch.zeros(0, 4))
        inst.scores = torch.zeros(0)
        inst.pred_classes = torch.zeros(0, dtype=torch.long)
        outputs.append({"instances": inst})
    return outputs


def oracle(dataset_name):
    """A detector that outputs the ground truth of each image (score 1): AP 100."""
    by_id = {d["image_id"]: d for d in DatasetCatalog.get(dataset_name)}

    def forward(batched_inputs):
        outputs = []
        for x in batched_inputs:
            d = by_id[x["image_id"]]
            anns = d["annotations"]
            boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
            inst = Instances((d["height"], d["width"]))
            inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
            inst.scores = torch.ones(len(anns))
            inst.pred_classes = torch.tensor([a["category_id"] for a in anns], dtype=torch.long)
            outputs.append({"instances": inst})
        return outputs

    return forward


def test_a_perfect_teacher_scores_100_and_training_goes_on(
    tmp_path, one_iteration_teacher, caplog, monkeypatch
):
    trainer = gkd_trainer(tmp_path, one_iteration_teacher, "MODEL.TEACHER.MIN_AP", "50.0")
    # the check runs the teacher as detectron2 inference does (model(inputs)); distillation
    # uses its backbone and head, untouched here
    trainer.model.teacher.model.forward = oracle("gkd_scenes_tiny_val")
    with teacher_check_log(caplog, monkeypatch):
        trainer.train()
    history = trainer.storage.histories()
    assert history["gkd/teacher_ap"].latest() == pytest.approx(100.0)
    # what tools/rehearse.py reads back from a training log
    assert parse_teacher_check(caplog.text) == {
        "ap": 100.0,
        "no_detections": False,
        "images": 8,
        "source": "gkd_scenes_tiny_val",
    }
    assert "loss_gkd_fg" in history and int(trainer.model.distiller.bank_iter) == 0


def test_a_teacher_that_detects_nothing_scores_0_not_nan(
    tmp_path, one_iteration_teacher, caplog, monkeypatch
):
    trainer = gkd_trainer(tmp_path, one_iteration_teacher, "MODEL.TEACHER.MIN_AP", "1.0")

    trainer.model.teacher.model.forward = nothing
    with pytest.raises(TeacherCheckError) as e, teacher_check_log(caplog, monkeypatch):
        trainer.train()
    assert trainer.storage.histories()["gkd/teacher_ap"].latest() == 0.0
    assert "scores bbox AP 0.00 (no detections) on 8 images" in str(e.value)
    # the rehearsals' random teachers detect nothing: their train log must still be read
    assert parse_teacher_check(caplog.text) == {
        "ap": 0.0,
        "no_detections": True,
        "images": 8,
        "source": "gkd_scenes_tiny_val",
    }


def test_parse_teacher_check_takes_the_last_check_and_none_without_one():
    text = (
        "[12/06 10:00:00 gkd.engine.teacher_check]: Teacher check: teacher RetinaNet "
        "(MODEL.TEACHER.CONFIG_FILE 'a.yaml', MODEL.TEACHER.WEIGHTS 'w: x.pth'): bbox AP 12.34 "
        "on 50 images of coco_2017_val (3.2s)\n"
        "[12/06 10:05:00 gkd.engine.teacher_check]: Teacher check: teacher RetinaNet "
        "(MODEL.TEACHER.CONFIG_FILE 'a.yaml', MODEL.TEACHER.WEIGHTS 'x.pth'): bbox AP 0.00 (no "
        "detections) on 2 images of coco_2017_train (1.0s)\n"
    )
    first = text.splitlines()[0]
    assert parse_teacher_check(first) == {
        "ap": 12.34,
        "no_detections": False,
        "images": 50,
        "source": "coco_2017_val",
    }
    assert parse_teacher_check(text) == {
        "ap": 0.0,
        "no_detections": True,
        "images": 2,
        "source": "coco_2017_train",
    }
    assert parse_teacher_check("Starting training from iteration 0\n") is None


def test_check_off_with_zero_images(tmp_path, one_iteration_teacher):
    trainer = gkd_trainer(tmp_path, one_iteration_teacher, "MODEL.TEACHER.CHECK_IMAGES", "0")
    trainer.train()
    assert "gkd/teacher_ap" not in trainer.storage.histories()


def test_check_subset_is_seeded_and_falls_back_to_the_training_set(tmp_path):
    cfg = setup_test_cfg(GKD_CFG, "OUTPUT_DIR", str(tmp_path))
    name, a = check_subset(cfg, 5)
    _, b = check_subset(cfg, 5)
    assert name == "gkd_scenes_tiny_val" and len(a) == 5
    assert [d["image_id"] for d in a] == [d["image_id"] for d in b]
    assert len(check_subset(cfg, 10_000)[1]) == len(DatasetCatalog.get(name))  # all if fewer
    no_test = setup_test_cfg(GKD_CFG, "OUTPUT_DIR", str(tmp_path), "DATASETS.TEST", "()")
    assert check_subset(no_test, 5)[0] == "gkd_scenes_tiny_train"
