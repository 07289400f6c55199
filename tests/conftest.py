import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Generated test datasets go to a project cache, never to a user's DETECTRON2_DATASETS.
os.environ["DETECTRON2_DATASETS"] = str(REPO / ".cache" / "test-datasets")
# the test-only splits of tests/configs/tiny_*.yaml (import gkd_d2 registers the quick-start
# ones); imported only now: detectron2 reads DETECTRON2_DATASETS when it is imported
from tiny_datasets import register_tiny_datasets  # noqa: E402

register_tiny_datasets()
# what a process the tests launch needs for the tiny splits: tests/startup/sitecustomize.py
# registers them at its start-up (and in the processes it starts in turn)
TINY_ENV = {
    "PYTHONPATH": os.pathsep.join(
        [str(REPO / "tests" / "startup"), str(REPO / "tests")]
        + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    )
}
TINY_CONFIG = REPO / "tests" / "configs" / "tiny_retinanet.yaml"
# a tiny GKD student with the tiny teacher's widths (res2 32, FPN 64)
TEACHER_WIDTHS = [
    "MODEL.RESNETS.STEM_OUT_CHANNELS",
    "32",
    "MODEL.RESNETS.RES2_OUT_CHANNELS",
    "32",
    "MODEL.FPN.OUT_CHANNELS",
    "64",
]


def setup_test_cfg(config_file, *opts):
    """train_net's config set-up (setup_cfg) for ``config_file`` with KEY VALUE overrides."""
    from types import SimpleNamespace

    from gkd_d2.engine import setup_cfg

    args = SimpleNamespace(
        config_file=str(config_file), eval_only=False, resume=False, opts=list(opts)
    )
    return setup_cfg(args)


def tiny_inputs(cfg, n=2):
    """The first ``n`` images of ``gkd_scenes_tiny_train`` through the test-time mapper (128 px:
    no resize, the boxes stay as annotated), with their ground-truth instances."""
    from detectron2.data import DatasetCatalog, DatasetMapper
    from detectron2.data.detection_utils import annotations_to_instances

    mapper = DatasetMapper(cfg, is_train=False)
    inputs = []
    for d in DatasetCatalog.get("gkd_scenes_tiny_train")[:n]:
        x = mapper(dict(d))
        x["instances"] = annotations_to_instances(d["annotations"], (128, 128))
        inputs.append(x)
    return inputs


def bn_eval(model) -> None:
    """BN layers on running statistics, so that an image's features do not depend on its batch."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()


def identity_adapters(distiller) -> None:
    """Make a distiller's 3x3 adapters (equal channels) the identity."""
    import torch

    with torch.no_grad():
        for conv in distiller.adapters:
            conv.weight.zero_()
            conv.bias.zero_()
            for c in range(conv.weight.shape[0]):
                conv.weight[c, c, 1, 1] = 1.0


def dir_digest(folder: Path) -> str:
    """SHA-256 of every file's relative path and bytes under ``folder``."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            h.update(path.relative_to(folder).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def train_stop_and_resume(python, config, opts, full, split) -> tuple[str, str, str]:
    """Train ``config`` with ``opts`` in one run into ``full``; then stop before iteration 4 and
    ``--resume`` into ``split``, each in a fresh process as a user runs them. Returns the log of
    the stopped run, its ``last_checkpoint`` tag (before the resume rewrites it) and the log of
    the resumed run."""
    from test_train_net import run

    run(python, "train_net.py", "--config-file", str(config), *opts, "OUTPUT_DIR", str(full))
    stop_log = run(
        python, "tests/helpers/train_until.py", "4", str(config), *opts, "OUTPUT_DIR", str(split)
    )
    tag_after_stop = (split / "last_checkpoint").read_text()
    resume_log = run(
        python,
        "train_net.py",
        "--config-file",
        str(config),
        "--resume",
        *opts,
        "OUTPUT_DIR",
        str(split),
    )
    return stop_log, tag_after_stop, resume_log


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


def pytest_collection_modifyitems(config, items):
    import torch

    slow = os.environ.get("GKD_SLOW") == "1"
    for item in items:
        if "slow" in item.keywords and not slow:
            item.add_marker(pytest.mark.skip(reason="slow check; run with GKD_SLOW=1"))
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
