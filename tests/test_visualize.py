"""Which instances the prototypes are (``proto_index``), the refresh summaries in the metrics,
and tools/visualize_prototypes.py, for both GKD detectors."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO, setup_test_cfg
from detectron2.data import DatasetMapper, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from PIL import Image

from gkd_d2.config import load_config
from gkd_d2.engine import PrototypeRefresh, Trainer
from gkd_d2.engine.refresh_extract import extract_instance_features
from gkd_d2.engine.schedule import train_dataset_dicts
from gkd_d2.modeling import GKDDistiller
from tools import visualize_prototypes as vis

CONFIGS = REPO / "tests" / "configs"
# case -> (teacher config, GKD config)
CASES = {
    "retinanet": ("tiny_retinanet.yaml", "tiny_gkd_retinanet.yaml"),
    "faster_rcnn": ("tiny_faster_rcnn.yaml", "tiny_gkd_faster_rcnn.yaml"),
}
K, L, M = 6, 5, 3  # tiny configs: 6 shape classes, 5 FPN levels, NUM_PROTOTYPES 3
HOOK = ("trainer", "hooks", "PrototypeRefresh", "instances")


def teacher_file(teacher_cfg: str, path) -> str:
    """A tiny teacher's weights (random, fixed seed: the mechanics are under test)."""
    cfg = load_config(str(CONFIGS / teacher_cfg))
    torch.manual_seed(123)
    torch.save({"model": build_model(cfg).state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module", params=sorted(CASES))
def trained(request, tmp_path_factory):
    """A GKD model trained for 2 iterations (one refresh, at iteration 0)."""
    teacher_cfg, gkd_cfg = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    weights = teacher_file(teacher_cfg, tmp / "teacher.pth")
    cfg = setup_test_cfg(
        CONFIGS / gkd_cfg,
        "OUTPUT_DIR",
        str(tmp / "run"),
        "MODEL.TEACHER.WEIGHTS",
        weights,
        "SOLVER.MAX_ITER",
        "2",
    )
    trainer = Trainer(cfg)
    trainer.train()
    ckpt = tmp / "run" / "model_final.pth"
    return SimpleNamespace(
        case=request.param,
        config=str(CONFIGS / gkd_cfg),
        weights=weights,
        cfg=cfg,
        trainer=trainer,
        ckpt=ckpt,
        state=torch.load(ckpt, weights_only=True),
    )


def test_set_bank_index_is_optional_and_never_stale():
    d = GKDDistiller(
        strides=[8, 16], student_channels=4, teacher_channels=4, num_classes=3, num_prototypes=3
    )
    assert d.proto_index.shape == (2, 3, 3) and (d.proto_index == -1).all()
    d.set_bank(1, 2, torch.ones(3, 4), torch.ones(3, 4), index=torch.tensor([7, 3, 7]))
    assert d.proto_index[1, 2].tolist() == [7, 3, 7]
    d.set_bank(1, 2, torch.ones(1, 4), torch.ones(1, 4), index=torch.tensor([5]))
    assert d.proto_index[1, 2].tolist() == [5, -1, -1]  # fewer than before: no stale index
    d.set_bank(1, 2, torch.ones(2, 4), torch.ones(2, 4))  # callers without an index
    assert d.proto_index[1, 2].tolist() == [-1, -1, -1]
    with pytest.raises(ValueError, match="index of shape"):
        d.set_bank(0, 0, torch.ones(2, 4), torch.ones(2, 4), index=torch.tensor([1]))
    assert "proto_index" in d.state_dict()


def test_checkpoint_without_proto_index_loads_strictly_with_unknown_instances(trained):
    state = {
        k[len("distiller.") :]: v
        for k, v in trained.state["model"].items()
        if k.startswith("distiller.") and k != "distiller.proto_index"
    }
    d = trained.trainer.model.distiller
    other = GKDDistiller(
        strides=d.strides,
        student_channels=d.protos_s.shape[-1],
        teacher_channels=d.protos_t.shape[-1],
        num_classes=K,
        num_prototypes=M,
    )
    other.load_state_dict(state)  # strict
    assert torch.equal(other.protos_s, d.protos_s) and (other.proto_index == -1).all()


def test_proto_index_names_the_sampled_instances(trained):
    model_state = trained.state["model"]
    index = model_state["distiller.proto_index"]
    counts = model_state["distiller.proto_counts"]
    inst = trained.state
    for key in HOOK:
        inst = inst[key]
    assert index.shape == (L, K, M) and index.dtype == torch.long
    assert (counts > 0).all()
    filled = torch.arange(M)[None, None, :] < counts[:, :, None]
    # -1 exactly in the slots past the count; valid sample rows elsewhere
    assert ((index == -1) == ~filled).all()
    assert ((index[filled] >= 0) & (index[filled] < len(inst["cls"]))).all()
    # the instance in slot (level, class, j) is of that class
    slot_class = torch.arange(K)[None, :, None].expand(L, K, M)
    assert torch.equal(inst["cls"][index[filled]], slot_class[filled])
    # and the teacher prototype is that instance's box-crop feature at that level (the
    # teacher is frozen, so its features now are the refresh's)
    model = trained.trainer.model
    mapper = DatasetMapper(trained.cfg, is_train=False)
    dicts = train_dataset_dicts(trained.cfg)
    rows = torch.unique(index[filled])
    images = sorted(set(inst["image"][rows].tolist()))
    ids, feats_t = extract_instance_features(
        model.teacher.features,
        [[(i, mapper(dict(dicts[i])))] for i in images],
        inst,
        list(model.distill_in_features),
        model.distiller.strides,
    )
    position = {int(r): p for p, r in enumerate(ids)}
    protos_t = model_state["distiller.protos_t"]
    for lvl in range(L):
        for c in range(K):
            m = int(counts[lvl, c])
            expected = feats_t[lvl][[position[int(r)] for r in index[lvl, c, :m]]]
            torch.testing.assert_close(protos_t[lvl, c, :m], expected, rtol=1e-5, atol=1e-6)


def test_refresh_summaries_in_metrics(trained):
    names = MetadataCatalog.get(trained.cfg.DATASETS.TRAIN[0]).thing_classes
    inst = trained.state
    for key in HOOK:
        inst = inst[key]
    index = trained.state["model"]["distiller.proto_index"]
    expected = {
        "gkd/pgm_instances": float(len(inst["cls"])),
        "gkd/pgm_classes_without_prototypes": 0.0,
    }
    for c, name in enumerate(names):
        expected[f"gkd/pgm_instances/{name}"] = float((inst["cls"] == c).sum())
        picks = index[:, c][index[:, c] >= 0]
        expected[f"gkd/pgm_picks/{name}"] = float(len(torch.unique(picks)))
        assert (
            0
            < expected[f"gkd/pgm_picks/{name}"]
            <= min(L * M, expected[f"gkd/pgm_instances/{name}"])
        )
    history = trained.trainer.storage.histories()
    assert {k: history[k].latest() for k in expected} == expected
    # in metrics.json too, at the refresh's iteration
    lines = (trained.ckpt.parent / "metrics.json").read_text().splitlines()
    first = next(json.loads(x) for x in lines if "gkd/pgm_picks/circle" in x)
    assert first["iteration"] == 0
    assert {k: first[k] for k in expected} == expected


def test_refresh_summaries_without_qualifying_instances(trained, tmp_path):
    cfg = setup_test_cfg(
        trained.config, "OUTPUT_DIR", str(tmp_path), "MODEL.GKD.MIN_BOX_SIZE", "1000"
    )
    hook = PrototypeRefresh(cfg, Trainer.build_model(cfg))
    with EventStorage(0) as storage:
        hook.trainer = SimpleNamespace(storage=storage)
        hook.refresh(0)
        latest = {k: v[0] for k, v in storage.latest().items()}
    assert latest["gkd/pgm_instances"] == 0.0
    assert latest["gkd/pgm_classes_without_prototypes"] == float(K)
    assert latest["gkd/pgm_instances/star"] == 0.0 and latest["gkd/pgm_picks/star"] == 0.0


def test_tool_writes_pictures_and_json(trained, tmp_path, capsys):
    out = tmp_path / "vis"
    cell = 48
    argv = ["--config-file", trained.config, "--checkpoint", str(trained.ckpt)]
    argv += ["--output", str(out), "--max-images", "6", "--cell-size", str(cell)]
    assert vis.main([*argv, "MODEL.TEACHER.WEIGHTS", trained.weights]) == 0
    printed = capsys.readouterr().out
    assert "circle" in printed and "occluded:" in printed

    # the grid: a label column, M cells of cell + GAP; a header, K * L rows of
    # cell + caption + GAP
    grid = Image.open(out / "prototypes.png")
    assert grid.size == (120 + M * (cell + 4) + 4, 24 + K * L * (cell + 14 + 4) + 4)
    pixels = np.asarray(grid.convert("RGB"))
    assert (pixels == (255, 40, 40)).all(axis=-1).any()  # boxes drawn
    hist = Image.open(out / "robustness.png")
    assert hist.size == (800, 500)
    assert (out / "prototypes.png").stat().st_size > 0 and (out / "robustness.png").stat().st_size

    summary = json.loads((out / "robustness.json").read_text())
    assert summary["images"] == 6 and summary["instances"] > 0
    assert sum(summary["histogram"]["counts"]) == summary["instances"]
    groups = [summary, *summary["per_class"].values(), *summary["per_level"].values()]
    for flag in ("occluded", "blurred"):  # the embedded scenes carry both flags
        groups += summary[flag].values()
        assert sum(g["instances"] for g in summary[flag].values()) == summary["instances"]
    assert sum(g["instances"] for g in summary["per_class"].values()) == summary["instances"]
    groups += summary["size"].values()
    assert sum(g["instances"] for g in summary["size"].values()) == summary["instances"]
    for g in groups:
        assert g["mean_r"] is None or 0.0 <= g["mean_r"] <= 1.0
        if g["instances"]:
            qs = [g[k] for k in ("p10", "p25", "p50", "p75", "p90")]
            assert qs == sorted(qs) and 0.0 <= g["below_0.5"] <= 1.0
    assert summary["split"] == "gkd_scenes_tiny_train"
    assert summary["r_source"] == vis.R_SOURCES["training"]
    assert summary["positives_per_box"] >= 1
    assert summary["min_over_positives"]["all"]["mean_r"] <= summary["mean_r"] + 1e-9
    assert ("soft_label_r" in summary) == (trained.case == "faster_rcnn")
    overlap = summary["fg_overlap"]
    assert overlap["fg_cells"] > 0 and 0.0 <= overlap["shared_share"] <= 1.0
    for k in ("mean_weight_max", "mean_weight_last"):
        assert 0.0 <= overlap[k] <= 1.0
    assert overlap["mean_weight_last"] <= overlap["mean_weight_max"] + 1e-9  # max is the max
    assert Image.open(out / "robustness_groups.png").size[0] > 0
    assert "size: " in printed

    # the same on the test split's boxes
    test_out = tmp_path / "vis_test"
    argv_test = [*argv[:4], "--output", str(test_out), "--max-images", "4", "--split", "test"]
    argv_test += ["--r-source", "box"]  # and the box-level r, a labelled option
    assert vis.main([*argv_test, "MODEL.TEACHER.WEIGHTS", trained.weights]) == 0
    on_test = json.loads((test_out / "robustness.json").read_text())
    assert on_test["split"] == trained.cfg.DATASETS.TEST[0] and on_test["images"] == 4
    assert on_test["r_source"] == vis.R_SOURCES["box"] and "fg_overlap" not in on_test
    assert on_test["instances"] > 0
    assert set(summary["per_class"]) == set(
        MetadataCatalog.get("gkd_scenes_tiny_train").thing_classes
    )


def test_grid_of_some_classes(trained):
    bank = vis.load_bank_state(str(trained.ckpt))
    model = trained.trainer.model
    names = vis.class_names(trained.cfg, K)
    classes = vis._select_classes("star,0", names)
    assert classes == [5, 0]
    grid = vis.draw_prototypes(
        bank,
        train_dataset_dicts(trained.cfg),
        names,
        list(model.distill_in_features),
        model.distiller.strides,
        cell=32,
        classes=classes,
    )
    assert grid.size == (120 + M * (32 + 4) + 4, 24 + 2 * L * (32 + 14 + 4) + 4)


def test_old_checkpoint_is_a_clear_error(trained, tmp_path, capsys):
    old = {**trained.state, "model": dict(trained.state["model"])}
    del old["model"]["distiller.proto_index"]
    path = tmp_path / "old.pth"
    torch.save(old, path)
    argv = ["--config-file", trained.config, "--checkpoint", str(path), "--output", str(tmp_path)]
    assert vis.main(argv) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "'distiller.proto_index'" in err
    assert not (tmp_path / "prototypes.png").exists()

    no_hooks = {"model": trained.state["model"]}  # e.g. an exported model
    torch.save(no_hooks, path)
    assert vis.main(argv) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "'trainer'" in err


def test_r_statistics_of_a_group_by_hand():
    r = torch.tensor([0.1, 0.2, 0.4, 0.6, 0.8, 1.0])
    s = vis._mean_of(r)
    assert s["instances"] == 6 and abs(s["mean_r"] - 3.1 / 6) < 1e-6
    assert abs(s["p50"] - 0.5) < 1e-6  # halfway between 0.4 and 0.6 (linear interpolation)
    assert abs(s["p10"] - 0.15) < 1e-6 and abs(s["p90"] - 0.9) < 1e-6
    assert s["below_0.5"] == 0.5
    assert vis._mean_of(torch.zeros(0)) == {"instances": 0, "mean_r": None, "below_0.5": None}
    result = {
        "area": torch.tensor([10.0, 32.0**2, 5000.0, 96.0**2, 1e6]),
        "occluded": torch.tensor([1, 0, 0, 1, 0], dtype=torch.int8),
        "blurred": torch.full((5,), -1, dtype=torch.int8),  # not recorded: no group
    }
    groups = vis.groups_of(result)
    assert set(groups) == {"size", "occluded"}
    assert [m.tolist() for m in groups["size"].values()] == [
        [True, False, False, False, False],
        [False, True, True, False, False],
        [False, False, False, True, True],
    ]
    assert groups["occluded"]["true"].tolist() == [True, False, False, True, False]


def test_tool_r_is_the_r_the_distiller_logs_for_the_same_batch(trained):
    """The tool's training r, per box, averages back to what the training step logs for the
    same input and weights (gkd/r_mean, gkd/num_instances); each positive is matched to a
    ground truth of its own class."""
    model = trained.trainer.model
    dicts = [d for d in train_dataset_dicts(trained.cfg) if d["annotations"]][:3]
    result = vis.robustness_in_training(model, trained.cfg, dicts, 3, seed=7, batch_size=3)
    assert result["images"] == 3 and len(result["records"]) == 1
    # the training step itself, on the same batch, as the trainer runs it
    inputs = [vis.training_mapper(trained.cfg)(dict(d)) for d in dicts]
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    model.train()
    with EventStorage(0) as storage:
        model(inputs)
        logged = {k: v.latest() for k, v in storage.histories().items()}
    model.load_state_dict(saved)
    positives = result["positives"].float()
    assert int(positives.sum()) == logged["gkd/num_instances"] > 0
    num_gt = sum(len(x["instances"]) for x in inputs)
    assert result["boxes_without_positives"] + len(positives) == num_gt
    pooled = float((result["r"] * positives).sum() / positives.sum())
    assert pooled == pytest.approx(logged["gkd/r_mean"], abs=1e-6)
    assert float(result["r_min"].min()) == pytest.approx(logged["gkd/r_min"], abs=1e-6)
    if trained.case == "faster_rcnn":
        soft = float((result["r_soft"] * positives).sum() / positives.sum())
        assert soft == pytest.approx(logged["gkd/r_soft_mean"], abs=1e-6)
    rec = result["records"][0]
    gt_classes = torch.cat([x["instances"].gt_classes for x in inputs])
    assert bool((rec.instance_gt >= 0).all())
    assert torch.equal(gt_classes[rec.instance_gt], rec.classes.cpu())
    # the buffers the tool's training forward touched are restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_per_box_mean_min_by_hand():
    values = torch.tensor([0.2, 0.8, 0.5, 0.9, 0.1])
    rows = torch.tensor([0, 0, 2, -1, 2])  # the -1 instance matched nothing: ignored
    mean, low, count = vis.per_box_mean_min(values, rows, 4)
    torch.testing.assert_close(mean, torch.tensor([0.5, 0.0, 0.3, 0.0]))
    assert low[0] == pytest.approx(0.2) and low[2] == pytest.approx(0.1)
    assert torch.isinf(low[1]) and torch.isinf(low[3])
    assert count.tolist() == [2, 0, 2, 0]


def test_overlap_statistics_by_hand():
    """Two boxes on one 4 x 4 level sharing 2 cells: the shared share, and the weights of
    both rules (max keeps 0.9, the official last-wins gives the second box's 0.3)."""
    from gkd_d2.modeling.distiller import InstanceRecord

    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [8.0, 0.0, 24.0, 16.0]])  # 2x2 cells each
    w = torch.tensor([0.9, 0.3])
    rec = InstanceRecord(
        boxes=boxes,
        batch_idx=torch.zeros(2, dtype=torch.long),
        classes=torch.zeros(2, dtype=torch.long),
        levels=torch.zeros(2, dtype=torch.long),
        r=w,
        weights=w,
        soft_r=None,
        instance_gt=torch.tensor([0, 1]),
        map_shapes=[(1, 4, 4)],
    )
    stats = vis.overlap_statistics([rec], [8])
    assert stats["fg_cells"] == 6 and stats["shared_share"] == pytest.approx(2 / 6)
    assert stats["mean_weight_max"] == pytest.approx((4 * 0.9 + 2 * 0.3) / 6)
    assert stats["mean_weight_last"] == pytest.approx((2 * 0.9 + 4 * 0.3) / 6)
    assert stats["mean_abs_difference_shared"] == pytest.approx(0.6)
    assert stats["changed_share"] == pytest.approx(2 / 6)


def test_training_batches_by_hand():
    """Images without ground truth are skipped, batches hold ``size`` images, and a leftover
    single image joins the last batch (train-mode BN needs two values per channel)."""
    dicts = [{"n": n} for n in (1, 0, 2, 1, 3, 1, 1, 2)]  # ground-truth boxes per image

    def mapper(d):
        return {"instances": [0] * d["n"]}

    def sizes(ds, size):
        return [idx for idx, _ in vis.training_batches(mapper, ds, size)]

    assert sizes(dicts, 3) == [[0, 2, 3], [4, 5, 6, 7]]  # 7 with boxes: 3 + a leftover of 1 -> 4
    assert sizes(dicts, 2) == [[0, 2], [3, 4], [5, 6, 7]]
    assert sizes(dicts[:4], 2) == [[0, 2, 3]]
    assert sizes([{"n": 1}], 2) == [[0]]  # a single image with nothing to join: alone
    assert sizes(dicts[:3], 5) == [[0, 2]]
    assert sizes([{"n": 0}], 2) == []
