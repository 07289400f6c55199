"""Run a script of the repository with the Fashion-MNIST benchmark splits registered.

    python -m benchmarks.with_fashion_data train_net.py --config-file configs/bench/... [ARGS]
    python -m benchmarks.with_fashion_data tools/visualize_prototypes.py ... [ARGS]

The benchmark configs (``configs/bench/``) name ``gkd_fashion_*`` datasets, which ``import
gkd_d2`` does not register (they belong to the benchmark: :mod:`benchmarks.fashion_scenes`).
The script runs in this process as ``__main__``, as ``python SCRIPT ARGS`` would run it; one
process only (train_net.py's ``--num-gpus N`` workers would not find its ``main``).
"""

from __future__ import annotations

import runpy
import sys
from collections.abc import Callable

from benchmarks.fashion_scenes import register_fashion_datasets


def run_script(argv: list[str] | None, register: Callable[[], None]) -> None:
    """``register()``, then run ``argv[0]`` (a script path) with the arguments ``argv[1:]``
    (default: this process's) in this process as ``__main__``."""
    script, *args = sys.argv[1:] if argv is None else argv
    register()
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


def main(argv: list[str] | None = None) -> None:
    run_script(argv, register_fashion_datasets)


if __name__ == "__main__":
    main()
