import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Generated test datasets go to a project cache, never to a user's DETECTRON2_DATASETS.
os.environ["DETECTRON2_DATASETS"] = str(REPO / ".cache" / "test-datasets")
TINY_CONFIG = REPO / "tests" / "configs" / "tiny_retinanet.yaml"


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
