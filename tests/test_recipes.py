"""The shipped training recipes give models that work at inference, not only a low loss.

A recipe can train to a low loss and still be useless in eval mode: BatchNorm whose running
statistics do not describe the features (an almost constant channel: running variance ~0) makes
eval-mode maps far larger than train-mode ones, every detection scores 1.0 and AP is 0. Each
recipe here is trained briefly on a tiny split and evaluated, in eval mode, on its own training
images; the FPN maps of eval and train mode are compared too.
"""

import pytest
import torch
from conftest import REPO, setup_test_cfg

import gkd_d2  # noqa: F401
from gkd_d2.engine import Trainer

CONFIGS = REPO / "tests" / "configs"


def train_and_score(cfg_file, tmp_path, iters: int, *opts):
    """Train ``iters`` iterations, then (AP on the training images, eval/train-mode FPN size
    ratios per level, the highest eval-mode detection scores)."""
    cfg = setup_test_cfg(
        cfg_file,
        "SOLVER.MAX_ITER",
        str(iters),
        "SOLVER.IMS_PER_BATCH",
        "8",
        "SOLVER.WARMUP_ITERS",
        "20",
        "SOLVER.CHECKPOINT_PERIOD",
        "100000",
        "OUTPUT_DIR",
        str(tmp_path),
        *opts,
    )
    cfg.defrost()
    cfg.DATASETS.TEST = cfg.DATASETS.TRAIN
    cfg.freeze()
    trainer = Trainer(cfg)
    trainer.train()
    model = trainer.model
    ap = Trainer.test(cfg, model)["bbox"]["AP"]
    from detectron2.data import DatasetCatalog, DatasetMapper

    mapper = DatasetMapper(cfg, is_train=False)
    inputs = [mapper(dict(d)) for d in DatasetCatalog.get(cfg.DATASETS.TRAIN[0])[:8]]
    with torch.no_grad():
        images = model.preprocess_image(inputs).tensor
        model.eval()
        eval_maps = model.backbone(images)
        outputs = model(inputs)
        model.train()
        train_maps = model.backbone(images)
    ratios = {k: float(eval_maps[k].norm() / train_maps[k].norm()) for k in eval_maps}
    top = torch.cat([o["instances"].scores[:10] for o in outputs])
    return ap, ratios, top


@pytest.mark.parametrize(
    "detector,config,iters",
    [
        ("retinanet", "tiny_retinanet.yaml", 120),
        ("faster_rcnn", "tiny_faster_rcnn.yaml", 120),
    ],
)
def test_quickstart_recipes_hold_at_inference(tmp_path, detector, config, iters):
    ap, ratios, top = train_and_score(CONFIGS / config, tmp_path, iters)
    assert ap > 5.0, ap  # a collapsed model scores ~0
    for level, ratio in ratios.items():
        assert 0.5 < ratio < 2.0, (level, ratio)
    assert float(top.min()) < 0.99  # not every detection at 1.0


def _benchmark_inputs_missing() -> str:
    from benchmarks import fashion_scenes as fs
    from gkd_d2.modeling import mobilenet

    try:
        mobilenet.imagenet_weights_file()
    except FileNotFoundError:
        return "ImageNet MobileNetV2 weights"
    if not fs.FASHION_MNIST_DIR.is_dir() or not fs.background_paths():
        return "Fashion-MNIST / opencv-doc"
    return ""


def _gn_head_missing(config: str) -> bool:
    from gkd_d2.config import retinanet_head_takes_gn

    return "retinanet" in config and not retinanet_head_takes_gn()


# slow: a 120-iteration run on the 16-image tiny split at 128 px. The RetinaNet teacher without a
# head norm scored AP 0.21 here, and 10.5 after 1200 iterations at full size (2026-12-03):
# too slow to learn for the benchmark; it has a GN head now.
@pytest.mark.slow
@pytest.mark.skipif(
    bool(_benchmark_inputs_missing()),
    reason="benchmark data absent: run tools/install_benchmark_data.sh",
)
@pytest.mark.parametrize(
    "config", ["fashion_teacher_retinanet.yaml", "fashion_teacher_faster_rcnn.yaml"]
)
def test_benchmark_recipe_holds_at_inference(tmp_path, config):
    """The accuracy benchmark's teacher recipes (ImageNet MobileNetV2, FrozenBN backbone, GN in
    the FPN and the head), on the tiny Fashion-MNIST split at 128 px."""
    if _gn_head_missing(config):
        pytest.skip("detectron2 0.6 cannot build a GN RetinaNet head (the recipe needs main)")
    from benchmarks.fashion_scenes import register_fashion_datasets

    register_fashion_datasets()  # the bench configs name gkd_fashion_* splits
    score_key = "RETINANET" if "retinanet" in config else "ROI_HEADS"
    ap, ratios, top = train_and_score(
        REPO / "configs" / "bench" / config,
        tmp_path,
        120,
        "DATASETS.TRAIN",
        "('gkd_fashion_tiny_train',)",
        "INPUT.MIN_SIZE_TRAIN",
        "(128,)",
        "INPUT.MAX_SIZE_TRAIN",
        "128",
        "INPUT.MIN_SIZE_TEST",
        "128",
        "INPUT.MAX_SIZE_TEST",
        "128",
        f"MODEL.{score_key}.SCORE_THRESH_TEST",
        "0.0",
    )
    assert ap > 5.0, ap
    for level, ratio in ratios.items():
        assert 0.5 < ratio < 2.0, (level, ratio)
    assert float(top.min()) < 0.99
