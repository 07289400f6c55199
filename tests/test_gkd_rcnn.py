"""GKDRCNN end to end on the CPU: positive proposals, RoI logits and r, teacher isolation, the
shared distiller, the local-only baseline, extra terms, exact resume."""

import math

import pytest
import torch
from conftest import (
    REPO,
    TEACHER_WIDTHS,
    bn_eval,
    identity_adapters,
    setup_test_cfg,
    tiny_inputs,
    train_stop_and_resume,
)
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import gkd_d2  # noqa: F401
from gkd_d2 import load_config
from gkd_d2.distill import soft_label_kl
from gkd_d2.engine import PrototypeRefresh, Trainer
from gkd_d2.modeling import GKDDistiller
from gkd_d2.modeling.gkd_rcnn import positive_proposals

TEACHER_CFG = REPO / "tests" / "configs" / "tiny_faster_rcnn.yaml"
GKD_CFG = REPO / "tests" / "configs" / "tiny_gkd_faster_rcnn.yaml"


@pytest.fixture(scope="module")
def teacher_weights(tmp_path_factory) -> str:
    """A tiny Faster R-CNN teacher's weights (random, fixed seed: mechanics under test)."""
    cfg = load_config(str(TEACHER_CFG))
    torch.manual_seed(123)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pth"
    torch.save({"model": build_model(cfg).state_dict()}, path)
    return str(path)


def gkd_cfg(out, weights, *opts):
    return setup_test_cfg(GKD_CFG, "OUTPUT_DIR", str(out), "MODEL.TEACHER.WEIGHTS", weights, *opts)


def capture_distiller(model):
    """Record the (args, kwargs) of every distiller call of ``model``."""
    calls = []
    original = model.distiller.forward

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    model.distiller.forward = spy
    return calls


def test_positive_proposals_are_the_foreground_rows_image_major():
    a = Instances((64, 64))
    a.proposal_boxes = Boxes(torch.tensor([[0.0, 0, 10, 10], [1, 1, 5, 5], [2, 2, 20, 30]]))
    a.gt_classes = torch.tensor([2, 3, 0])  # K = 3: class 3 is background
    b = Instances((64, 64))
    b.proposal_boxes = Boxes(torch.zeros(0, 4))
    b.gt_classes = torch.zeros(0, dtype=torch.long)
    c = Instances((64, 64))
    c.proposal_boxes = Boxes(torch.tensor([[4.0, 4, 8, 8], [3, 3, 9, 9]]))
    c.gt_classes = torch.tensor([3, 1])
    rows, batch_idx, boxes, classes = positive_proposals([a, b, c], num_classes=3)
    assert rows.tolist() == [0, 2, 4]
    assert batch_idx.tolist() == [0, 0, 2]
    assert classes.tolist() == [2, 0, 1]
    assert boxes.tolist() == [[0, 0, 10, 10], [2, 2, 20, 30], [3, 3, 9, 9]]
    rows, batch_idx, boxes, classes = positive_proposals([b], num_classes=3)
    assert rows.shape == (0,) and boxes.shape == (0, 4)


def test_distils_p2_to_p6_with_mean_reduction_and_logs(tmp_path, teacher_weights):
    trainer = Trainer(gkd_cfg(tmp_path, teacher_weights, "SOLVER.MAX_ITER", "3"))
    model, teacher = trainer.model, trainer.model.teacher
    assert model.distill_in_features == ["p2", "p3", "p4", "p5", "p6"]
    assert model.distiller.strides == [4, 8, 16, 32, 64]
    assert model.distiller.level_reduction == "mean"  # "auto": official two-stage choice
    assert model.box_level_index.tolist() == [0, 1, 2, 3]  # pooler P2-P5
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    records = []
    with model.distiller.recording_instances(records.append):
        trainer.train()
    after = teacher.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in teacher.model.parameters())
    teacher_ids = {id(p) for p in teacher.model.parameters()}
    optimizer_ids = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not teacher_ids & optimizer_ids
    assert not teacher_ids & {id(p) for p in model.parameters()}
    assert {id(p) for p in model.distiller.adapters.parameters()} <= optimizer_ids
    ckpt = torch.load(tmp_path / "model_final.pth", weights_only=False)
    assert not any(k.startswith("teacher") or k == "box_level_index" for k in ckpt["model"])
    assert ckpt["model"]["distiller.protos_s"].shape == (5, 6, 3, 32)
    assert ckpt["model"]["distiller.protos_t"].shape == (5, 6, 3, 64)
    history = trainer.storage.histories()
    for key in ("loss_gkd_fg", "loss_gkd_bg", "loss_gkd_soft", "gkd/r_mean", "gkd/r_soft_mean"):
        assert key in history, key
    # the logged soft-label r is that of the last iteration's RoIs
    soft_r = records[-1].soft_r.float()
    assert len(soft_r) > 0 and soft_r.min() < 1
    assert history["gkd/r_soft_mean"].latest() == pytest.approx(float(soft_r.mean()))
    assert history["gkd/r_soft_min"].latest() == pytest.approx(float(soft_r.min()))


def test_roi_rows_logits_and_soft_r_match_each_image_alone(tmp_path, teacher_weights):
    """Distiller inputs of a batch of 2: for each image's rows, the student and teacher logits
    and mean RoI features equal a box-head pass over that image alone on the same boxes; the
    soft-label levels are detectron2's pooler levels (by hand); the soft loss of the batch is
    the row-weighted mean of the per-image ones."""
    trainer = Trainer(gkd_cfg(tmp_path, teacher_weights))
    model, teacher = trainer.model, trainer.model.teacher
    model.attenuation_schedule = None
    bn_eval(model)
    torch.manual_seed(0)
    for lvl in range(5):
        for c in range(6):
            model.distiller.set_bank(lvl, c, torch.randn(3, 32), torch.randn(3, 64))
    inputs = tiny_inputs(trainer.cfg)
    calls = capture_distiller(model)
    with EventStorage(0), torch.no_grad():
        pair = model(inputs)
    (fs, ft, boxes, bidx, classes, levels, zs, zt), kw = calls[0]
    s_desc, t_desc, soft_levels = kw["soft_descriptors"]
    assert set(bidx.tolist()) == {0, 1}
    assert bidx.tolist() == sorted(bidx.tolist())  # image-major
    heads = model.roi_heads
    with torch.no_grad():
        for i, x in enumerate(inputs):
            sel = bidx == i
            feats = model.backbone(model.preprocess_image([x]).tensor)
            pooled = heads.box_pooler(
                [feats[f] for f in heads.box_in_features], [Boxes(boxes[sel])]
            )
            z = heads.box_predictor(heads.box_head(pooled))[0]
            torch.testing.assert_close(zs[sel], z, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(s_desc[sel], pooled.mean(dim=(2, 3)), rtol=1e-4, atol=1e-5)
            t_feats, _ = teacher.features([x])
            t_z, t_pooled = teacher.roi_logits(t_feats, [Boxes(boxes[sel])])
            torch.testing.assert_close(zt[sel], t_z, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(t_desc[sel], t_pooled, rtol=1e-4, atol=1e-5)
    # detectron2's pooler rule: floor(4 + log2(sqrt(area) / 224)) clamped to P2-P5, from P2
    for box, lvl in zip(boxes.tolist(), soft_levels.tolist()):
        side = math.sqrt((box[2] - box[0]) * (box[3] - box[1]))
        assert lvl == min(max(math.floor(4 + math.log2(side / 224 + 1e-8)), 2), 5) - 2
    # the mask levels: the official rule, floor(log2(sqrt((w+1)(h+1))/56)) clamped to P2-P6
    for box, lvl in zip(boxes.tolist(), levels.tolist()):
        side = math.sqrt((box[2] - box[0] + 1) * (box[3] - box[1] + 1))
        assert lvl == min(max(math.floor(math.log2(side / 56 + 1e-6)), 0), 4)
    # soft loss of the batch = row-weighted mean of each image's
    per_image = []
    for i in range(2):
        sel = bidx == i
        args = (
            [f[i : i + 1] for f in fs],
            [f[i : i + 1] for f in ft],
            boxes[sel],
            torch.zeros(int(sel.sum()), dtype=torch.long),
            classes[sel],
            levels[sel],
            zs[sel],
            zt[sel],
        )
        desc = (s_desc[sel], t_desc[sel], soft_levels[sel])
        loss = model.distiller(*args, soft_descriptors=desc)[0]["loss_gkd_soft"]
        per_image.append((int(sel.sum()), loss))
    expected = sum(n * v for n, v in per_image) / sum(n for n, _ in per_image)
    torch.testing.assert_close(pair["loss_gkd_soft"], expected, rtol=1e-5, atol=1e-7)
    # and the soft r is the RoI-feature r, not the box-crop one
    r_soft = model.distiller.robustness_at(s_desc, t_desc, classes, soft_levels)
    torch.testing.assert_close(pair["loss_gkd_soft"], soft_label_kl(zs, zt, r_soft, 2.0))


def test_losses_zero_when_student_equals_teacher(tmp_path, teacher_weights):
    trainer = Trainer(gkd_cfg(tmp_path, teacher_weights, *TEACHER_WIDTHS))
    model = trainer.model
    teacher_sd = torch.load(teacher_weights, weights_only=True)["model"]
    missing, unexpected = model.load_state_dict(teacher_sd, strict=False)
    assert not unexpected and all(k.startswith("distiller.") for k in missing)
    identity_adapters(model.distiller)
    with torch.no_grad():
        torch.manual_seed(0)
        for lvl in range(5):  # equal models have equal prototypes
            for c in range(6):
                p = torch.randn(3, 64)
                model.distiller.set_bank(lvl, c, p, p.clone())
    bn_eval(model)
    with EventStorage(0) as storage, torch.no_grad():
        losses = model(tiny_inputs(trainer.cfg))
    for k in ("loss_gkd_fg", "loss_gkd_bg", "loss_gkd_soft"):
        assert abs(losses[k].item()) < 1e-6, k
    assert storage.history("gkd/num_instances").latest() > 0
    assert storage.history("gkd/r_min").latest() == 1.0
    assert storage.history("gkd/r_soft_min").latest() == 1.0


def test_retinanet_and_faster_rcnn_run_through_the_same_distiller(
    tmp_path, teacher_weights, monkeypatch
):
    """One training step of each detector goes through GKDDistiller.forward (the only place
    that computes losses), with the detector-specific instances."""
    from test_gkd_retinanet import GKD_CFG as RETINA_CFG
    from test_gkd_retinanet import TEACHER_CFG as RETINA_TEACHER

    cfg = load_config(str(RETINA_TEACHER))
    retina_weights = tmp_path / "retina_teacher.pth"
    torch.save({"model": build_model(cfg).state_dict()}, retina_weights)
    seen = []
    original = GKDDistiller.forward

    def spy(self, *args, **kwargs):
        seen.append((type(self), len(args[0]), "soft_descriptors" in kwargs))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GKDDistiller, "forward", spy)
    for config, weights, name in (
        (RETINA_CFG, str(retina_weights), "retina"),
        (GKD_CFG, teacher_weights, "rcnn"),
    ):
        out = tmp_path / name
        Trainer(
            setup_test_cfg(
                config,
                "OUTPUT_DIR",
                str(out),
                "MODEL.TEACHER.WEIGHTS",
                weights,
                "SOLVER.MAX_ITER",
                "1",
                "TEST.EVAL_PERIOD",
                "0",
            )
        ).train()
    # RetinaNet: P3-P7, soft r from the anchors' crops; Faster R-CNN: P2-P6, RoI-feature r
    assert seen == [(GKDDistiller, 5, False), (GKDDistiller, 5, True)]


def test_teacher_of_another_family_is_refused(tmp_path):
    from test_gkd_retinanet import TEACHER_CFG as RETINA_TEACHER

    cfg = load_config(str(RETINA_TEACHER))
    weights = tmp_path / "retina.pth"
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    cfg = gkd_cfg(
        tmp_path,
        str(weights),
        "MODEL.TEACHER.CONFIG_FILE",
        str(RETINA_TEACHER),
    )
    with pytest.raises(ValueError, match=r"levels .*p7.*distils .*p2.*\['p2'\]"):
        Trainer(cfg)


def test_local_only_baseline_needs_no_prototypes(tmp_path, teacher_weights):
    """ROBUST_WEIGHTS False: binary mask and plain soft labels (DeFeat + KD), no PGM hook."""
    trainer = Trainer(
        gkd_cfg(
            tmp_path, teacher_weights, "MODEL.GKD.ROBUST_WEIGHTS", "False", "SOLVER.MAX_ITER", "2"
        )
    )
    assert not any(isinstance(h, PrototypeRefresh) for h in trainer._hooks)
    calls = capture_distiller(trainer.model)
    trainer.train()
    history = trainer.storage.histories()
    assert {"loss_gkd_fg", "loss_gkd_bg", "loss_gkd_soft"} <= history.keys()
    assert "gkd/r_mean" not in history and "gkd/refresh_seconds" not in history
    assert int(trainer.model.distiller.bank_iter) == -1
    (fs, ft, boxes, bidx, classes, levels, zs, zt), kw = calls[-1]
    with torch.no_grad():
        losses, _ = trainer.model.distiller(*calls[-1][0], **kw)
    torch.testing.assert_close(
        losses["loss_gkd_soft"], soft_label_kl(zs, zt, torch.ones(len(zs)), 2.0)
    )


def test_extra_feature_mse_term_combines_with_gkd(tmp_path, teacher_weights):
    trainer = Trainer(
        gkd_cfg(
            tmp_path,
            teacher_weights,
            "MODEL.GKD.EXTRA_LOSSES",
            "['FeatureMSE']",
            "MODEL.GKD.EXTRA_LOSS_WEIGHTS",
            "[2.0]",
            "SOLVER.MAX_ITER",
            "1",
        )
    )
    term = trainer.model.distiller.extra_terms[0]
    optimizer_ids = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert {id(p) for p in term.parameters()} <= optimizer_ids
    calls = capture_distiller(trainer.model)
    trainer.train()
    assert "loss_kd_feature_mse" in trainer.storage.histories()
    args, kw = calls[-1]
    with torch.no_grad():
        losses, _ = trainer.model.distiller(*args, **kw)
        by_hand = (
            sum(0.5 * ((a(s) - t) ** 2).mean() for a, s, t in zip(term.adapters, args[0], args[1]))
            / 5
        )  # mean over the 5 levels (two-stage), a(e) = 1 at iteration 0
    torch.testing.assert_close(losses["loss_kd_feature_mse"], 2.0 * by_hand)
    assert {"loss_gkd_fg", "loss_gkd_bg", "loss_gkd_soft"} <= losses.keys()


@pytest.mark.parametrize(
    "names, weights, error",
    [
        ("['FeatureMSE']", "[]", "1 names .* 0 weights"),
        ("['NoSuchTerm']", "[1.0]", "no distillation term named 'NoSuchTerm'.*FeatureMSE"),
    ],
)
def test_bad_extra_loss_config_is_named(tmp_path, teacher_weights, names, weights, error):
    cfg = gkd_cfg(
        tmp_path,
        teacher_weights,
        "MODEL.GKD.EXTRA_LOSSES",
        names,
        "MODEL.GKD.EXTRA_LOSS_WEIGHTS",
        weights,
    )
    with pytest.raises((ValueError, KeyError), match=error):
        Trainer.build_model(cfg)


def test_resume_equals_uninterrupted_run_bitwise(tmp_path, python, teacher_weights):
    """8 iterations == 4, a stop, --resume for 4 more; refreshes at 0, 3, 6 (RoI sampling draws
    from torch's RNG, restored from the checkpoint)."""
    opts = [
        "MODEL.TEACHER.WEIGHTS",
        teacher_weights,
        "SOLVER.MAX_ITER",
        "8",
        "SOLVER.CHECKPOINT_PERIOD",
        "4",
        "TEST.EVAL_PERIOD",
        "0",
    ]
    full, split = tmp_path / "full", tmp_path / "split"
    _, _, log = train_stop_and_resume(python, GKD_CFG, opts, full, split)
    assert "Starting training from iteration 4" in log
    a = torch.load(full / "model_final.pth", weights_only=False)["model"]
    b = torch.load(split / "model_final.pth", weights_only=False)["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert int(b["distiller.bank_iter"]) == 6


def test_attenuation_follows_epochs_of_data_not_the_refresh_period(tmp_path, teacher_weights):
    from gkd_d2.engine.schedule import train_dataset_dicts

    trainer = Trainer(gkd_cfg(tmp_path, teacher_weights, "SOLVER.MAX_ITER", "40"))
    assert len(train_dataset_dicts(trainer.cfg)) == 32
    # epochs of 32 images / batch 2 = 16 iterations; 40 iterations span 3 of them
    assert trainer.model.attenuation_schedule == (16, 3)
    (refresh,) = [h for h in trainer._hooks if isinstance(h, PrototypeRefresh)]
    assert refresh.period == 3  # REFRESH_PERIOD of the config
    with EventStorage(32):
        assert trainer.model.attenuation() == pytest.approx(1 - 2 / 3)
