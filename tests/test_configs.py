"""Every shipped config loads; GKD configs name a resolvable teacher config."""

import pytest
from conftest import REPO
from detectron2.modeling import META_ARCH_REGISTRY

import gkd_d2  # noqa: F401
from gkd_d2 import load_config
from gkd_d2.teacher import load_teacher_cfg

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


@pytest.mark.parametrize(
    "path", CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in CONFIGS]
)
def test_config_loads(path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(str(path))
    arch = cfg.MODEL.META_ARCHITECTURE
    if arch.startswith("GKD"):
        teacher = load_teacher_cfg(cfg)
        plain = META_ARCH_REGISTRY.get(arch).plain_architecture  # the demo's control
        assert plain == teacher.MODEL.META_ARCHITECTURE
        if arch == "GKDRetinaNet":
            assert teacher.MODEL.META_ARCHITECTURE == "RetinaNet"
            assert teacher.MODEL.RETINANET.NUM_CLASSES == cfg.MODEL.RETINANET.NUM_CLASSES
        else:
            assert arch == "GKDRCNN" and teacher.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
            assert teacher.MODEL.ROI_HEADS.NUM_CLASSES == cfg.MODEL.ROI_HEADS.NUM_CLASSES


def test_paper_protocol_config():
    cfg = load_config(str(REPO / "configs" / "gkd.yaml"))
    g = cfg.MODEL.GKD
    assert (g.NUM_PROTOTYPES, g.ALPHA, g.DENSITY_KERNEL, g.DENSITY_QUANTILE) == (10, 10.0, 0.1, 0.4)
    assert (g.MIN_BOX_SIZE, g.MAX_IMAGES_PER_CLASS, g.TEMPERATURE) == (30, 800, 2.0)
    assert (g.FG_WEIGHT, g.BG_WEIGHT, g.SOFT_WEIGHT, g.GLOBAL_WEIGHT) == (1.0, 4.0, 1.0, 0.0)
    assert g.ATTENUATION and g.NUM_EPOCHS == 24 and g.REFRESH_PERIOD == 0
    assert cfg.INPUT.MIN_SIZE_TRAIN == (800,) and cfg.SOLVER.MAX_ITER == 176000
    assert load_teacher_cfg(cfg).MODEL.RESNETS.DEPTH == 101 and cfg.MODEL.RESNETS.DEPTH == 50


def test_faster_rcnn_paper_protocol_config():
    cfg = load_config(str(REPO / "configs" / "gkd_faster_rcnn.yaml"))
    assert cfg.MODEL.META_ARCHITECTURE == "GKDRCNN" and cfg.MODEL.GKD.LEVEL_REDUCTION == "auto"
    assert cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE == 512  # 25 % positives: up to 128
    assert cfg.INPUT.MIN_SIZE_TRAIN == (800,) and cfg.SOLVER.MAX_ITER == 176000
    assert cfg.SOLVER.BASE_LR == 0.02 and cfg.MODEL.GKD.NUM_EPOCHS == 24
    teacher = load_teacher_cfg(cfg)
    assert teacher.MODEL.RESNETS.DEPTH == 101 and cfg.MODEL.RESNETS.DEPTH == 50
    assert teacher.INPUT.FORMAT == cfg.INPUT.FORMAT  # caffe-style pair, one normalisation


def test_teacher_config_file_is_relative_to_the_yaml_that_names_it(tmp_path, monkeypatch):
    """As ``_BASE_``: a relative MODEL.TEACHER.CONFIG_FILE is found next to the yaml that sets
    it (here a base yaml in another folder), whatever the current folder; a model-zoo name or
    a path from the current folder still work."""
    from gkd_d2 import load_config

    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "teacher.yaml").write_text("MODEL:\n  META_ARCHITECTURE: RetinaNet\n")
    (tmp_path / "base" / "student.yaml").write_text(
        "MODEL:\n  TEACHER:\n    CONFIG_FILE: teacher.yaml\n"
    )
    (tmp_path / "run.yaml").write_text('_BASE_: "base/student.yaml"\n')
    monkeypatch.chdir(REPO / "docs")  # anywhere but the configs' folders
    cfg = load_config(str(tmp_path / "run.yaml"))
    assert cfg.MODEL.TEACHER.CONFIG_FILE == str(tmp_path / "base" / "teacher.yaml")
    # the repository's own configs resolve from any folder
    quick = load_config(str(REPO / "configs" / "quickstart_gkd_retinanet_cpu.yaml"))
    want = REPO / "configs" / "quickstart_retinanet_cpu.yaml"
    assert quick.MODEL.TEACHER.CONFIG_FILE == str(want)
    # a model-zoo name (no such file next to the yaml) is left for the model zoo
    zoo = load_config(str(REPO / "configs" / "gkd.yaml"))
    assert zoo.MODEL.TEACHER.CONFIG_FILE == "COCO-Detection/retinanet_R_101_FPN_3x.yaml"


GKD_CONFIGS = [p for p in CONFIGS if load_config(str(p)).MODEL.META_ARCHITECTURE.startswith("GKD")]


@pytest.mark.parametrize(
    "path", GKD_CONFIGS, ids=[str(p.relative_to(REPO / "configs")) for p in GKD_CONFIGS]
)
def test_detectron2_config_idiom_resolves_the_teacher_from_another_folder(
    path, tmp_path, monkeypatch
):
    """``get_cfg(); add_gkd_config(cfg); cfg.merge_from_file(f)`` (TridentNet's and PointRend's
    train_net.py) leaves a relative teacher name unresolved; from a folder that holds none of
    the configs, the teacher still resolves, to the config that gkd_d2.load_config gives."""
    from detectron2.config import get_cfg

    from gkd_d2 import add_gkd_config

    monkeypatch.chdir(tmp_path)
    cfg = get_cfg()
    add_gkd_config(cfg)
    cfg.merge_from_file(str(path))
    teacher = load_teacher_cfg(cfg)
    assert teacher.dump() == load_teacher_cfg(load_config(str(path))).dump()


def test_an_integer_is_accepted_for_a_float_key(tmp_path):
    """``MODEL.TEACHER.MIN_AP 0``, as the teacher check's error advises, and ``MIN_AP: 0`` in a
    yaml: the float 0.0; an integer key still refuses a float."""
    from gkd_d2.config import ConfigError

    quick = str(REPO / "configs" / "quickstart_gkd_retinanet_cpu.yaml")
    cfg = load_config(quick, ["MODEL.TEACHER.MIN_AP", "0", "MODEL.GKD.BG_WEIGHT", "2"])
    assert cfg.MODEL.TEACHER.MIN_AP == 0.0 and isinstance(cfg.MODEL.TEACHER.MIN_AP, float)
    assert cfg.MODEL.GKD.BG_WEIGHT == 2.0 and isinstance(cfg.MODEL.GKD.BG_WEIGHT, float)
    mine = tmp_path / "mine.yaml"
    mine.write_text(f'_BASE_: "{quick}"\nMODEL:\n  TEACHER:\n    MIN_AP: 0\n')
    from_file = load_config(str(mine))
    assert from_file.MODEL.TEACHER.MIN_AP == 0.0 and isinstance(
        from_file.MODEL.TEACHER.MIN_AP, float
    )
    # the rest of the file and its _BASE_ chain merged as detectron2 would
    assert from_file.dump() == load_config(quick, ["MODEL.TEACHER.MIN_AP", "0.0"]).dump()
    with pytest.raises(ConfigError, match=r"Type mismatch .* SOLVER\.MAX_ITER"):
        load_config(quick, ["SOLVER.MAX_ITER", "1.5"])
