"""The prototype refresh's parts: its input batches, the teacher feature cache, the bank-mode
feature harvest, the sharing out of the selections over ranks, and the refresh mode check."""

import logging
import os

import pytest
import torch
from conftest import REPO, setup_test_cfg
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import gkd_d2  # noqa: F401
from gkd_d2.distill import box_crop_mean, select_prototypes
from gkd_d2.engine import feature_harvest as feature_harvest_module
from gkd_d2.engine.feature_harvest import FeatureHarvest, latest_rows
from gkd_d2.engine.prototype_refresh import PrototypeRefresh
from gkd_d2.engine.refresh_inputs import padded_size, planned_padded_size, refresh_batches
from gkd_d2.engine.refresh_select import select_bank, selection_shares
from gkd_d2.engine.teacher_cache import (
    FILE_NAME,
    TeacherFeatureCache,
    teacher_cache_key,
    tensor_digest,
)
from gkd_d2.engine.training_inputs import placed_boxes

GKD_CFG = REPO / "tests" / "configs" / "tiny_gkd_retinanet.yaml"

# ---------------------------------------------------------------- refresh batches

# the test-time resize of the batch tests: short side 64, long side at most 128, padding to 32
MIN_SIZE, MAX_SIZE, DIV = 64, 128, 32


def fake_mapper(d: dict) -> dict:
    """A test-time mapper without files: the image's true size is ``true_h``/``true_w`` (what
    the dict's ``height``/``width`` should say), resized as ResizeShortestEdge does. It pops a
    key of the dict it is given, as detectron2's DatasetMapper pops the annotations."""
    from detectron2.data.transforms import ResizeShortestEdge

    d.pop("annotations")
    h, w = d["true_h"], d["true_w"]
    nh, nw = ResizeShortestEdge.get_output_shape(h, w, MIN_SIZE, MAX_SIZE)
    return {"image": torch.zeros(3, nh, nw, dtype=torch.uint8), "height": h, "width": w}


def batch_records() -> list[dict]:
    """11 dicts; per index the true (H, W), its resize and padded size (short 64, long <= 128,
    multiples of 32), and what the dict's height/width plan:
      0: 100x100 -> 64x64 -> (64, 64)
      1: 50x100 -> 64x128 -> (64, 128)
      2: 60x60 -> 64x64 -> (64, 64)
      3: 200x100 -> 128x64 -> (128, 64)
      4: 64x80 -> 64x80 -> (64, 96)
      5: 70x70 -> 64x64 -> (64, 64), but no height/width: planned (0, 0)
      6: 90x90 -> 64x64 -> (64, 64)
      7: 30x60 -> 64x128 -> (64, 128), but the dict says 100x100: planned (64, 64)
      8: 40x90 -> 64x144 is over 128: x 128/144 -> 56.9x128 -> 57x128 -> (64, 128)
      9: 64x64 -> 64x64 -> (64, 64)
     10: 120x100 -> 76.8x64 -> 77x64 -> (96, 64) (not among the indices loaded)
    """
    true = [
        (100, 100),
        (50, 100),
        (60, 60),
        (200, 100),
        (64, 80),
        (70, 70),
        (90, 90),
        (30, 60),
        (40, 90),
        (64, 64),
        (120, 100),
    ]
    records = []
    for i, (h, w) in enumerate(true):
        d = {"file_name": f"{i}.jpg", "true_h": h, "true_w": w, "annotations": [i]}
        if i == 7:
            d.update(height=100, width=100)  # wrong
        elif i != 5:
            d.update(height=h, width=w)
        records.append(d)
    return records


def test_planned_padded_size_by_hand():
    # 480x640, short 800: x 800/480 -> 800 x 1066.67 (long side under 1333) -> 800 x 1067;
    # padded to 32: 800 = 25 x 32, ceil(1067 / 32) = 34 -> 1088
    assert planned_padded_size({"height": 480, "width": 640}, 800, 1333, 32) == (800, 1088)
    # 1000x3000: x 0.8 -> 800 x 2400 over 1333: x 1333/2400 -> 444.33 x 1333 -> 444 x 1333;
    # padded: ceil(444 / 32) = 14 -> 448, ceil(1333 / 32) = 42 -> 1344
    assert planned_padded_size({"height": 1000, "width": 3000}, 800, 1333, 32) == (448, 1344)
    # divisibility 0 (no padding) counts as 1
    assert planned_padded_size({"height": 480, "width": 640}, 800, 1333, 0) == (800, 1067)
    assert planned_padded_size({"file_name": "x.jpg"}, 800, 1333, 32) == (0, 0)
    assert planned_padded_size({"height": 0, "width": 640}, 800, 1333, 32) == (0, 0)
    assert padded_size(torch.zeros(3, 800, 1067), 32) == (800, 1088)
    assert padded_size(torch.zeros(3, 800, 1067), 0) == (800, 1067)


def load_batches(records, indices, num_workers):
    return list(
        refresh_batches(records, indices, fake_mapper, 3, num_workers, MIN_SIZE, MAX_SIZE, DIV)
    )


def test_refresh_batches_one_padded_size_each_and_every_index_once():
    records = batch_records()
    indices = [9, 3, 0, 8, 5, 1, 7, 4, 6, 2]  # all but 10, in no particular order
    batches = load_batches(records, indices, num_workers=0)
    # planned order (size, then index): (0,0) 5; (64,64) 0 2 6 7 9; (64,96) 4; (64,128) 1 8;
    # (128,64) 3. Loaded 3 at a time: [5 0 2] [6 7 9] [4 1 8] [3]; 7 is (64,128), not (64,64):
    # [6 7 9] splits into runs of one size, and so does [4 1 8]
    assert [[i for i, _ in b] for b in batches] == [[5, 0, 2], [6], [7], [9], [4], [1, 8], [3]]
    assert sorted(i for b in batches for i, _ in b) == sorted(indices)
    sizes = {0: (64, 64), 1: (64, 128), 2: (64, 64), 3: (128, 64), 4: (64, 96), 5: (64, 64)}
    sizes.update({6: (64, 64), 7: (64, 128), 8: (64, 128), 9: (64, 64)})
    for b in batches:
        assert 1 <= len(b) <= 3
        assert {padded_size(x["image"], DIV) for _, x in b} == {sizes[b[0][0]]}
        for i, x in b:
            assert (x["height"], x["width"]) == (records[i]["true_h"], records[i]["true_w"])
    assert tuple(batches[-2][1][1]["image"].shape) == (3, 57, 128)  # index 8, unpadded
    # the mapper worked on copies: the dataset dicts still hold what it popped
    assert [r["annotations"] for r in records] == [[i] for i in range(11)]


def test_refresh_batches_same_with_loader_workers():
    records = batch_records()
    indices = [9, 3, 0, 8, 5, 1, 7, 4, 6, 2, 10]
    serial = load_batches(records, indices, num_workers=0)
    workers = load_batches(records, indices, num_workers=2)

    def summary(batches):
        return [
            [(i, tuple(x["image"].shape), x["height"], x["width"]) for i, x in b] for b in batches
        ]

    assert summary(workers) == summary(serial)
    assert len(serial) == 8  # index 10, (96, 64), is a batch of its own before 3
    assert [r["annotations"] for r in records] == [[i] for i in range(11)]
    assert load_batches(records, [], num_workers=0) == []


# ---------------------------------------------------------------- teacher feature cache


def tiny_sample() -> dict:
    return {
        "image": torch.tensor([0, 2, 0, 3]),
        "cls": torch.tensor([0, 0, 1, 1]),
        "box": torch.tensor(
            [[1.0, 2.0, 30.0, 40.0], [0.0, 0.0, 50.0, 50.0], [5.0, 5.0, 60.0, 45.0], [2, 3, 4, 5]]
        ),
    }


def tiny_teacher() -> torch.nn.Linear:
    teacher = torch.nn.Linear(3, 2)
    with torch.no_grad():  # fixed weights, without touching the global RNG's state
        teacher.weight.copy_(torch.arange(6.0).reshape(2, 3) / 10)
        teacher.bias.copy_(torch.tensor([0.5, -0.5]))
    return teacher


INPUT = {"min_size_test": 128, "max_size_test": 128, "format": "BGR"}
NAMES = ["a.jpg", "c.jpg", "d.jpg"]


def cache_key(teacher=None, sample=None, names=NAMES, settings=INPUT, autocast=False) -> dict:
    return teacher_cache_key(
        teacher or tiny_teacher(),
        sample or tiny_sample(),
        names,
        settings,
        ["p3", "p4"],
        [8, 16],
        autocast,
    )


def cache_log(caplog, monkeypatch):
    """Collect the cache's warnings (detectron2's setup_logger stops gkd_d2's records at
    "gkd_d2"; caplog listens at the root)."""
    monkeypatch.setattr(logging.getLogger("gkd_d2"), "propagate", True)
    return caplog.at_level(logging.WARNING, logger="gkd_d2")


def test_teacher_cache_round_trip_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "out" / FILE_NAME  # the folder is made
    cache = TeacherFeatureCache(path)
    key = cache_key()
    assert cache.load(key) is None  # no file yet
    feats = [torch.randn(4, 5), torch.randn(8, 6).t()[:4]]  # a non-contiguous one too
    cache.save(key, feats)
    assert os.listdir(path.parent) == [FILE_NAME]
    got = TeacherFeatureCache(str(path)).load(cache_key())
    assert len(got) == 2 and all(torch.equal(g, f) for g, f in zip(got, feats))
    cache.save(key, [f + 1 for f in feats])  # rewritten over the old file
    assert os.listdir(path.parent) == [FILE_NAME]
    assert torch.equal(cache.load(key)[1], feats[1] + 1)


def test_teacher_cache_with_another_key_is_not_used(tmp_path, caplog, monkeypatch):
    path = tmp_path / FILE_NAME
    cache = TeacherFeatureCache(path)
    cache.save(cache_key(), [torch.randn(4, 5), torch.randn(4, 6)])
    with cache_log(caplog, monkeypatch):
        assert cache.load(cache_key(autocast=True)) is None
    assert str(path) in caplog.text and "another autocast than" in caplog.text
    caplog.clear()
    other = dict(cache_key(), strides=[8, 32], levels=["p3", "p5"])
    with cache_log(caplog, monkeypatch):
        assert cache.load(other) is None
    # the fields that differ, in name order
    assert "another levels, strides than" in caplog.text and str(path) in caplog.text
    assert cache.load(cache_key()) is not None  # the file itself is intact


def test_teacher_cache_unreadable_or_misshaped_file_is_not_used(tmp_path, caplog, monkeypatch):
    path = tmp_path / FILE_NAME
    key = cache_key()
    path.write_bytes(b"\x00garbage, not a torch file")
    with cache_log(caplog, monkeypatch):
        assert TeacherFeatureCache(path).load(key) is None
    assert str(path) in caplog.text and "cannot be read" in caplog.text
    caplog.clear()
    torch.save({"key": key, "features": {"p3": torch.zeros(4, 5)}}, path)
    with cache_log(caplog, monkeypatch):
        assert TeacherFeatureCache(path).load(key) is None
    assert "not a list of tensors" in caplog.text and str(path) in caplog.text
    # the key says 4 instances at 2 levels
    for feats in (
        [torch.zeros(5, 5), torch.zeros(5, 6)],  # 5 rows
        [torch.zeros(4, 5)],  # one level
        [torch.zeros(4, 5), torch.zeros(4)],  # not (N, C)
    ):
        caplog.clear()
        TeacherFeatureCache(path).save(key, feats)
        with cache_log(caplog, monkeypatch):
            assert TeacherFeatureCache(path).load(key) is None
        assert "features' shapes" in caplog.text and str(path) in caplog.text


def test_teacher_cache_without_path_does_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cache = TeacherFeatureCache(None)
    cache.save(cache_key(), [torch.zeros(4, 5), torch.zeros(4, 6)])
    assert cache.load(cache_key()) is None
    assert os.listdir(tmp_path) == []


def test_tensor_digest_values_dtype_shape_not_order():
    a, b = torch.arange(6.0).reshape(2, 3), torch.tensor([1, 2, 3])
    base = tensor_digest({"a": a, "b": b})
    assert tensor_digest({"b": b.clone(), "a": a.clone()}) == base
    assert tensor_digest({"a": a.t().contiguous().t(), "b": b}) == base  # layout does not count
    changed = a.clone()
    changed[1, 2] = 5.5
    assert tensor_digest({"a": changed, "b": b}) != base
    assert tensor_digest({"a": a.double(), "b": b}) != base
    assert tensor_digest({"a": a.reshape(3, 2), "b": b}) != base
    assert tensor_digest({"c": a, "b": b}) != base
    assert tensor_digest({"a": a}) != base
    assert tensor_digest({"e": torch.zeros(0, 4)}) != tensor_digest({"e": torch.zeros(0, 5)})


def test_teacher_cache_key_follows_what_the_features_depend_on():
    base = cache_key()
    assert cache_key() == base
    assert base["instances"] == 4 and base["levels"] == ["p3", "p4"] and base["strides"] == [8, 16]
    teacher = tiny_teacher()
    with torch.no_grad():
        teacher.weight[0, 1] += 1e-3
    assert cache_key(teacher=teacher)["teacher_weights"] != base["teacher_weights"]
    # a buffer outside the state dict counts too
    teacher = tiny_teacher()
    teacher.register_buffer("scale", torch.ones(2), persistent=False)
    with_buffer = cache_key(teacher=teacher)["teacher_weights"]
    teacher.scale[1] = 2.0
    assert cache_key(teacher=teacher)["teacher_weights"] != with_buffer
    sample = tiny_sample()
    sample["box"][3, 2] = 4.5
    assert cache_key(sample=sample)["sample"] != base["sample"]
    sample = tiny_sample()
    sample["cls"][3] = 0
    assert cache_key(sample=sample)["sample"] != base["sample"]
    assert cache_key(names=["a.jpg", "c.jpg", "e.jpg"])["sample"] != base["sample"]
    assert cache_key(names=["c.jpg", "a.jpg", "d.jpg"])["sample"] != base["sample"]
    assert cache_key(settings=dict(INPUT, format="RGB")) != base
    assert cache_key(autocast=True) == dict(base, autocast=True)
    # what changes only one field leaves the others as they were
    assert cache_key(names=["x.jpg"]).keys() == base.keys()
    assert dict(cache_key(names=["x.jpg"]), sample=base["sample"]) == base


# ---------------------------------------------------------------- harvest: latest rows, placement


def test_latest_rows_by_hand():
    #             0  1  2  3  4  5
    rows = torch.tensor([3, 1, 3, 2, 1, 3])
    iters = torch.tensor([5, 7, 9, 4, 7, 9])
    # row 1: positions 1 and 4, both iteration 7 -> the first, 1; row 2: position 3;
    # row 3: positions 0 (5), 2 (9), 5 (9) -> the first of the latest, 2. Ascending rows.
    assert latest_rows(rows, iters).tolist() == [1, 3, 2]
    assert latest_rows(torch.tensor([4, 4, 4]), torch.tensor([1, 3, 2])).tolist() == [1]
    empty = latest_rows(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert empty.dtype == torch.long and empty.shape == (0,)


def test_placed_boxes_scaled_flipped_or_none():
    boxes = torch.tensor([[20.0, 10.0, 60.0, 50.0], [100.0, 40.0, 180.0, 90.0]])
    # original 100x200 (H, W) -> input 50x100: x 0.5 in both directions
    scaled = torch.tensor([[10.0, 5.0, 30.0, 25.0], [50.0, 20.0, 90.0, 45.0]])
    # flipped in a 100 px wide input: x1' = 100 - x2, x2' = 100 - x1
    flipped = torch.tensor([[70.0, 5.0, 90.0, 25.0], [10.0, 20.0, 50.0, 45.0]])
    other = torch.tensor([[0.0, 0.0, 4.0, 4.0]])
    gt = torch.cat([other, scaled.flip(0)])  # in any order, among other boxes
    assert torch.equal(placed_boxes(boxes, (100, 200), (50, 100), gt), scaled)
    gt = torch.cat([flipped, other]).double()
    assert torch.equal(placed_boxes(boxes, (100, 200), (50, 100), gt), flipped)
    # flipped inputs not harvested (BANK_HARVEST_FLIPPED False): the flipped image gives none,
    # the unflipped one its placement
    assert placed_boxes(boxes, (100, 200), (50, 100), gt, allow_flip=False) is None
    assert torch.equal(placed_boxes(boxes, (100, 200), (50, 100), scaled, allow_flip=False), scaled)
    # within half a pixel matches, further does not
    assert placed_boxes(boxes, (100, 200), (50, 100), scaled + 0.4) is not None
    assert placed_boxes(boxes, (100, 200), (50, 100), scaled + 0.6) is None
    # neither: another scale, one box only, no ground truth
    assert placed_boxes(boxes, (100, 200), (40, 100), scaled) is None
    assert placed_boxes(boxes, (100, 200), (50, 100), scaled[:1]) is None
    assert placed_boxes(boxes, (100, 200), (50, 100), torch.zeros(0, 4)) is None
    # anisotropic: 100x200 -> 50x150 is x 0.75 in x, x 0.5 in y
    aniso = torch.tensor([[15.0, 5.0, 45.0, 25.0], [75.0, 20.0, 135.0, 45.0]])
    assert torch.equal(placed_boxes(boxes, (100, 200), (50, 150), aniso), aniso)


def test_placed_boxes_past_the_border_match_clipped_and_come_back_unclipped():
    boxes = torch.tensor([[150.0, 60.0, 220.0, 110.0], [-10.0, -4.0, 40.0, 20.0]])
    # x 0.5: [75, 30, 110, 55] and [-5, -2, 20, 10]; clipped to the 100x50 input: [75, 30, 100,
    # 50] and [0, 0, 20, 10] are the ground truth (detectron2 clips it)
    gt = torch.tensor([[75.0, 30.0, 100.0, 50.0], [0.0, 0.0, 20.0, 10.0]])
    want = torch.tensor([[75.0, 30.0, 110.0, 55.0], [-5.0, -2.0, 20.0, 10.0]])
    assert torch.equal(placed_boxes(boxes, (100, 200), (50, 100), gt), want)
    assert placed_boxes(boxes, (100, 200), (50, 100), want) is None  # unclipped gt: no
    # flipped: [100 - 110, 30, 100 - 75, 55] = [-10, 30, 25, 55] -> clipped [0, 30, 25, 50];
    # [100 - 20, -2, 100 + 5, 10] = [80, -2, 105, 10] -> clipped [80, 0, 100, 10]
    gt = torch.tensor([[80.0, 0.0, 100.0, 10.0], [0.0, 30.0, 25.0, 50.0]])
    want = torch.tensor([[-10.0, 30.0, 25.0, 55.0], [80.0, -2.0, 105.0, 10.0]])
    assert torch.equal(placed_boxes(boxes, (100, 200), (50, 100), gt), want)


# ---------------------------------------------------------------- harvest


LEVELS, STRIDES = ["p3", "p4"], [8, 16]
FILES = ["a.jpg", "b.jpg", "c.jpg", "d.jpg"]


def harvest_sample() -> dict:
    """Rows (sample_instances' order: class, image): 0 = class 0 in a.jpg, 1 = class 0 in
    c.jpg, 2 = class 1 in a.jpg, 3 = class 1 in d.jpg; b.jpg is not sampled."""
    return {
        "image": torch.tensor([0, 2, 0, 3]),
        "cls": torch.tensor([0, 0, 1, 1]),
        "box": torch.tensor(
            [
                [16.0, 8.0, 80.0, 56.0],
                [0.0, 16.0, 24.0, 48.0],
                [40.0, 0.0, 120.0, 64.0],
                [10.0, 10.0, 50.0, 50.0],
            ]
        ),
    }


def train_input(name: str, height: int, width: int, gt: list) -> dict:
    inst = Instances((height, width))
    inst.gt_boxes = Boxes(torch.tensor(gt, dtype=torch.float32).reshape(-1, 4))
    inst.gt_classes = torch.zeros(len(inst.gt_boxes), dtype=torch.long)
    return {"file_name": name, "height": height, "width": width, "instances": inst}


def harvest_batch():
    """A training batch of a, b, c, d (input sizes 32x64, 64x64, 64x64, 64x64; padded 64x64):
    a.jpg (64x128) at half size, rows 0 and 2 -> [8, 4, 40, 28] and [20, 0, 60, 32];
    c.jpg (64x64) flipped, row 1 -> [64 - 24, 16, 64 - 0, 48] = [40, 16, 64, 48];
    b.jpg not sampled; d.jpg's ground truth holds no sampled box: unplaced."""
    inputs = [
        train_input("a.jpg", 64, 128, [[1, 1, 3, 3], [20, 0, 60, 32], [8, 4, 40, 28]]),
        train_input("b.jpg", 64, 64, [[8, 4, 40, 28]]),
        train_input("c.jpg", 64, 64, [[40, 16, 64, 48]]),
        train_input("d.jpg", 64, 64, [[0, 0, 5, 5]]),
    ]
    sizes = [(32, 64), (64, 64), (64, 64), (64, 64)]
    return inputs, sizes


def random_features(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"p3": torch.randn(4, 3, 8, 8, generator=g), "p4": torch.randn(4, 3, 4, 4, generator=g)}


def expected_rows(features: dict) -> list[torch.Tensor]:
    """Rows 0, 1, 2 pooled at their placed boxes (batch images 0, 2, 0)."""
    boxes = torch.tensor(
        [[8.0, 4.0, 40.0, 28.0], [40.0, 16.0, 64.0, 48.0], [20.0, 0.0, 60.0, 32.0]]
    )
    bidx = torch.tensor([0, 2, 0])
    return [box_crop_mean(features[n], boxes, bidx, s) for n, s in zip(LEVELS, STRIDES)]


def test_harvest_rows_are_the_placed_box_crops():
    harvest = FeatureHarvest(harvest_sample(), FILES, LEVELS, STRIDES)
    inputs, sizes = harvest_batch()
    features = random_features(0)
    with EventStorage(5):
        harvest(inputs, features, sizes)
    assert len(harvest.rows()[0]) == 0 and harvest.unplaced == 0  # nothing merged yet
    harvest.merge()
    assert harvest.unplaced == 1  # d.jpg; b.jpg is not in the sample
    rows, feats = harvest.rows()
    assert rows.tolist() == [0, 1, 2] and harvest.state_dict()["iters"].tolist() == [5, 5, 5]
    assert [tuple(f.shape) for f in feats] == [(3, 3), (3, 3)]
    for f, want in zip(feats, expected_rows(features)):
        torch.testing.assert_close(f, want, rtol=0, atol=0)
    # row 0 at p3 (stride 8) by hand: [8, 4, 40, 28] -> columns 1..5, rows 0..3
    torch.testing.assert_close(feats[0][0], features["p3"][0, :, 0:4, 1:6].mean((1, 2)))
    # row 1 at p4 (stride 16): [40, 16, 64, 48] -> columns 2..4 clamped to 2..3, rows 1..3
    torch.testing.assert_close(feats[1][1], features["p4"][2, :, 1:4, 2:4].mean((1, 2)))
    harvest.merge()  # nothing new: the same harvest
    assert harvest.rows()[0].tolist() == [0, 1, 2] and harvest.unplaced == 1


def test_harvest_ignores_batches_without_sampled_images():
    harvest = FeatureHarvest(harvest_sample(), FILES, LEVELS, STRIDES)
    inputs, sizes = harvest_batch()
    with EventStorage(0):
        harvest([inputs[1]], random_features(0), [sizes[1]])
        harvest([dict(inputs[0], file_name="z.jpg")], random_features(0), [sizes[0]])
    assert harvest.local == [] and harvest.unplaced == 0
    harvest.merge()
    assert len(harvest.rows()[0]) == 0


def test_harvest_later_iteration_replaces_earlier_row():
    harvest = FeatureHarvest(harvest_sample(), FILES, LEVELS, STRIDES)
    inputs, sizes = harvest_batch()
    first, second, third = random_features(0), random_features(1), random_features(2)
    with EventStorage(5) as storage:
        harvest(inputs, first, sizes)
        harvest.merge()
        storage.iter = 9  # a.jpg again, alone, unflipped at half size
        harvest(inputs[:1], {n: f[:1] for n, f in second.items()}, sizes[:1])
        harvest.merge()
    rows, feats = harvest.rows()
    assert rows.tolist() == [0, 1, 2] and harvest.state_dict()["iters"].tolist() == [9, 5, 9]
    want_first, want_second = expected_rows(first), expected_rows(second)
    for k in range(2):
        assert torch.equal(feats[k][[0, 2]], want_second[k][[0, 2]])
        assert torch.equal(feats[k][1], want_first[k][1])
    # two calls before one merge: the later iteration still wins
    harvest.reset(9)
    with EventStorage(12) as storage:
        harvest(inputs, first, sizes)
        storage.iter = 14
        harvest(inputs, third, sizes)
    harvest.merge()
    assert harvest.state_dict()["iters"].tolist() == [14, 14, 14]
    for f, want in zip(harvest.rows()[1], expected_rows(third)):
        assert torch.equal(f, want)


def test_harvest_state_round_trip_and_reset(tmp_path):
    harvest = FeatureHarvest(harvest_sample(), FILES, LEVELS, STRIDES)
    harvest.reset(3)
    inputs, sizes = harvest_batch()
    with EventStorage(5):
        harvest(inputs, random_features(0), sizes)
    harvest.merge()
    torch.save(harvest.state_dict(), tmp_path / "h.pth")
    state = torch.load(tmp_path / "h.pth", weights_only=True)
    other = FeatureHarvest(harvest_sample(), FILES, LEVELS, STRIDES)
    other.load_state_dict(state)
    assert other.since == 3
    a, b = harvest.state_dict(), other.state_dict()
    assert a["since"] == b["since"] and torch.equal(a["rows"], b["rows"])
    assert torch.equal(a["iters"], b["iters"])
    assert all(torch.equal(x, y) for x, y in zip(a["features"], b["features"]))
    # the loaded harvest goes on: a later row replaces a loaded one
    with EventStorage(8):
        other(inputs[2:3], {n: f[2:3] for n, f in random_features(1).items()}, sizes[2:3])
    other.merge()
    assert other.state_dict()["iters"].tolist() == [5, 8, 5]
    harvest.reset(6)
    rows, feats = harvest.rows()
    assert harvest.since == 6 and harvest.unplaced == 0 and harvest.local == []
    assert len(rows) == 0 and len(feats) == 2 and all(f.numel() == 0 for f in feats)


def test_harvest_unplaced_count_is_stable_over_merges_on_two_ranks(monkeypatch):
    # two ranks that saw the same batch: all_gather returns each rank's part
    monkeypatch.setattr(feature_harvest_module.comm, "all_gather", lambda x: [x, x])
    harvest = FeatureHarvest(harvest_sample(), FILES, LEVELS, STRIDES)
    inputs, sizes = harvest_batch()
    with EventStorage(5):
        harvest(inputs, random_features(0), sizes)
    harvest.merge()
    assert harvest.unplaced == 2  # d.jpg on each rank
    harvest.merge()  # nothing new on either rank
    assert harvest.unplaced == 2


# ---------------------------------------------------------------- selections over ranks


def test_selection_shares_by_hand():
    # cost N^2: 100, 1, 25, 25. Longest first: problem 0 -> rank 0 (both idle: lowest rank);
    # problem 2 -> rank 1 (load 0 < 100); problem 3 (tie with 2 on size, later) -> rank 1
    # (25 < 100); problem 1 -> rank 1 (50 < 100). Loads 100 and 51.
    assert selection_shares([10, 1, 5, 5], 2) == [0, 1, 1, 1]
    assert selection_shares([10, 1, 5, 5], 1) == [0, 0, 0, 0]
    # 3 ranks: 16 each to ranks 0, 1, 2, then the 9 to the lowest of the equal loads
    assert selection_shares([4, 4, 4, 3], 3) == [0, 1, 2, 0]
    assert selection_shares([3, 3], 2) == [0, 1]
    assert selection_shares([], 4) == []


def test_select_bank_equals_per_class_and_level_selection():
    g = torch.Generator().manual_seed(3)
    classes = torch.tensor([0, 2, 0, 0, 2, 2, 0, 0, 2])  # class 1 has no instance
    feats_s = [torch.randn(9, 4, generator=g), torch.randn(9, 4, generator=g)]
    feats_t = [torch.randn(9, 6, generator=g), torch.randn(9, 6, generator=g)]
    calls = []

    def select(xs, xt):
        calls.append(len(xs))
        return select_prototypes(xs, xt, 2, 10.0, 0.1, 0.4, False)

    picked = select_bank(feats_s, feats_t, classes, 3, select)
    assert calls == [5, 5, 0, 0, 4, 4]  # every (class, level), class-major
    assert len(picked) == 3 and all(len(p) == 2 for p in picked)
    for c in range(3):
        rows = torch.nonzero(classes == c).flatten()
        for lvl in range(2):
            want = rows[select_prototypes(feats_s[lvl][rows], feats_t[lvl][rows], 2)]
            got = picked[c][lvl]
            assert got.dtype == torch.long and got.device.type == "cpu"
            assert torch.equal(got, want)
            assert len(got) == (0 if c == 1 else 2)
            assert bool((classes[got] == c).all())


# ---------------------------------------------------------------- the hook's config


def test_prototype_refresh_refuses_unknown_refresh_mode(tmp_path):
    cfg = setup_test_cfg(GKD_CFG, "OUTPUT_DIR", str(tmp_path), "MODEL.GKD.REFRESH_MODE", "nope")
    with pytest.raises(ValueError, match=r"MODEL\.GKD\.REFRESH_MODE .*'nope'"):
        PrototypeRefresh(cfg)
    cfg = setup_test_cfg(GKD_CFG, "OUTPUT_DIR", str(tmp_path), "MODEL.GKD.REFRESH_MODE", "bank")
    hook = PrototypeRefresh(cfg)
    assert hook.mode == "bank" and hook.harvest is None
    assert str(hook.teacher_cache.path) == os.path.join(str(tmp_path), FILE_NAME)


def test_a_class_without_sampled_instances_is_named_in_the_refresh_warning(caplog, monkeypatch):
    """The warning names such a class by its name and index, and the key that filtered it."""
    from gkd_d2.engine.refresh_report import RefreshRecord, log_refresh

    record = RefreshRecord(
        iteration=0,
        mode="full",
        instances={"cls": torch.tensor([0, 0, 2])},
        picked=[[torch.tensor([0])], [], [torch.tensor([2])]],
        counts={"student_images": 2, "teacher_images": 2},
        seconds=0.5,
        harvesting=False,
        num_images=2,
    )
    monkeypatch.setattr(logging.getLogger("gkd_d2"), "propagate", True)
    with caplog.at_level(logging.WARNING, logger="gkd_d2.engine.refresh_report"):
        log_refresh(record, 30, ["circle", "square", "ring"])
    assert "PGM: classes square (1) have no instance larger than 30 px (MODEL.GKD.MIN_BOX_SIZE" in (
        caplog.text
    )
    assert "circle" not in caplog.text and "ring" not in caplog.text
