"""What a GKD run logs about r and about its terms: r by COCO size group, the weights' effect
on each term, each distillation term's share of the total loss; and the ground-truth matching
behind the size groups."""

import pytest
import torch
from conftest import REPO, setup_test_cfg
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from gkd_d2.config import load_config
from gkd_d2.engine import Trainer
from gkd_d2.modeling.distilled_detector import gt_areas_in_original, matched_gt_rows

CONFIGS = REPO / "tests" / "configs"


def test_matched_gt_rows_by_hand():
    gt = [
        torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0]]),
        torch.zeros(0, 4),
        torch.tensor([[1.0, 1.0, 2.0, 2.0], [5.0, 5.0, 20.0, 20.0]]),
    ]
    matched = torch.tensor(
        [
            [5.0, 5.0, 20.0, 20.0],  # image 0, its row 1
            [0.0, 0.0, 10.0, 10.0],  # image 0, row 0
            [5.0, 5.0, 20.0, 20.0],  # image 2, its row 1 (not image 0's equal box)
            [1.0, 1.0, 2.0, 2.0],  # image 2, row 0
            [9.0, 9.0, 9.0, 9.0],  # no such ground truth
        ]
    )
    batch_idx = torch.tensor([0, 0, 2, 2, 0])
    assert matched_gt_rows(matched, batch_idx, gt).tolist() == [1, 0, 3, 2, -1]


def test_gt_areas_in_original_pixels():
    inst = Instances((50, 100), gt_boxes=Boxes(torch.tensor([[0.0, 0.0, 10.0, 20.0]])))
    other = Instances((80, 80), gt_boxes=Boxes(torch.tensor([[0.0, 0.0, 8.0, 8.0]])))
    # the first image was 200 x 400 (4x each side: area x16); the second has no original size
    areas = gt_areas_in_original([inst, other], [{"height": 200, "width": 400}, {}])
    torch.testing.assert_close(areas, torch.tensor([200.0 * 16, 64.0]))


@pytest.mark.parametrize(
    "teacher,student",
    [
        ("tiny_retinanet.yaml", "tiny_gkd_retinanet.yaml"),
        ("tiny_faster_rcnn.yaml", "tiny_gkd_faster_rcnn.yaml"),
    ],
)
def test_training_logs_r_by_size_effects_and_loss_shares(tmp_path, teacher, student):
    torch.manual_seed(123)
    weights = tmp_path / "teacher.pth"
    torch.save({"model": build_model(load_config(str(CONFIGS / teacher))).state_dict()}, weights)
    cfg = setup_test_cfg(
        CONFIGS / student,
        "OUTPUT_DIR",
        str(tmp_path / "run"),
        "MODEL.TEACHER.WEIGHTS",
        str(weights),
        "SOLVER.MAX_ITER",
        "3",
    )
    trainer = Trainer(cfg)
    trainer.train()
    # every iteration's values (metrics.json holds medians over the logging window)
    by_iter: dict[int, dict[str, float]] = {}
    for name, history in trainer.storage.histories().items():
        for value, it in history.values():
            by_iter.setdefault(int(it), {})[name] = value
    rows = [by_iter[it] for it in sorted(by_iter) if "total_loss" in by_iter[it]]
    assert len(rows) == 3
    shares = {f"gkd/loss_share_{t}" for t in ("fg", "bg", "soft", "kd")}
    for row in rows:
        # every iteration, from the trainer's own values (by hand in the test below)
        assert shares <= row.keys()
        assert 0 < row["gkd/loss_share_kd"] < 1
        groups = [k for k in row if k.startswith("gkd/r_mean_")]
        sizes = {"gkd/r_mean_small", "gkd/r_mean_medium", "gkd/r_mean_large"}
        assert groups and set(groups) <= sizes
        for k in groups:
            assert 0.0 <= row[k] <= 1.0
        # r_mean is the instance-weighted mean of the groups' means: within their range
        lo, hi = min(row[k] for k in groups), max(row[k] for k in groups)
        assert lo - 1e-6 <= row["gkd/r_mean"] <= hi + 1e-6
        assert row["gkd/r_effect_fg"] > 0 and 0 < row["gkd/r_effect_soft"] <= 1.0 + 1e-6


def test_loss_shares_by_hand(tmp_path):
    """LossShares divides the iteration's logged GKD losses by its total_loss (1 and 2 of 4 are
    0.25 and 0.5); a loss last logged at an earlier iteration is left out (the soft term at
    iteration 7), and an iteration logs nothing until its total is logged."""
    from types import SimpleNamespace

    from detectron2.utils.events import EventStorage

    from gkd_d2.engine.hooks import LossShares

    torch.manual_seed(123)
    weights = tmp_path / "teacher.pth"
    cfg = load_config(str(CONFIGS / "tiny_retinanet.yaml"))
    torch.save({"model": build_model(cfg).state_dict()}, weights)
    cfg = setup_test_cfg(CONFIGS / "tiny_gkd_retinanet.yaml", "MODEL.TEACHER.WEIGHTS", str(weights))
    hook = LossShares()
    with EventStorage(6) as storage:
        hook.trainer = SimpleNamespace(model=build_model(cfg), storage=storage, iter=6)
        hook.before_train()
        storage.put_scalars(loss_gkd_soft=9.0)  # iteration 6: stale at iteration 7
        storage.iter = hook.trainer.iter = 7
        storage.put_scalars(total_loss=4.0, loss_cls=0.5, loss_gkd_fg=1.0, loss_gkd_bg=2.0)
        hook.after_step()
        got = {k: v for k, (v, it) in storage.latest().items() if k.startswith("gkd/")}
        assert got == {
            "gkd/loss_share_fg": 0.25,
            "gkd/loss_share_bg": 0.5,
            "gkd/loss_share_kd": 0.75,
        }
        storage.iter = hook.trainer.iter = 8
        storage.put_scalars(loss_gkd_fg=1.0, loss_gkd_bg=2.0, loss_gkd_soft=0.5)
        hook.after_step()  # no total_loss at iteration 8: nothing logged
        assert storage.latest()["gkd/loss_share_fg"][1] == 7
        storage.put_scalars(total_loss=4.0)
        hook.after_step()
        assert storage.latest()["gkd/loss_share_soft"] == (0.125, 8)
        assert storage.latest()["gkd/loss_share_kd"] == (0.875, 8)
