"""The frozen teacher: config resolution, strict weight loading, freezing, feature extraction."""

import logging

import pytest
import torch
from conftest import TINY_CONFIG
from detectron2.modeling import build_model

import gkd_d2  # noqa: F401  (registers the tiny config's backbone)
from gkd_d2.config import load_config
from gkd_d2.teacher import (
    FrozenTeacher,
    TeacherLoadError,
    build_teacher,
    load_teacher_cfg,
    load_teacher_weights,
)


def student_cfg(weights="", opts=(), config_file=str(TINY_CONFIG), allow_partial=False):
    cfg = load_config(str(TINY_CONFIG))
    cfg.MODEL.TEACHER.CONFIG_FILE = config_file
    cfg.MODEL.TEACHER.WEIGHTS = str(weights)
    cfg.MODEL.TEACHER.OPTS = list(opts)
    cfg.MODEL.TEACHER.ALLOW_PARTIAL_LOAD = allow_partial
    return cfg


@pytest.fixture(scope="module")
def trained_state():
    """A tiny-model state dict unlike any fresh initialisation (so equality checks can fail)."""
    torch.manual_seed(0)
    model = build_model(student_cfg())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # small: keep activations finite
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                b.normal_(0.0, 0.1)
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture
def weights(tmp_path, trained_state):
    path = tmp_path / "teacher.pth"
    torch.save({"model": trained_state}, path)
    return path


def images(n=2, size=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g),
            "height": size,
            "width": size,
        }
        for _ in range(n)
    ]


def test_loads_weights_and_freezes(weights, trained_state):
    torch.manual_seed(123)  # a different init than the saved weights
    teacher = build_teacher(student_cfg(weights))
    loaded = teacher.model.state_dict()
    assert loaded.keys() == trained_state.keys()
    for k, v in trained_state.items():
        assert torch.equal(loaded[k], v), k
    assert all(not p.requires_grad for p in teacher.model.parameters())
    assert not teacher.model.training


def test_features_shapes_eval_and_no_grad(weights):
    teacher = build_teacher(student_cfg(weights))
    teacher.model.train()  # e.g. a careless .train() on the whole thing
    feats, image_list = teacher.features(images())
    assert not teacher.model.training
    assert not any(m.training for m in teacher.model.modules())
    assert image_list.tensor.shape == (2, 3, 128, 128)
    assert set(feats) == {"p3", "p4", "p5", "p6", "p7"}
    for level, f in feats.items():
        side = 128 // 2 ** int(level[1])
        assert f.shape == (2, 64, side, side), level
        assert f.grad_fn is None and not f.requires_grad
    logits = teacher.head_logits([feats[f"p{i}"] for i in range(3, 8)])
    assert [t.shape for t in logits] == [(2, 9 * 6, 128 >> i, 128 >> i) for i in range(3, 8)]
    assert all(t.grad_fn is None for t in logits)


def test_features_use_running_stats_after_train(weights):
    """Eval-mode BN: the output must not depend on the batch, even after model.train()."""
    teacher = build_teacher(student_cfg(weights))
    batch = images(n=2)
    alone, _ = teacher.features(batch[:1])
    teacher.model.train()
    together, _ = teacher.features(batch)
    # train-mode BN (batch statistics) would change these by far more than float noise
    torch.testing.assert_close(together["p3"][:1], alone["p3"], atol=1e-4, rtol=1e-4)


def test_not_a_module_and_hidden_from_student(weights):
    teacher = build_teacher(student_cfg(weights))
    assert not isinstance(teacher, torch.nn.Module)
    student = torch.nn.Linear(2, 2)
    student.teacher = teacher
    assert len(list(student.parameters())) == 2
    assert set(student.state_dict()) == {"weight", "bias"}
    student.train()
    assert not teacher.model.training
    assert teacher.to("cpu") is teacher


def test_missing_weights_file(tmp_path):
    missing = tmp_path / "nope" / "teacher.pth"
    with pytest.raises(TeacherLoadError, match=str(missing)):
        build_teacher(student_cfg(missing))


def test_empty_weights():
    with pytest.raises(TeacherLoadError, match="MODEL.TEACHER.WEIGHTS"):
        build_teacher(student_cfg(""))


def test_renamed_key_is_an_error_unless_partial(tmp_path, trained_state, caplog):
    state = dict(trained_state)
    popped = "head.cls_score.bias"
    bogus = state.pop(popped)
    state["backbone.bogus.weight"] = bogus
    path = tmp_path / "renamed.pth"
    torch.save({"model": state}, path)

    with pytest.raises(TeacherLoadError) as err:
        build_teacher(student_cfg(path))
    assert popped in str(err.value)
    assert "backbone.bogus.weight" in str(err.value)
    assert str(path) in str(err.value)

    with caplog.at_level(logging.WARNING, logger="gkd_d2.teacher"):
        teacher = build_teacher(student_cfg(path, allow_partial=True))
    assert popped in caplog.text and "backbone.bogus.weight" in caplog.text
    key = "head.cls_score.weight"
    assert torch.equal(teacher.model.state_dict()[key], trained_state[key])


def test_wrong_shape_is_an_error(tmp_path, trained_state):
    state = dict(trained_state)
    key = "head.cls_score.weight"
    state[key] = torch.zeros(5, *state[key].shape[1:])
    path = tmp_path / "shape.pth"
    torch.save({"model": state}, path)
    with pytest.raises(TeacherLoadError, match=key):
        build_teacher(student_cfg(path))


def test_long_key_lists_are_truncated(tmp_path, trained_state):
    # BatchNorm fills in a missing num_batches_tracked itself, so it never counts as missing.
    dropped = sorted(k for k in trained_state if not k.endswith("num_batches_tracked"))[:25]
    state = {k: v for k, v in trained_state.items() if k not in dropped}
    path = tmp_path / "partial.pth"
    torch.save({"model": state}, path)
    model = build_model(load_teacher_cfg(student_cfg(path)))
    with pytest.raises(TeacherLoadError) as err:
        load_teacher_weights(model, str(path), allow_partial=False)
    message = str(err.value)
    assert "missing in the checkpoint (25)" in message
    assert "... and 5 more" in message
    assert sum(k in message for k in dropped) == 20


def test_unknown_config_file():
    with pytest.raises(FileNotFoundError, match="no/such/teacher.yaml"):
        load_teacher_cfg(student_cfg(config_file="no/such/teacher.yaml"))


def test_empty_config_file():
    with pytest.raises(ValueError, match="MODEL.TEACHER.CONFIG_FILE"):
        load_teacher_cfg(student_cfg(config_file=""))


def test_model_zoo_config_resolves():
    cfg = student_cfg(
        "detectron2://some/model.pkl", config_file="COCO-Detection/retinanet_R_50_FPN_1x.yaml"
    )
    tcfg = load_teacher_cfg(cfg)
    assert tcfg.MODEL.META_ARCHITECTURE == "RetinaNet"
    assert tcfg.MODEL.DEVICE == "cpu"
    assert tcfg.MODEL.WEIGHTS == "detectron2://some/model.pkl"
    assert tcfg.is_frozen()


def test_opts_apply_to_teacher_only():
    cfg = student_cfg(opts=["MODEL.FPN.OUT_CHANNELS", "32"])
    assert load_teacher_cfg(cfg).MODEL.FPN.OUT_CHANNELS == 32
    assert cfg.MODEL.FPN.OUT_CHANNELS == 64


def test_class_count_mismatch(weights):
    cfg = student_cfg(weights, opts=["MODEL.RETINANET.NUM_CLASSES", "5"])
    with pytest.raises(ValueError, match="MODEL.RETINANET.NUM_CLASSES") as err:
        build_teacher(cfg)
    assert "5" in str(err.value) and "6" in str(err.value)


def test_channel_flip_and_teacher_normalisation(weights):
    mean, std = [100.0, 120.0, 140.0], [50.0, 60.0, 70.0]
    opts = ["INPUT.FORMAT", "RGB", "MODEL.PIXEL_MEAN", str(mean), "MODEL.PIXEL_STD", str(std)]
    cfg = student_cfg(weights, opts=opts)
    assert cfg.INPUT.FORMAT == "BGR"
    teacher = build_teacher(cfg)
    batch = images()
    feats, image_list = teacher.features(batch)

    m, s = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    flipped = torch.stack([(x["image"].flip(0).float() - m) / s for x in batch])
    torch.testing.assert_close(image_list.tensor, flipped)
    with torch.no_grad():
        expected = teacher.model.backbone(flipped)
        unflipped = teacher.model.backbone(
            torch.stack([(x["image"].float() - m) / s for x in batch])
        )
    for level in expected:
        torch.testing.assert_close(feats[level], expected[level])
    assert not torch.allclose(feats["p3"], unflipped["p3"])


def test_same_format_does_not_flip(weights):
    teacher = build_teacher(student_cfg(weights))
    batch = images(n=1)
    _, image_list = teacher.features(batch)
    expected = (batch[0]["image"].float() - 128.0) / 64.0
    torch.testing.assert_close(image_list.tensor[0], expected)


def test_incompatible_formats_rejected():
    tcfg = load_teacher_cfg(student_cfg())
    model = build_model(tcfg)
    with pytest.raises(ValueError, match="INPUT.FORMAT"):
        FrozenTeacher(model, tcfg, "L")
