import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Generated test datasets go to a project cache, never to a user's DETECTRON2_DATASETS.
os.environ["DETECTRON2_DATASETS"] = str(REPO / ".cache" / "test-datasets")
TINY_CONFIG = REPO / "tests" / "configs" / "tiny_retinanet.yaml"


def setup_test_cfg(config_file, *opts):
    """train_net's config set-up (setup_cfg) for ``config_file`` with KEY VALUE overrides."""
    from types import SimpleNamespace

    from gkd_d2.engine import setup_cfg

    args = SimpleNamespace(
        config_file=str(config_file), eval_only=False, resume=False, opts=list(opts)
    )
    return setup_cfg(args)


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
