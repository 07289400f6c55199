"""The prototype refresh as users run it: full and bank modes, the teacher cache, the loader
workers, resume and processes, on the tiny configs (CPU)."""

import logging
import os

import pytest
import torch
from conftest import REPO, setup_test_cfg, train_stop_and_resume
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

import gkd_d2  # noqa: F401
from gkd_d2 import load_config
from gkd_d2.engine import PrototypeRefresh, Trainer
from gkd_d2.engine.teacher_cache import FILE_NAME

CONFIGS = REPO / "tests" / "configs"
DETECTORS = {
    "retinanet": ("tiny_retinanet.yaml", "tiny_gkd_retinanet.yaml"),
    "faster_rcnn": ("tiny_faster_rcnn.yaml", "tiny_gkd_faster_rcnn.yaml"),
}
# a frozen student: no norm with statistics, LR 0; no flip, training size = test size (128)
FROZEN = [
    "MODEL.RESNETS.NORM",
    "FrozenBN",
    "MODEL.FPN.NORM",
    "",
    "MODEL.RETINANET.NORM",
    "",
    "SOLVER.BASE_LR",
    "0.0",
    "INPUT.RANDOM_FLIP",
    "none",
]
# the tiny training split: 32 images, batch 2: one epoch is 16 iterations (32 at batch 1)
EPOCH = 16
EPOCH_1 = 32


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, str]:
    """Each tiny teacher's weights (random, seeded: the mechanics are under test)."""
    out = {}
    for det, (teacher_cfg, _) in DETECTORS.items():
        torch.manual_seed(123)
        path = tmp_path_factory.mktemp("teacher") / f"{det}.pth"
        torch.save(
            {"model": build_model(load_config(str(CONFIGS / teacher_cfg))).state_dict()}, path
        )
        out[det] = str(path)
    return out


def trainer_for(tmp_path, teachers, det, *opts) -> Trainer:
    cfg = setup_test_cfg(
        CONFIGS / DETECTORS[det][1],
        "OUTPUT_DIR",
        str(tmp_path),
        "MODEL.TEACHER.WEIGHTS",
        teachers[det],
        "MODEL.TEACHER.CHECK_IMAGES",
        "0",
        "TEST.EVAL_PERIOD",
        "0",
        *opts,
    )
    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=False)
    return trainer


def refresh_hook(trainer) -> PrototypeRefresh:
    return next(h for h in trainer._hooks if isinstance(h, PrototypeRefresh))


def bank_of(model) -> dict[str, torch.Tensor]:
    d = model.distiller
    return {
        k: getattr(d, k).clone() for k in ("protos_s", "protos_t", "proto_counts", "proto_index")
    }


@pytest.mark.parametrize("teacher_rows", ["test_pipeline", "training_forward"])
@pytest.mark.parametrize("det", sorted(DETECTORS))
def test_bank_mode_with_a_frozen_student_picks_as_full_mode(tmp_path, teachers, det, teacher_rows):
    """One epoch of training at LR 0 (no flip, training size = test size, one image per batch
    as the refresh extracts them): the bank refresh selects on the harvested features of every
    sampled instance and re-extracts only the picked instances' images, and its bank is the
    full refresh's, pick for pick; with the teacher's rows from the training forward too (the
    same input as the test pipeline's here). (With two images per training batch, the
    convolutions round differently from one image's by about 1e-6, and the pursuit can break a
    near-tie the other way on some CPUs.)"""
    opts = [
        *FROZEN,
        "MODEL.GKD.BANK_TEACHER_ROWS",
        teacher_rows,
        "SOLVER.IMS_PER_BATCH",
        "1",
        "MODEL.GKD.REFRESH_PERIOD",
        str(EPOCH_1),
        "SOLVER.MAX_ITER",
        str(EPOCH_1 + 1),
    ]
    banks, trainers = {}, {}
    for mode in ("full", "bank"):
        trainer = trainer_for(tmp_path / mode, teachers, det, *opts, "MODEL.GKD.REFRESH_MODE", mode)
        trainer.train()
        banks[mode], trainers[mode] = bank_of(trainer.model), trainer
    full, bank = banks["full"], banks["bank"]
    assert int(trainers["bank"].model.distiller.bank_iter) == EPOCH_1
    assert torch.equal(full["proto_index"], bank["proto_index"])
    assert (
        torch.equal(full["proto_counts"], bank["proto_counts"]) and (full["proto_counts"] > 0).all()
    )
    # the prototypes themselves are re-extracted in the test pipeline: the full refresh's
    torch.testing.assert_close(full["protos_s"], bank["protos_s"], rtol=1e-5, atol=1e-6)
    assert torch.equal(full["protos_t"], bank["protos_t"])

    hook = refresh_hook(trainers["bank"])
    history = trainers["bank"].storage.histories()
    sampled_images = len(set(hook.instances["image"].tolist()))
    harvested = dict((it, v) for v, it in history["gkd/pgm_harvested"].values())
    assert harvested == {0: 0.0, EPOCH_1: 1.0}  # the whole sample, harvested in one epoch
    student = dict((it, v) for v, it in history["gkd/pgm_student_images"].values())
    picked_images = len(
        set(hook.instances["image"][bank["proto_index"][bank["proto_index"] >= 0]].tolist())
    )
    assert student == {0: sampled_images, EPOCH_1: picked_images} and picked_images < sampled_images
    teacher = dict((it, v) for v, it in history["gkd/pgm_teacher_images"].values())
    assert teacher == {0: sampled_images, EPOCH_1: 0}
    full_student = dict(
        (it, v) for v, it in trainers["full"].storage.histories()["gkd/pgm_student_images"].values()
    )
    assert full_student == {0: sampled_images, EPOCH_1: sampled_images}


def test_loader_workers_and_batch_size_change_no_pick(tmp_path, teachers):
    """The refresh's images through 2 loader workers give the bank of the serial loader,
    bit for bit; batches of 4 give the same picks (features to float rounding)."""
    banks = {}
    for name, opts in {
        "serial": ["DATALOADER.NUM_WORKERS", "0", "MODEL.GKD.EXTRACT_BATCH_SIZE", "1"],
        "workers": ["DATALOADER.NUM_WORKERS", "2", "MODEL.GKD.EXTRACT_BATCH_SIZE", "1"],
        "batch4": ["DATALOADER.NUM_WORKERS", "2", "MODEL.GKD.EXTRACT_BATCH_SIZE", "4"],
    }.items():
        trainer = trainer_for(tmp_path / name, teachers, "retinanet", *opts)
        with EventStorage(0) as trainer.storage:
            refresh_hook(trainer).refresh(0)
        banks[name] = bank_of(trainer.model)
    serial, workers, batch4 = banks["serial"], banks["workers"], banks["batch4"]
    assert (serial["proto_counts"] > 0).all()
    for k in serial:
        assert torch.equal(serial[k], workers[k]), k
    assert torch.equal(serial["proto_index"], batch4["proto_index"])
    for k in ("protos_s", "protos_t"):
        torch.testing.assert_close(serial[k], batch4[k], rtol=1e-4, atol=1e-5)


def test_teacher_cache_is_reused_and_a_stale_or_corrupt_one_rebuilt(tmp_path, teachers, caplog):
    """The first refresh writes the teacher's features to OUTPUT_DIR; a new trainer (a
    restart) reads them instead of a teacher pass and builds the same bank; a cache written
    for other teacher weights, or unreadable, is named and rebuilt."""
    counts = []

    def refresh_once(*opts):
        trainer = trainer_for(tmp_path, teachers, "retinanet", *opts)
        hook = refresh_hook(trainer)
        with EventStorage(0) as trainer.storage:
            hook.refresh(0)
        counts.append(hook.last_counts["teacher_images"])
        return bank_of(trainer.model)

    cache = tmp_path / FILE_NAME
    first = refresh_once()
    assert cache.is_file() and sorted(p.name for p in tmp_path.glob(".*tmp")) == []
    written = cache.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="gkd_d2"):
        second = refresh_once()
    assert counts == [counts[0], 0] and counts[0] > 0
    assert "read from" in caplog.text and cache.stat().st_mtime_ns == written
    for k in first:
        assert torch.equal(first[k], second[k]), k

    # other teacher weights: the key differs, named, and the file rewritten
    other = torch.load(teachers["retinanet"], weights_only=False)
    other["model"] = {
        k: v + 0.01 if v.is_floating_point() else v for k, v in other["model"].items()
    }
    other_path = tmp_path / "other_teacher.pth"
    torch.save(other, other_path)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gkd_d2"):
        refresh_once("MODEL.TEACHER.WEIGHTS", str(other_path))
    assert counts[-1] == counts[0]
    assert str(cache) in caplog.text and "teacher_weights" in caplog.text
    # unreadable: named, rebuilt, and the rebuilt file is read by the next run
    cache.write_bytes(b"not a checkpoint")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gkd_d2"):
        third = refresh_once()
    assert counts[-1] == counts[0] and "cannot be read" in caplog.text and str(cache) in caplog.text
    for k in first:
        assert torch.equal(first[k], third[k]), k
    refresh_once()
    assert counts[-1] == 0


@pytest.mark.parametrize("harvest_flipped", [True, False])
def test_bank_mode_resumes_mid_epoch_exactly(tmp_path, python, teachers, harvest_flipped):
    """8 iterations in one run == 4, a stop, then --resume for the other 4 (fresh processes),
    in bank mode with refreshes at 0 and 6: the checkpoint at iteration 3 holds the partial
    harvest of iterations 0-3, the resumed run continues it and pays no teacher pass. With
    flipped inputs harvested every iteration harvests; without (the default), an iteration
    whose batch is all flipped harvests nothing."""
    opts = [
        "MODEL.TEACHER.WEIGHTS",
        teachers["retinanet"],
        "MODEL.GKD.BANK_HARVEST_FLIPPED",
        str(harvest_flipped),
        "MODEL.GKD.REFRESH_MODE",
        "bank",
        "MODEL.GKD.REFRESH_PERIOD",
        "6",
        "SOLVER.MAX_ITER",
        "8",
        "SOLVER.CHECKPOINT_PERIOD",
        "4",
        "TEST.EVAL_PERIOD",
        "0",
    ]
    full, split = tmp_path / "full", tmp_path / "split"
    config = CONFIGS / DETECTORS["retinanet"][1]
    stop_log, tag_after_stop, log = train_stop_and_resume(python, config, opts, full, split)
    assert tag_after_stop == "model_0000003.pth"
    assert "teacher's features of the sample are read from" in log
    mid = torch.load(split / "model_0000003.pth", weights_only=False)
    harvest = mid["trainer"]["hooks"]["PrototypeRefresh"]["harvest"]
    assert harvest["since"] == 0 and len(harvest["rows"]) > 0
    if harvest_flipped:
        assert set(harvest["iters"].tolist()) == {0, 1, 2, 3}
    else:
        assert set(harvest["iters"].tolist()) <= {0, 1, 2, 3}

    a = torch.load(full / "model_final.pth", weights_only=False)
    b = torch.load(split / "model_final.pth", weights_only=False)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert int(b["model"]["distiller.bank_iter"]) == 6
    ha = a["trainer"]["hooks"]["PrototypeRefresh"]["harvest"]
    hb = b["trainer"]["hooks"]["PrototypeRefresh"]["harvest"]
    assert ha["since"] == hb["since"] == 6 and len(ha["rows"]) > 0
    assert torch.equal(ha["rows"], hb["rows"]) and torch.equal(ha["iters"], hb["iters"])
    for fa, fb in zip(ha["features"], hb["features"]):
        assert torch.equal(fa, fb)


@pytest.mark.skipif(os.cpu_count() < 2, reason="needs 2 cores")
def test_bank_mode_two_processes_build_the_bank_of_one(tmp_path, python, teachers):
    """A frozen student, one epoch in bank mode (one image per forward on every rank, one
    thread per process): each of 2 gloo processes harvests its own images, the harvests and
    the sharded selections are gathered, and both ranks hold the bank of one process, pick for
    pick (refreshes at 0 and after the epoch: 32 iterations of 1 image, or 16 of 2 images
    over 2 ranks)."""
    from test_train_net import run

    opts = [
        *FROZEN,
        "MODEL.TEACHER.WEIGHTS",
        teachers["retinanet"],
        "MODEL.TEACHER.CHECK_IMAGES",
        "0",
        "MODEL.GKD.REFRESH_MODE",
        "bank",
    ]
    epoch = {1: EPOCH_1, 2: EPOCH}
    for n in (1, 2):
        (tmp_path / str(n)).mkdir()
        run(
            python,
            "tests/helpers/dist_train.py",
            str(tmp_path / str(n)),
            str(n),
            "--config",
            str(CONFIGS / DETECTORS["retinanet"][1]),
            *opts,
            "SOLVER.IMS_PER_BATCH",
            str(n),
            "MODEL.GKD.REFRESH_PERIOD",
            str(epoch[n]),
            "SOLVER.MAX_ITER",
            str(epoch[n] + 1),
        )
    saved = {
        (n, r): torch.load(tmp_path / str(n) / f"rank{r}.pt", weights_only=False)
        for n, r in ((1, 0), (2, 0), (2, 1))
    }
    one, r0, r1 = (saved[k]["buffers"] for k in ((1, 0), (2, 0), (2, 1)))
    for k in ("distiller.protos_s", "distiller.protos_t", "distiller.proto_index"):
        assert torch.equal(r0[k], r1[k]), k
    assert int(one["distiller.bank_iter"]) == EPOCH_1 and int(r0["distiller.bank_iter"]) == EPOCH
    assert torch.equal(one["distiller.proto_index"], r0["distiller.proto_index"])
    for k in ("distiller.protos_s", "distiller.protos_t"):
        torch.testing.assert_close(one[k], r0[k], rtol=1e-5, atol=1e-5)
    for key in saved:  # the whole sample was harvested, half of it by each of 2 ranks
        harvested = dict((it, v) for v, it in saved[key]["history"]["gkd/pgm_harvested"])
        assert harvested[epoch[key[0]]] == 1.0, key
