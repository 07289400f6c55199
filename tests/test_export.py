"""tools/export_student.py: a plain detectron2 student that evaluates exactly as the GKD model."""

import pytest
import torch
import yaml
from conftest import REPO, setup_test_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import build_detection_test_loader
from detectron2.engine import DefaultTrainer
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model

from gkd_d2.config import load_config  # (importing gkd_d2 registers the narrow backbones)
from gkd_d2.engine import Trainer
from tools import export_student

CASES = {
    "retinanet": ("tiny_retinanet.yaml", "tiny_gkd_retinanet.yaml", "RetinaNet"),
    "faster_rcnn": ("tiny_faster_rcnn.yaml", "tiny_gkd_faster_rcnn.yaml", "GeneralizedRCNN"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def trained(request, tmp_path_factory):
    """A GKD model trained 2 iterations from a random teacher: (case, GKD cfg, its checkpoint)."""
    teacher_cfg, gkd_cfg, _ = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    cfg = load_config(str(REPO / "tests" / "configs" / teacher_cfg))
    torch.manual_seed(7)
    torch.save({"model": build_model(cfg).state_dict()}, tmp / "teacher.pth")
    cfg = setup_test_cfg(
        REPO / "tests" / "configs" / gkd_cfg,
        "MODEL.TEACHER.WEIGHTS",
        str(tmp / "teacher.pth"),
        "SOLVER.MAX_ITER",
        "2",
        "TEST.EVAL_PERIOD",
        "0",
        "OUTPUT_DIR",
        str(tmp / "train"),
    )
    Trainer(cfg).train()
    return request.param, cfg, str(tmp / "train" / "model_final.pth")


def test_exported_student_evaluates_exactly_as_the_gkd_model(trained, tmp_path):
    case, cfg, weights = trained
    weights_out, config_out = export_student.export_student(cfg, weights, str(tmp_path / "out"))

    # the GKD model, as train_net.py --eval-only evaluates it
    gkd_model = Trainer.build_model(cfg)
    DetectionCheckpointer(gkd_model).load(weights)
    gkd_results = Trainer.test(cfg, gkd_model)

    # stock detectron2: its own config (no add_gkd_config), build_model, checkpointer, evaluator
    plain_cfg = get_cfg()
    plain_cfg.merge_from_file(config_out)
    assert plain_cfg.MODEL.META_ARCHITECTURE == CASES[case][2]
    assert plain_cfg.MODEL.WEIGHTS == weights_out
    plain_model = build_model(plain_cfg)
    assert type(plain_model).__name__ == CASES[case][2]
    DetectionCheckpointer(plain_model).load(plain_cfg.MODEL.WEIGHTS)
    name = plain_cfg.DATASETS.TEST[0]
    plain_results = DefaultTrainer.test(
        plain_cfg, plain_model, evaluators=[COCOEvaluator(name, output_dir=str(tmp_path / "ev"))]
    )

    def nan_as_none(d):
        return {k: None if v != v else v for k, v in d.items()}

    assert nan_as_none(plain_results["bbox"]) == nan_as_none(gkd_results["bbox"])

    # and the raw detections are identical, not only the AP (an untrained model's AP is small)
    loader = build_detection_test_loader(plain_cfg, name)
    gkd_model.eval()
    plain_model.eval()
    with torch.no_grad():
        for i, inputs in enumerate(loader):
            a, b = gkd_model(inputs)[0]["instances"], plain_model(inputs)[0]["instances"]
            assert len(a) > 0
            assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor)
            assert torch.equal(a.scores, b.scores)
            assert torch.equal(a.pred_classes, b.pred_classes)
            if i == 2:
                break

    state = torch.load(weights_out, weights_only=True)["model"]
    assert not any(k.startswith("distiller") or k.startswith("teacher") for k in state)
    assert "loss_normalizer_ema" not in state
    assert "TEACHER" not in plain_cfg.MODEL and "GKD" not in plain_cfg.MODEL
    # every key that add_gkd_config adds is left out of the file (MOBILENETV2 too: no MobileNet)
    written = yaml.safe_load(open(config_out))
    assert ("MODEL", "GKD") in export_student.gkd_keys()
    for path in export_student.gkd_keys():
        node = written
        for part in path[:-1]:
            node = node[part]
        assert path[-1] not in node, path


def test_cli_and_clear_errors(trained, tmp_path, capsys):
    case, cfg, weights = trained
    config = REPO / "tests" / "configs" / CASES[case][1]
    assert (
        export_student.main(
            ["--config-file", str(config), "--weights", weights, "--output", str(tmp_path / "a")]
        )
        == 0
    )
    assert "left out" in capsys.readouterr().out
    assert (tmp_path / "a" / "model_final.pth").is_file()

    missing = str(tmp_path / "nope.pth")
    assert (
        export_student.main(
            ["--config-file", str(config), "--weights", missing, "--output", str(tmp_path / "b")]
        )
        == 1
    )
    assert "nope.pth" in capsys.readouterr().err

    typo = ["MODEL.GKD.TEMPRATURE", "2.0"]
    assert (
        export_student.main(
            ["--config-file", str(config), "--weights", weights, "--output", str(tmp_path / "t")]
            + typo
        )
        == 1
    )
    assert "MODEL.GKD.TEMPRATURE. Did you mean MODEL.GKD.TEMPERATURE" in capsys.readouterr().err

    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(open(weights, "rb").read()[:1000])
    with pytest.raises(export_student.ExportError, match="truncated.pth.*truncated or corrupt"):
        export_student.export_student(cfg, str(truncated), str(tmp_path / "c"))

    wider = cfg.clone()
    wider.defrost()
    wider.MODEL.FPN.OUT_CHANNELS = 48
    with pytest.raises(export_student.ExportError, match=r"fpn_lateral.*checkpoint \(32,.*\(48,"):
        export_student.export_student(wider, weights, str(tmp_path / "d"))

    plain = cfg.clone()
    plain.defrost()
    plain.MODEL.META_ARCHITECTURE = CASES[case][2]
    with pytest.raises(export_student.ExportError, match="not a GKD meta-architecture"):
        export_student.export_student(plain, weights, str(tmp_path / "e"))
