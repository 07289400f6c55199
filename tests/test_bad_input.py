"""Bad input stops with an error that names the file, key, class, shape or iteration and says
what to do, and loses nothing (docs/bad_input.md lists every case and its test)."""

import logging
import os
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_CONFIG, setup_test_cfg, tiny_inputs
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage, get_event_storage

import gkd_d2  # noqa: F401  (registers datasets and models)
from gkd_d2 import load_config
from gkd_d2.checkpoint import CheckpointLoadError, GKDCheckpointer, read_pth
from gkd_d2.config import ConfigError
from gkd_d2.engine import Trainer, launch
from gkd_d2.engine.trainer import NonFiniteLossError, check_finite_losses
from gkd_d2.teacher import FrozenTeacher, TeacherLoadError, build_teacher, load_teacher_cfg

CONFIGS = REPO / "tests" / "configs"
# detector -> (teacher config, GKD student config)
DETECTORS = {
    "retinanet": (CONFIGS / "tiny_retinanet.yaml", CONFIGS / "tiny_gkd_retinanet.yaml"),
    "faster_rcnn": (CONFIGS / "tiny_faster_rcnn.yaml", CONFIGS / "tiny_gkd_faster_rcnn.yaml"),
}
# no evaluation at the end of training (the tests here look at training and checkpoints)
NO_TEST = ("DATASETS.TEST", "()")


def E(path) -> str:
    """A path as a literal in a match= pattern."""
    return re.escape(str(path))


def model_cfg(config_file, *opts):
    return load_config(str(config_file), opts)


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory) -> dict[str, str]:
    """Tiny teachers' weights per detector (random with a fixed seed: mechanics under test)."""
    folder = tmp_path_factory.mktemp("teachers")
    paths = {}
    for name, (teacher_cfg, _) in DETECTORS.items():
        torch.manual_seed(123)
        paths[name] = str(folder / f"{name}.pth")
        torch.save({"model": build_model(model_cfg(teacher_cfg)).state_dict()}, paths[name])
    return paths


def gkd_cfg(detector, out, weights, *opts):
    return setup_test_cfg(
        DETECTORS[detector][1], "OUTPUT_DIR", str(out), "MODEL.TEACHER.WEIGHTS", weights, *opts
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """The plain tiny RetinaNet, 4 iterations, a checkpoint every 2: model_0000001.pth,
    model_0000003.pth, model_final.pth (named by last_checkpoint)."""
    out = tmp_path_factory.mktemp("trained")
    Trainer(
        setup_test_cfg(TINY_CONFIG, "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "4", *NO_TEST)
    ).train()
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    return out


def truncate(src, dst, fraction=0.5):
    data = open(src, "rb").read()
    open(dst, "wb").write(data[: int(len(data) * fraction)])
    return str(dst)


# 1. missing teacher weights ----------------------------------------------------------------


def test_missing_teacher_weights_say_how_to_get_them(tmp_path):
    missing = tmp_path / "teacher" / "model_final.pth"
    cfg = model_cfg(DETECTORS["retinanet"][1], "MODEL.TEACHER.WEIGHTS", str(missing))
    with pytest.raises(
        TeacherLoadError,
        match=rf"{E(missing)}.*MODEL\.TEACHER\.WEIGHTS.* not found: train the teacher first "
        r"\(python train_net\.py --config-file \S*tests/configs/tiny_retinanet\.yaml\)",
    ):
        build_teacher(cfg)


# 2. wrong-shape keys (missing/unexpected keys: test_teacher.py) -----------------------------


def test_wrong_shape_names_the_key_and_both_shapes(tmp_path, teacher_weights):
    state = torch.load(teacher_weights["retinanet"], weights_only=True)["model"]
    key = "head.cls_score.weight"
    model_shape = tuple(state[key].shape)
    state[key] = torch.zeros(5, *model_shape[1:])
    path = tmp_path / "shape.pth"
    torch.save({"model": state}, path)
    cfg = model_cfg(DETECTORS["retinanet"][1], "MODEL.TEACHER.WEIGHTS", str(path))
    with pytest.raises(TeacherLoadError) as err:
        build_teacher(cfg)
    message = str(err.value)
    assert f"{key}: {(5, *model_shape[1:])} in the checkpoint, {model_shape} in the model" in (
        message
    )
    assert str(path) in message and "MODEL.TEACHER.ALLOW_PARTIAL_LOAD" in message
    assert "missing in the checkpoint" not in message  # listed once, under its shapes


# 3. different numbers of classes (RetinaNet: test_teacher.py::test_class_count_mismatch) ---


def test_faster_rcnn_class_count_mismatch_is_named():
    cfg = model_cfg(
        DETECTORS["faster_rcnn"][1],
        "MODEL.TEACHER.WEIGHTS",
        "unused.pth",  # the class check comes first
        "MODEL.TEACHER.OPTS",
        "['MODEL.ROI_HEADS.NUM_CLASSES', '5']",
    )
    with pytest.raises(
        ValueError,
        match=r"teacher predicts 5 classes \(teacher MODEL\.ROI_HEADS\.NUM_CLASSES\) but the "
        r"student 6 .*trained on the student's classes",
    ):
        build_teacher(cfg)


# 4. FPN levels that do not match ------------------------------------------------------------

# a teacher of the same family whose FPN starts one level higher than the student's
FEWER_LEVELS = {
    "retinanet": [
        "MODEL.FPN.IN_FEATURES",
        "['res4', 'res5']",
        "MODEL.RETINANET.IN_FEATURES",
        "['p4', 'p5', 'p6', 'p7']",
        "MODEL.ANCHOR_GENERATOR.SIZES",
        "[[32], [64], [128], [256]]",
    ],
    "faster_rcnn": [
        "MODEL.FPN.IN_FEATURES",
        "['res3', 'res4', 'res5']",
        "MODEL.RPN.IN_FEATURES",
        "['p3', 'p4', 'p5', 'p6']",
        "MODEL.ROI_HEADS.IN_FEATURES",
        "['p3', 'p4', 'p5']",
        "MODEL.ANCHOR_GENERATOR.SIZES",
        "[[32], [64], [128], [256]]",
    ],
}


@pytest.mark.parametrize(
    "detector, missing",
    [("retinanet", "p3"), ("faster_rcnn", "p2")],
)
def test_teacher_without_the_distilled_levels_is_refused(detector, missing):
    cfg = model_cfg(DETECTORS[detector][1], "MODEL.TEACHER.OPTS", str(FEWER_LEVELS[detector]))
    student = build_model(cfg)
    tcfg = load_teacher_cfg(cfg)
    teacher = FrozenTeacher(build_model(tcfg), tcfg, cfg.INPUT.FORMAT)
    with pytest.raises(ValueError, match=rf"levels \{{.*\}}.*distils \{{.*\}}: \['{E(missing)}'\]"):
        student.attach_teacher(teacher)
    assert student.teacher is None


# 7. images without annotations ----------------------------------------------------------------


def empty_instances(size=(128, 128)):
    inst = Instances(size)
    inst.gt_boxes = Boxes(torch.zeros(0, 4))
    inst.gt_classes = torch.zeros(0, dtype=torch.long)
    return inst


@pytest.mark.parametrize("detector", DETECTORS)
def test_gkd_step_on_images_without_boxes(tmp_path, teacher_weights, detector):
    """A batch with an image without boxes trains; a batch without any box (no positives)
    gives foreground and soft-label losses of exactly 0, in the graph, and no NaN anywhere."""
    trainer = Trainer(gkd_cfg(detector, tmp_path, teacher_weights[detector]))
    model = trainer.model
    inputs = tiny_inputs(trainer.cfg)
    for empty in ([1], [0, 1]):
        batch = [dict(x) for x in inputs]
        for i in empty:
            batch[i]["instances"] = empty_instances()
        model.zero_grad()
        with EventStorage(0) as storage:
            losses = model(batch)
            sum(losses.values()).backward()
        for k, v in losses.items():
            assert torch.isfinite(v), (empty, k)
            assert v.requires_grad, (empty, k)
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads), empty
        if len(empty) == 2:
            assert storage.history("gkd/num_instances").latest() == 0
            assert losses["loss_gkd_fg"].item() == 0.0
            assert losses["loss_gkd_soft"].item() == 0.0
            assert losses["loss_gkd_bg"].item() > 0.0  # the background is still imitated
        else:
            assert storage.history("gkd/num_instances").latest() > 0


HALF_EMPTY = "gkd_scenes_tiny_train_half_empty"


def register_half_empty() -> None:
    """gkd_scenes_tiny_train with the annotations of every other image removed."""
    if HALF_EMPTY in DatasetCatalog.list():
        return

    def load():
        dicts = [dict(d) for d in DatasetCatalog.get("gkd_scenes_tiny_train")]
        for d in dicts[1::2]:
            d["annotations"] = []
        return dicts

    DatasetCatalog.register(HALF_EMPTY, load)
    meta = MetadataCatalog.get("gkd_scenes_tiny_train")
    MetadataCatalog.get(HALF_EMPTY).set(
        thing_classes=meta.thing_classes, evaluator_type=meta.evaluator_type
    )


@pytest.mark.parametrize("detector", DETECTORS)
def test_training_set_with_unannotated_images_trains(tmp_path, teacher_weights, detector):
    """DATALOADER.FILTER_EMPTY_ANNOTATIONS False keeps images without boxes in the training set
    (and the PGM's); GKD training steps over them with finite losses."""
    register_half_empty()
    trainer = Trainer(
        gkd_cfg(
            detector,
            tmp_path,
            teacher_weights[detector],
            "DATASETS.TRAIN",
            f"('{HALF_EMPTY}',)",
            "DATALOADER.FILTER_EMPTY_ANNOTATIONS",
            "False",
            "SOLVER.MAX_ITER",
            "3",
            *NO_TEST,
        )
    )
    seen = []
    forward = trainer.model.forward

    def spy(batched_inputs):
        seen.extend(len(x["instances"]) for x in batched_inputs)
        return forward(batched_inputs)

    trainer.model.forward = spy
    trainer.train()
    assert 0 in seen and any(seen)  # images with and without boxes were trained on
    history = trainer.storage.histories()
    for key in ("total_loss", "loss_gkd_fg", "loss_gkd_bg", "loss_gkd_soft"):
        assert np.isfinite(history[key].latest()), key


# 8. NaN / Inf losses ----------------------------------------------------------------------------


def test_nan_loss_names_term_and_iteration_and_keeps_last_checkpoint(tmp_path, teacher_weights):
    """A NaN in one GKD term at the last iteration: the error names the term, the iteration and
    the last checkpoint, which stays the last checkpoint (no model_final.pth, no evaluation of
    the failed run) and loads weights-only; --resume continues from it."""
    out = tmp_path / "run"
    opts = ("SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2")
    trainer = Trainer(gkd_cfg("retinanet", out, teacher_weights["retinanet"], *opts))
    distill = trainer.model.distiller.forward

    def nan_at_3(*args, **kwargs):
        losses, *rest = distill(*args, **kwargs)
        if get_event_storage().iter == 3:
            losses["loss_gkd_fg"] = losses["loss_gkd_fg"] * float("nan")
        return (losses, *rest)

    trainer.model.distiller.forward = nan_at_3
    last = str(out / "model_0000001.pth")
    with pytest.raises(NonFiniteLossError, match=r"at iteration 3: loss_gkd_fg = nan \(") as err:
        trainer.train()
    assert isinstance(err.value, FloatingPointError)  # the type detectron2 raises
    assert f"The last checkpoint, {last!r}, is intact" in str(err.value)
    assert "loss_cls = " in str(err.value)  # the finite terms, for context
    assert (out / "last_checkpoint").read_text() == "model_0000001.pth"
    assert not (out / "model_final.pth").exists()
    assert not (out / "inference").exists()  # the failed run was not evaluated
    assert not list(out.glob("*.tmp"))
    # gkd_d2's checkpoints (optimizer, RNG, PGM sample, prototype bank) load weights-only
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["iteration"] == 1
    assert {"_trainer", "rng", "hooks"} <= ckpt["trainer"].keys()
    assert "instances" in ckpt["trainer"]["hooks"]["PrototypeRefresh"]
    assert "distiller.protos_t" in ckpt["model"]
    resumed = Trainer(gkd_cfg("retinanet", out, teacher_weights["retinanet"], *opts))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2


def test_check_finite_losses_names_every_bad_term():
    finite = {"loss_cls": torch.tensor(1.5), "loss_box_reg": torch.tensor(0.25)}
    check_finite_losses(finite, 7)  # all finite: no error
    bad = {**finite, "loss_gkd_soft": torch.tensor(float("inf")), "loss_x": torch.tensor(np.nan)}
    with pytest.raises(
        NonFiniteLossError,
        match=r"iteration 7: loss_gkd_soft = inf, loss_x = nan \(finite: loss_cls = 1\.5, "
        r"loss_box_reg = 0\.25\).*No checkpoint has been written yet",
    ):
        check_finite_losses(bad, 7)


def test_a_dominating_distillation_names_the_kd_weights_first():
    """When the distillation terms are most of the loss (or themselves not finite), the error
    names the KD weights with their values and clipping; otherwise it does not."""
    weights = {"MODEL.GKD.FG_WEIGHT": 1.0, "MODEL.GKD.BG_WEIGHT": 4.0, "MODEL.GKD.SOFT_WEIGHT": 1.0}
    kd_heavy = {
        "loss_cls": torch.tensor(1.0),
        "loss_box_reg": torch.tensor(float("nan")),
        "loss_gkd_fg": torch.tensor(1.2e5),
        "loss_gkd_bg": torch.tensor(2.0e5),
    }
    advice = (
        r"The distillation terms \(loss_gkd_\*\) were 100% of the loss of this iteration's finite "
        r"terms: .*Lower MODEL\.GKD\.FG_WEIGHT / MODEL\.GKD\.BG_WEIGHT / MODEL\.GKD\.SOFT_WEIGHT "
        r"\(now 1 / 4 / 1\), e\.g\. tenfold, or set SOLVER\.CLIP_GRADIENTS\.ENABLED True"
    )
    with pytest.raises(NonFiniteLossError, match=advice):
        check_finite_losses(kd_heavy, 4, kd_weights=weights)
    # the share logged at the last iteration is the one named
    with pytest.raises(NonFiniteLossError, match=r"were 97% of the loss at the last logged"):
        check_finite_losses(kd_heavy, 4, kd_share=0.97, kd_weights=weights)
    # a distillation term itself not finite
    kd_nan = {"loss_cls": torch.tensor(5.0), "loss_gkd_soft": torch.tensor(float("inf"))}
    with pytest.raises(NonFiniteLossError, match=r"were 0% of the loss .*Lower MODEL\.GKD"):
        check_finite_losses(kd_nan, 4, kd_weights=weights)
    # detection terms dominate: the usual advice only
    light = {"loss_cls": torch.tensor(float("nan")), "loss_box_reg": torch.tensor(3.0)}
    light["loss_gkd_fg"] = torch.tensor(0.5)
    with pytest.raises(NonFiniteLossError) as e:
        check_finite_losses(light, 4, kd_share=0.2, kd_weights=weights)
    assert "FG_WEIGHT" not in str(e.value) and "lower SOLVER.BASE_LR" in str(e.value)


def test_a_run_whose_distillation_explodes_stops_naming_the_kd_weights(tmp_path, teacher_weights):
    """A GKD run with a feature weight that overflows the loss stops before the backward pass,
    and its error names the weights, with this run's values, before the learning rate."""
    cfg = gkd_cfg(
        "retinanet",
        tmp_path,
        teacher_weights["retinanet"],
        "MODEL.GKD.FG_WEIGHT",
        "1e38",
        "MODEL.GKD.BG_WEIGHT",
        "1e38",
        "SOLVER.MAX_ITER",
        "2",
        *NO_TEST,
    )
    trainer = Trainer(cfg)
    with pytest.raises(NonFiniteLossError) as e:
        trainer.train()
    message = str(e.value)
    assert "loss_gkd_" in message.split("(finite:")[0]
    assert "(now 1e+38 / 1e+38 / 1)" in message
    assert message.index("FG_WEIGHT") < message.index("lower SOLVER.BASE_LR")


# 9. truncated or corrupt checkpoints; weights-only loading ---------------------------------


def corrupt(kind, src, dst):
    if kind == "truncated":
        return truncate(src, dst)
    open(dst, "wb").write(b"" if kind == "empty" else b"<html>404 Not Found</html>")
    return str(dst)


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("truncated", "the zip archive that torch.save writes ends early"),
        ("empty", "the file is empty"),
        ("html", "it is not a complete torch.save file .*starting b'<html>"),
    ],
)
def test_corrupt_model_weights_are_named(tmp_path, trained_run, kind, reason):
    path = corrupt(kind, trained_run / "model_final.pth", tmp_path / "weights.pth")
    model = build_model(model_cfg(TINY_CONFIG))
    with pytest.raises(
        CheckpointLoadError,
        match=rf"(?s)Checkpoint '{E(path)}' is truncated or corrupt: {reason}"
        r".*It is MODEL\.WEIGHTS",
    ):
        GKDCheckpointer(model).resume_or_load(path, resume=False)


def test_truncated_model_weights_stop_training_and_eval_only(tmp_path, trained_run):
    import importlib.util

    # train_net.py is a script, not a module on sys.path
    spec = importlib.util.spec_from_file_location("train_net", REPO / "train_net.py")
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    path = truncate(trained_run / "model_final.pth", tmp_path / "weights.pth")
    trainer = Trainer(
        setup_test_cfg(TINY_CONFIG, "OUTPUT_DIR", str(tmp_path), "MODEL.WEIGHTS", path)
    )
    with pytest.raises(CheckpointLoadError, match=rf"'{E(path)}' is truncated or corrupt"):
        trainer.resume_or_load(resume=False)
    args = SimpleNamespace(
        config_file=str(TINY_CONFIG),
        eval_only=True,
        resume=False,
        opts=["OUTPUT_DIR", str(tmp_path), "MODEL.WEIGHTS", path],
    )
    with pytest.raises(CheckpointLoadError, match=rf"'{E(path)}' is truncated or corrupt"):
        train_net.main(args)


def test_missing_model_weights_are_named(tmp_path):
    missing = str(tmp_path / "nope.pth")
    model = build_model(model_cfg(TINY_CONFIG))
    with pytest.raises(
        CheckpointLoadError,
        match=rf"'{E(missing)}' not found \(no such file\)\. No checkpoint file .*either\n"
        r"It is MODEL\.WEIGHTS",
    ):
        GKDCheckpointer(model).resume_or_load(missing, resume=False)


def test_truncated_teacher_weights_are_named(tmp_path, teacher_weights):
    path = truncate(teacher_weights["retinanet"], tmp_path / "teacher.pth")
    cfg = model_cfg(DETECTORS["retinanet"][1], "MODEL.TEACHER.WEIGHTS", path)
    with pytest.raises(
        TeacherLoadError,
        match=rf"(?s)Checkpoint '{E(path)}' is truncated or corrupt.*It is MODEL\.TEACHER\.WEIGHTS",
    ):
        build_teacher(cfg)


def test_resume_from_truncated_last_checkpoint_names_it_and_the_others(tmp_path, trained_run):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    truncate(trained_run / "model_final.pth", out / "model_final.pth", 0.9)
    cfg = setup_test_cfg(TINY_CONFIG, "OUTPUT_DIR", str(out), "SOLVER.MAX_ITER", "6", *NO_TEST)
    trainer = Trainer(cfg)
    with pytest.raises(
        CheckpointLoadError,
        match=rf"(?s)'{E(out / 'model_final.pth')}' is truncated or corrupt.*Cannot resume from it"
        r".*: model_0000001\.pth, model_0000003\.pth\. To resume from one, write its file name "
        rf"into '{E(out / 'last_checkpoint')}'",
    ):
        trainer.resume_or_load(resume=True)
    # the way out the message gives works
    (out / "last_checkpoint").write_text("model_0000003.pth")
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 4


def test_resume_with_a_deleted_last_checkpoint_file(tmp_path, trained_run):
    out = tmp_path / "run"
    shutil.copytree(trained_run, out)
    (out / "model_final.pth").unlink()
    model = build_model(model_cfg(TINY_CONFIG))
    with pytest.raises(
        CheckpointLoadError,
        match=r"(?s)model_final\.pth' \(named by .*last_checkpoint'\) not found",
    ):
        GKDCheckpointer(model, str(out)).resume_or_load("", resume=True)


def test_truncated_pkl_is_named(tmp_path):
    import pickle

    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({"model": {"w": np.ones(3)}, "__author__": "x"})[:20])
    model = build_model(model_cfg(TINY_CONFIG))
    with pytest.raises(CheckpointLoadError, match=rf"'{E(path)}' is truncated or corrupt.*pickle"):
        GKDCheckpointer(model).resume_or_load(str(path), resume=False)


class _Marker:
    """Unpickling this creates a folder: evidence that code in the file ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_pth_with_python_objects_is_refused_unless_trusted(tmp_path, monkeypatch, caplog):
    marker = tmp_path / "code_ran"
    path = tmp_path / "objects.pth"
    torch.save({"model": {"w": torch.ones(2)}, "extra": _Marker(str(marker))}, path)
    monkeypatch.delenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", raising=False)
    with pytest.raises(
        CheckpointLoadError,
        match=rf"'{E(path)}' holds Python objects .*\((posix|nt)\.mkdir\)"
        r".*TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1",
    ):
        read_pth(str(path))
    assert not marker.exists()  # nothing in the file ran
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    # (detectron2's setup_logger stops gkd_d2's records at "gkd_d2"; caplog listens at the root)
    monkeypatch.setattr(logging.getLogger("gkd_d2"), "propagate", True)
    with caplog.at_level(logging.WARNING):
        read_pth(str(path))
    assert marker.exists()  # the user said they trust it
    assert "full unpickling" in caplog.text


def test_trainer_checkpoints_load_weights_only(trained_run):
    for name in ("model_0000001.pth", "model_final.pth"):
        ckpt = torch.load(trained_run / name, weights_only=True)
        assert {"model", "trainer", "iteration"} <= ckpt.keys()
        assert {"_trainer", "rng", "hooks"} <= ckpt["trainer"].keys()


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    """A save that dies half-way leaves the previous file and last_checkpoint as they were."""
    model = torch.nn.Linear(2, 2)
    checkpointer = GKDCheckpointer(model, str(tmp_path), save_to_disk=True)
    checkpointer.save("model_a", iteration=1)
    before = (tmp_path / "model_a.pth").read_bytes()
    with torch.no_grad():
        model.weight.add_(1.0)

    def dies_half_way(obj, f):
        f.write(before[: len(before) // 2])
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        checkpointer.save("model_a", iteration=2)
    monkeypatch.undo()
    assert (tmp_path / "model_a.pth").read_bytes() == before
    assert (tmp_path / "last_checkpoint").read_text() == "model_a.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_a.pth"]
    assert read_pth(str(tmp_path / "model_a.pth"))["iteration"] == 1


# 10. unknown config keys --------------------------------------------------------------------


def setup_args(config_file, *opts):
    return SimpleNamespace(config_file=str(config_file), eval_only=False, resume=False, opts=opts)


def test_unknown_override_key_is_named_with_the_closest_keys(tmp_path):
    from gkd_d2.engine import setup_cfg

    with pytest.raises(
        ConfigError,
        match=r"KEY VALUE overrides: Non-existent key: MODEL\.RETINANET\.NUM_CLASSE\. "
        r"Did you mean MODEL\.RETINANET\.NUM_CLASSES\?",
    ):
        setup_cfg(
            setup_args(TINY_CONFIG, "OUTPUT_DIR", str(tmp_path), "MODEL.RETINANET.NUM_CLASSE", "6")
        )


def test_unknown_key_in_a_config_file_names_the_file_and_key(tmp_path):
    from gkd_d2.engine import setup_cfg

    config = tmp_path / "typo.yaml"
    config.write_text(f'_BASE_: "{TINY_CONFIG}"\nMODEL:\n  GKD:\n    TEMPRATURE: 4.0\n')
    with pytest.raises(
        ConfigError,
        match=rf"config file '{E(config)}' .*Non-existent config key: MODEL\.GKD\.TEMPRATURE\. "
        r"Did you mean MODEL\.GKD\.TEMPERATURE\?",
    ):
        setup_cfg(setup_args(config, "OUTPUT_DIR", str(tmp_path)))


def test_wrong_value_type_and_missing_config_file_are_named(tmp_path):
    from gkd_d2.engine import setup_cfg

    with pytest.raises(ConfigError, match=r"Type mismatch .* for config key: SOLVER\.MAX_ITER"):
        setup_cfg(setup_args(TINY_CONFIG, "SOLVER.MAX_ITER", "many"))
    missing = tmp_path / "nope.yaml"
    with pytest.raises(
        ConfigError, match=rf"Config file '{E(missing)}' does not exist \(relative paths start at"
    ):
        setup_cfg(setup_args(missing))


def test_unknown_key_in_teacher_opts_is_named():
    cfg = model_cfg(
        DETECTORS["retinanet"][1], "MODEL.TEACHER.OPTS", "['MODEL.FPN.OUT_CHANEL', '32']"
    )
    with pytest.raises(
        ConfigError,
        match=r"Teacher config .*Non-existent key: MODEL\.FPN\.OUT_CHANEL\. "
        r"Did you mean MODEL\.FPN\.OUT_CHANNELS\?",
    ):
        load_teacher_cfg(cfg)


# 11. --num-gpus beyond the devices --------------------------------------------------------------


def test_more_gpus_than_devices_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(
        ValueError, match=r"--num-gpus 4 but this machine has 1 CUDA device\(s\): pass --num-gpus 1"
    ):
        launch(print, 4)


# 15. a missing checkpoint is reported as missing, with the nearest existing ones ---------------


@pytest.fixture
def checkpoint_tree(tmp_path):
    """output/run_a/model_final.pth (newer) and output/run_b/model_0000001.pth (older)."""
    out = tmp_path / "output"
    for run, name in (("run_b", "model_0000001.pth"), ("run_a", "model_final.pth")):
        (out / run).mkdir(parents=True)
        torch.save({"model": {}}, out / run / name)
    os.utime(out / "run_b" / "model_0000001.pth", (1e9, 1e9))
    return out


def assert_missing(message: str, path, listed=()) -> None:
    assert f"Checkpoint '{path}' not found (no such file)" in message, message
    assert "truncated" not in message and "Errno" not in message, message
    for p in listed:
        assert str(p) in message, (p, message)


def test_a_missing_checkpoint_is_named_with_the_ones_beside_it(checkpoint_tree):
    missing = checkpoint_tree / "run_a" / "model_0009999.pth"
    with pytest.raises(CheckpointLoadError) as e:
        read_pth(str(missing))
    assert_missing(str(e.value), missing, [checkpoint_tree / "run_a" / "model_final.pth"])
    assert f"under '{checkpoint_tree / 'run_a'}'" in str(e.value)


def test_a_missing_folder_lists_the_checkpoints_under_the_nearest_existing_one(checkpoint_tree):
    missing = checkpoint_tree / "run_c" / "sub" / "model_final.pth"
    with pytest.raises(CheckpointLoadError) as e:
        read_pth(str(missing))
    newer, older = checkpoint_tree / "run_a" / "model_final.pth", checkpoint_tree / "run_b"
    assert_missing(str(e.value), missing, [newer, older / "model_0000001.pth"])
    assert str(e.value).index(str(newer)) < str(e.value).index(str(older))  # newest first
    assert f"under '{checkpoint_tree}'" in str(e.value)


def test_files_a_run_writes_that_are_not_checkpoints_are_not_suggested(checkpoint_tree):
    """The evaluator's predictions and the teacher cache are .pth files, not checkpoints."""
    run = checkpoint_tree / "run_a"
    (run / "inference").mkdir()
    for name in ("inference/instances_predictions.pth", "gkd_teacher_features.pth"):
        torch.save({}, run / name)
    with pytest.raises(CheckpointLoadError) as e:
        read_pth(str(run / "model_0009999.pth"))
    assert_missing(str(e.value), run / "model_0009999.pth", [run / "model_final.pth"])
    assert "instances_predictions" not in str(e.value) and "gkd_teacher_features" not in str(
        e.value
    )


def test_a_directory_or_an_empty_neighbourhood_is_said_so(checkpoint_tree, tmp_path):
    with pytest.raises(CheckpointLoadError, match=r"run_a' is a directory, not a checkpoint"):
        read_pth(str(checkpoint_tree / "run_a"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        CheckpointLoadError,
        match=rf"not found \(no such file\)\. No checkpoint file \(\.pth, \.pkl\) under "
        rf"'{E(tmp_path / 'empty')}' either",
    ):
        read_pth(str(tmp_path / "empty" / "model_final.pth"))


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
def test_missing_model_weights_and_checkpointer_loads_list_nearby(checkpoint_tree, suffix):
    missing = checkpoint_tree / "run_a" / f"model_zoo{suffix}"
    model = build_model(model_cfg(TINY_CONFIG))
    near = [checkpoint_tree / "run_a" / "model_final.pth"]
    with pytest.raises(CheckpointLoadError) as e:  # MODEL.WEIGHTS (train_net, Trainer)
        GKDCheckpointer(model).resume_or_load(str(missing), resume=False)
    assert_missing(str(e.value), missing, near)
    assert "It is MODEL.WEIGHTS" in str(e.value)
    with pytest.raises(CheckpointLoadError) as e:  # fvcore's own assert said "not found!"
        GKDCheckpointer(model).load(str(missing))
    assert_missing(str(e.value), missing, near)


def test_missing_eval_only_weights_are_named(checkpoint_tree, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_net", REPO / "train_net.py")
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)
    missing = checkpoint_tree / "run_a" / "model_0000002.pth"
    args = SimpleNamespace(
        config_file=str(TINY_CONFIG),
        eval_only=True,
        resume=False,
        opts=["OUTPUT_DIR", str(tmp_path / "eval"), "MODEL.WEIGHTS", str(missing)],
    )
    with pytest.raises(CheckpointLoadError) as e:
        train_net.main(args)
    assert_missing(str(e.value), missing, [checkpoint_tree / "run_a" / "model_final.pth"])


def test_missing_teacher_weights_list_nearby_checkpoints(checkpoint_tree):
    missing = checkpoint_tree / "teacher" / "model_final.pth"
    cfg = model_cfg(DETECTORS["retinanet"][1], "MODEL.TEACHER.WEIGHTS", str(missing))
    with pytest.raises(
        TeacherLoadError,
        match=rf"{E(missing)}' \(MODEL\.TEACHER\.WEIGHTS\) not found: train the teacher first .*"
        rf"; nearest existing checkpoints: {E(checkpoint_tree / 'run_a' / 'model_final.pth')}, "
        rf"{E(checkpoint_tree / 'run_b' / 'model_0000001.pth')}",
    ):
        build_teacher(cfg)


def load_tool(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_tools_report_a_missing_checkpoint_as_missing(checkpoint_tree, tmp_path, capsys):
    missing = checkpoint_tree / "run_a" / "model_0000002.pth"
    near = [checkpoint_tree / "run_a" / "model_final.pth"]
    config = str(DETECTORS["retinanet"][1])
    vis = load_tool("visualize_prototypes")
    argv = ["--config-file", config, "--checkpoint", str(missing), "--output", str(tmp_path)]
    assert vis.main(argv) == 2
    assert_missing(capsys.readouterr().err, missing, near)
    export = load_tool("export_student")
    argv = ["--config-file", config, "--weights", str(missing), "--output", str(tmp_path / "x")]
    assert export.main(argv) == 1
    assert_missing(capsys.readouterr().err, missing, near)
