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

from benchmarks.fashion_scenes import register_fashion_datasets


def main(argv: list[str] | None = None) -> None:
    script, *args = sys.argv[1:] if argv is None else argv
    register_fashion_datasets()
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
