"""The invariants of GKD's global knowledge, in the configurations users train.

A student identical to its teacher must get r = 1 for every instance, the same prototypes in
both spaces and a zero global loss, whatever norm its backbone and FPN use (BN, SyncBN, GN,
FrozenBN, none), with the student in train mode (as the trainer runs it: no BN put in eval
mode by the test), at iteration 0 and after a refresh, for both detectors. With norms that do
not depend on the batch every distillation loss is then 0 too.
"""

import os

import pytest
import torch
from conftest import REPO, TEACHER_WIDTHS, identity_adapters, setup_test_cfg
from detectron2.engine import HookBase
from detectron2.modeling import build_model

import gkd_d2  # noqa: F401
from gkd_d2 import load_config
from gkd_d2.engine import PrototypeRefresh, Trainer

CONFIGS = REPO / "tests" / "configs"
DETECTORS = {
    # teacher config, GKD config, the head norm key (off: logits then do not depend on the mode)
    "retinanet": ("tiny_retinanet.yaml", "tiny_gkd_retinanet.yaml"),
    "faster_rcnn": ("tiny_faster_rcnn.yaml", "tiny_gkd_faster_rcnn.yaml"),
}
# "" = no norm; BN and SyncBN compute batch statistics in train mode (SyncBN runs as BN in
# one process; the 2-process test below uses detectron2's naiveSyncBN)
NORMS = ["BN", "SyncBN", "GN", "FrozenBN", ""]
BATCH_STATISTICS = {"BN", "SyncBN", "naiveSyncBN"}


def norm_opts(norm: str) -> list[str]:
    # RetinaNet's head norm is off: its BN would make train-mode logits differ from the
    # teacher's eval-mode ones (the soft-label loss, not r)
    return ["MODEL.RESNETS.NORM", norm, "MODEL.FPN.NORM", norm, "MODEL.RETINANET.NORM", ""]


def self_teacher_weights(path, detector: str, norm: str) -> str:
    cfg = load_config(str(CONFIGS / DETECTORS[detector][0]), norm_opts(norm))
    torch.manual_seed(7)
    model = build_model(cfg)
    with torch.no_grad():  # running statistics that are not the defaults
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    torch.save({"model": model.state_dict()}, path)
    return str(path)


def self_teacher_opts(teacher_cfg: str, norm: str, weights: str) -> list[str]:
    """Overrides making the tiny GKD student the teacher ``teacher_cfg`` with ``norm``: the
    teacher's widths and norms, its weights as the student's start, LR 0."""
    return [
        *TEACHER_WIDTHS,
        *norm_opts(norm),
        "MODEL.TEACHER.CONFIG_FILE",
        str(CONFIGS / teacher_cfg),
        "MODEL.TEACHER.OPTS",
        str(norm_opts(norm)),
        "MODEL.TEACHER.WEIGHTS",
        weights,
        "MODEL.WEIGHTS",
        weights,
        "SOLVER.BASE_LR",
        "0.0",
    ]


class TeacherIsTheStudent(HookBase):
    """Before each step, copy the student's state (BN running statistics included, which
    train-mode steps change even at LR 0) into the teacher and drop the teacher feature cache,
    so that teacher and student are the same model at every iteration and every refresh."""

    def before_step(self):
        model = self.trainer.model
        state = {
            k: v
            for k, v in model.state_dict().items()
            if not k.startswith("distiller.") and k != "loss_normalizer_ema"
        }
        model.teacher.model.load_state_dict(state, strict=True)
        for h in self.trainer._hooks:
            if isinstance(h, PrototypeRefresh):
                h.forget_teacher_features()


def self_teacher_trainer(tmp_path, detector: str, norm: str, *opts) -> Trainer:
    weights = self_teacher_weights(tmp_path / "teacher.pth", detector, norm)
    teacher_cfg, gkd_cfg = DETECTORS[detector]
    cfg = setup_test_cfg(
        CONFIGS / gkd_cfg,
        *self_teacher_opts(teacher_cfg, norm, weights),
        "MODEL.GKD.GLOBAL_WEIGHT",
        "5.0",
        "OUTPUT_DIR",
        str(tmp_path / "out"),
        *opts,
    )
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    identity_adapters(trainer.model.distiller)
    return trainer


@pytest.mark.parametrize(
    ("norm", "mode"), [(n, "full") for n in NORMS] + [("BN", "bank"), ("FrozenBN", "bank")]
)
@pytest.mark.parametrize("detector", sorted(DETECTORS))
def test_self_teacher_gets_r_one_and_no_global_loss(tmp_path, detector, norm, mode):
    # 3 iterations, refreshes at 0 and 2; the student trains in train mode (LR 0). Bank mode:
    # the second refresh selects on the instances harvested at iterations 0 and 1 (the rest
    # extracted) and re-extracts the picked ones
    trainer = self_teacher_trainer(
        tmp_path,
        detector,
        norm,
        "SOLVER.MAX_ITER",
        "3",
        "MODEL.GKD.REFRESH_PERIOD",
        "2",
        "MODEL.GKD.REFRESH_MODE",
        mode,
    )
    trainer.register_hooks([TeacherIsTheStudent()])
    trainer._hooks.insert(0, trainer._hooks.pop())  # before the refresh
    model = trainer.model
    norms = [
        m for m in model.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    trainer.train()
    assert model.training and all(m.training for m in norms)  # as the trainer runs it
    history = trainer.storage.histories()
    keys = ["gkd/r_mean", "gkd/r_min"] + (
        ["gkd/r_soft_mean", "gkd/r_soft_min"] if detector == "faster_rcnn" else []
    )
    for key in keys:
        values = dict((it, v) for v, it in history[key].values())
        assert sorted(values) == [0, 1, 2], key
        for it, v in values.items():
            assert v == pytest.approx(1.0, abs=1e-4), (key, it, v)
    assert history["gkd/num_instances"].latest() > 0
    if mode == "bank":
        assert 0 < history["gkd/pgm_harvested"].latest() < 1
    # the same prototypes in both spaces (the same instances, the same features)
    d = model.distiller
    assert int(d.bank_iter) == 2 and (d.proto_counts > 0).all()
    torch.testing.assert_close(d.protos_s, d.protos_t, rtol=1e-5, atol=1e-5)
    for it, v in ((it, v) for v, it in history["loss_gkd_global"].values()):
        assert abs(v) < 1e-6, (it, v)
    # the eval-mode pass for r runs exactly when a BN layer of the backbone is in train mode
    assert ("gkd/descriptor_pass_seconds" in history) == (norm in BATCH_STATISTICS)
    if norm not in BATCH_STATISTICS:
        # features independent of the mode: the student is the teacher, nothing to distil
        for key in ("loss_gkd_fg", "loss_gkd_bg", "loss_gkd_soft"):
            for v, it in history[key].values():
                assert abs(v) < 1e-5, (key, it, v)


@pytest.mark.parametrize("detector", sorted(DETECTORS))
def test_bank_does_not_depend_on_extraction_batch_size(tmp_path, detector, monkeypatch):
    """Train-mode BN student: the PGM's instance features, hence the bank, from batches of 1
    and of 8 images are the same (float tolerance: batched convolutions sum in another order,
    which can flip a near-tie of the pursuit between two random instances, so the picks are
    compared on most slots)."""
    from detectron2.utils.events import EventStorage

    import gkd_d2.engine.prototype_refresh as refresh_module

    select = refresh_module.select_prototypes
    runs = []
    for batch in (1, 8):
        (tmp_path / str(batch)).mkdir()
        trainer = self_teacher_trainer(
            tmp_path / str(batch), detector, "BN", "MODEL.GKD.EXTRACT_BATCH_SIZE", str(batch)
        )
        with torch.no_grad():  # a student other than its teacher
            for p in trainer.model.backbone.parameters():
                p.mul_(1.1)
        inputs = []

        def recording(feats_s, feats_t, *args, _inputs=inputs, **kwargs):
            _inputs.append((feats_s, feats_t))
            return select(feats_s, feats_t, *args, **kwargs)

        monkeypatch.setattr(refresh_module, "select_prototypes", recording)
        refresh = next(h for h in trainer._hooks if isinstance(h, PrototypeRefresh))
        with EventStorage(0) as trainer.storage:
            refresh.refresh(0)
        monkeypatch.undo()
        assert trainer.model.training  # restored
        runs.append((inputs, trainer.model.distiller.proto_index.clone()))
    (inputs_1, index_1), (inputs_8, index_8) = runs
    assert len(inputs_1) == len(inputs_8) > 0
    for (s1, t1), (s8, t8) in zip(inputs_1, inputs_8):
        torch.testing.assert_close(s1, s8, rtol=1e-4, atol=1e-5 * float(s1.abs().max()))
        torch.testing.assert_close(t1, t8, rtol=1e-4, atol=1e-5 * float(t1.abs().max()))
    valid = index_1 >= 0
    assert valid.any() and torch.equal(valid, index_8 >= 0)
    assert (index_1 == index_8)[valid].float().mean() > 0.9


@pytest.mark.skipif(os.cpu_count() < 2, reason="needs 2 cores")
def test_self_teacher_r_one_with_sync_bn_in_two_processes(tmp_path, python):
    """detectron2's naiveSyncBN (torch's SyncBatchNorm refuses CPU tensors) in a 2-process
    gloo run: train-mode statistics synchronised over both ranks' images, r = 1 on each."""
    from test_train_net import run

    weights = self_teacher_weights(tmp_path / "teacher.pth", "retinanet", "naiveSyncBN")
    run(
        python,
        "tests/helpers/dist_train.py",
        str(tmp_path),
        "2",
        "--config",
        str(CONFIGS / "tiny_gkd_retinanet.yaml"),
        *self_teacher_opts("tiny_retinanet.yaml", "naiveSyncBN", weights),
        "SOLVER.IMS_PER_BATCH",
        "4",
        "SOLVER.MAX_ITER",
        "1",
    )
    for rank in (0, 1):
        saved = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert saved["world_size"] == 2
        history = saved["history"]
        assert history["gkd/num_instances"][0][0] > 0
        assert history["gkd/r_min"][0][0] == pytest.approx(1.0, abs=1e-4)
        assert history["gkd/r_mean"][0][0] == pytest.approx(1.0, abs=1e-4)
        assert "gkd/descriptor_pass_seconds" in history
