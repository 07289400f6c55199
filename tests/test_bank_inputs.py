"""Bank mode's reading of training inputs: the transforms the training mapper recorded, the
input size against the test-time size, and the teacher's rows of the same forward
(MODEL.GKD.BANK_TEACHER_ROWS "training_forward")."""

import numpy as np
import pytest
import torch
from conftest import REPO
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from detectron2.utils.events import EventStorage
from test_refresh_parts import (
    FILES,
    LEVELS,
    STRIDES,
    expected_rows,
    harvest_batch,
    harvest_sample,
    random_features,
)

from gkd_d2 import load_config
from gkd_d2.engine import TransformRecordingMapper
from gkd_d2.engine.feature_harvest import FeatureHarvest
from gkd_d2.engine.refresh_select import paired_teacher_rows
from gkd_d2.engine.training_inputs import placed_by_transforms, resize_and_flip


def test_resize_and_flip_by_hand():
    resize = T.ResizeTransform(64, 128, 32, 64)
    flip = T.HFlipTransform(64)
    assert resize_and_flip(T.TransformList([resize])) is False
    assert resize_and_flip(T.TransformList([resize, flip])) is True
    assert resize_and_flip(T.TransformList([resize, flip, flip])) is False
    assert resize_and_flip(T.TransformList([resize, T.NoOpTransform()])) is False
    assert resize_and_flip(T.TransformList([T.CropTransform(0, 0, 10, 10), resize])) is None


def test_placed_by_transforms_by_hand():
    """a.jpg (64 x 128) resized to 32 x 64: [16, 8, 80, 56] -> [8, 4, 40, 28]; flipped in the
    64-wide input -> [24, 4, 56, 28]; a crop, or a flip where flips are not harvested: None."""
    boxes = torch.tensor([[16.0, 8.0, 80.0, 56.0]])
    resize = T.ResizeTransform(64, 128, 32, 64)
    flip = T.HFlipTransform(64)
    placed = placed_by_transforms(boxes, (64, 128), (32, 64), T.TransformList([resize]))
    assert placed.tolist() == [[8.0, 4.0, 40.0, 28.0]]
    flipped = placed_by_transforms(boxes, (64, 128), (32, 64), T.TransformList([resize, flip]))
    assert flipped.tolist() == [[24.0, 4.0, 56.0, 28.0]]
    tl = T.TransformList([resize, flip])
    assert placed_by_transforms(boxes, (64, 128), (32, 64), tl, allow_flip=False) is None
    crop = T.TransformList([resize, T.CropTransform(0, 0, 32, 32)])
    assert placed_by_transforms(boxes, (64, 128), (32, 64), crop) is None


def test_recording_mapper_is_detectron2s_mapper_plus_its_transforms(tmp_path):
    """Same draws, same image and instances as DatasetMapper; the recorded transforms put
    the original boxes where the instances' boxes are, flip included."""
    import cv2

    cfg = load_config(str(REPO / "tests" / "configs" / "tiny_retinanet.yaml"))
    cfg.INPUT.RANDOM_FLIP = "horizontal"
    image = (np.arange(96 * 160 * 3) % 251).astype(np.uint8).reshape(96, 160, 3)
    path = str(tmp_path / "x.png")
    cv2.imwrite(path, image)
    boxes = [[10.0, 20.0, 70.0, 60.0], [100.0, 5.0, 150.0, 90.0]]
    record = {
        "file_name": path,
        "height": 96,
        "width": 160,
        "image_id": 0,
        "annotations": [
            {"bbox": b, "bbox_mode": BoxMode.XYXY_ABS, "category_id": i}
            for i, b in enumerate(boxes)
        ],
    }
    plain, recording = DatasetMapper(cfg, is_train=True), TransformRecordingMapper(cfg, True)
    flips = set()
    for seed in range(8):
        np.random.seed(seed)
        want = plain(dict(record))
        np.random.seed(seed)
        got = recording(dict(record))
        assert torch.equal(want["image"], got["image"])
        assert torch.equal(want["instances"].gt_boxes.tensor, got["instances"].gt_boxes.tensor)
        tfm = got["applied_transforms"]
        placed = tfm.apply_box(np.array(boxes))
        np.testing.assert_allclose(placed, got["instances"].gt_boxes.tensor.numpy(), atol=1e-4)
        flips.add(resize_and_flip(tfm))
    assert flips == {True, False}  # both kinds drawn in 8 seeds


def test_harvest_places_by_the_recorded_transforms_not_the_ground_truth():
    """c.jpg's ground truth says flipped; its recorded transforms say not: the recorded ones
    place its row (unflipped: [0, 16, 24, 48]), and a crop leaves a.jpg to the refresh."""
    inputs, sizes = harvest_batch()
    inputs[2]["applied_transforms"] = T.TransformList([T.ResizeTransform(64, 64, 64, 64)])
    harvest = FeatureHarvest(harvest_sample(), FILES, LEVELS, STRIDES)
    assert harvest.placed(inputs[2], sizes[2]).tolist() == [[0.0, 16.0, 24.0, 48.0]]
    inputs[0]["applied_transforms"] = T.TransformList(
        [T.ResizeTransform(64, 128, 32, 64), T.CropTransform(0, 0, 32, 32)]
    )
    assert harvest.placed(inputs[0], sizes[0]) is None
    with EventStorage(3):
        harvest(inputs, random_features(0), sizes)
    harvest.merge()
    assert harvest.rows()[0].tolist() == [1] and harvest.unplaced == 2  # a.jpg and d.jpg


def test_harvest_leaves_inputs_of_another_size_than_the_test_size_to_the_refresh():
    """With the teacher's rows from the test pipeline, a.jpg's 32 x 64 input is not the
    test-time 64 x 128: left to the refresh (its student row would pair with a teacher row of
    another scale)."""
    harvest = FeatureHarvest(
        harvest_sample(), FILES, LEVELS, STRIDES, test_size=lambda h, w: (h, w)
    )
    inputs, sizes = harvest_batch()
    with EventStorage(3):
        harvest(inputs, random_features(0), sizes)
    harvest.merge()
    assert harvest.rows()[0].tolist() == [1] and harvest.unplaced == 2  # a.jpg and d.jpg


def test_harvest_pools_the_teachers_rows_of_the_same_forward(tmp_path):
    harvest = FeatureHarvest(harvest_sample(), FILES, LEVELS, STRIDES, teacher_rows=True)
    inputs, sizes = harvest_batch()
    student, teacher = random_features(0), random_features(1)
    with EventStorage(5):
        with pytest.raises(ValueError, match="BANK_TEACHER_ROWS 'training_forward'"):
            harvest(inputs, student, sizes)
        harvest(inputs, student, sizes, teacher)
    harvest.merge()
    rows, feats = harvest.rows()
    assert rows.tolist() == [0, 1, 2]
    for got, want in zip(feats, expected_rows(student)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    for got, want in zip(harvest.teacher_rows_of(), expected_rows(teacher)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    # the teacher's rows survive a checkpoint; a harvest saved without them is not paired
    state = harvest.state_dict()
    other = FeatureHarvest(harvest_sample(), FILES, LEVELS, STRIDES, teacher_rows=True)
    other.load_state_dict(state)
    for a, b in zip(other.teacher_rows_of(), harvest.teacher_rows_of()):
        assert torch.equal(a, b)
    del state["teacher_features"]
    other.load_state_dict(state)
    assert len(other.rows()[0]) == 0 and other.since == harvest.since


def test_paired_teacher_rows_by_hand():
    teacher = [torch.zeros(4, 2), torch.ones(4, 3)]
    harvested = (torch.tensor([3, 1]), [], [torch.full((2, 2), 7.0), torch.full((2, 3), 9.0)])
    paired = paired_teacher_rows(teacher, harvested)
    assert paired[0].tolist() == [[0, 0], [7, 7], [0, 0], [7, 7]]
    assert paired[1][:, 0].tolist() == [1, 9, 1, 9]
    assert teacher[0].abs().sum() == 0  # the test pipeline's rows are left as they are
    assert paired_teacher_rows(teacher, (torch.tensor([0]), [], [])) is teacher
