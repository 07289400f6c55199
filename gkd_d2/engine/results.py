"""The final evaluation of a train_net.py run, written as JSON for tools to read back."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping

# train_net.py writes OUTPUT_DIR/results.json after training or --eval-only
RESULTS_FILE = "results.json"


def _finite_or_none(value):
    # COCO's AP of an empty detection list is nan, which JSON cannot carry
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(output_dir: str, results: Mapping | None) -> str:
    """Write ``results`` ({dataset or task: {metric: value}}, as detectron2's evaluators return
    them) to ``output_dir/results.json`` through a temporary file; nan becomes null.

    Returns:
        The path written.
    """

    def plain(obj):
        if isinstance(obj, Mapping):
            return {str(k): plain(v) for k, v in obj.items()}
        return _finite_or_none(float(obj)) if isinstance(obj, int | float) else obj

    path = os.path.join(output_dir, RESULTS_FILE)
    os.makedirs(output_dir, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(plain(results or {}), f, indent=1)
    os.replace(tmp, path)
    return path


def read_results(output_dir: str) -> dict:
    """The results that train_net.py wrote to ``output_dir/results.json`` (null is nan).

    Raises:
        FileNotFoundError: no run wrote results there, named with the folder.
    """
    path = os.path.join(output_dir, RESULTS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No {RESULTS_FILE} in {output_dir!r}: train_net.py writes it after its final "
            "evaluation (is TEST.EVAL_PERIOD/DATASETS.TEST set, and did the run finish?)"
        )
    with open(path) as f:
        data = json.load(f)

    def nan_back(obj):
        if isinstance(obj, dict):
            return {k: nan_back(v) for k, v in obj.items()}
        return math.nan if obj is None else obj

    return nan_back(data)
