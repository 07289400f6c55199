#!/usr/bin/env bash
# Put in .gpu/ (git-ignored) what tools/gpu_check.sh needs on a lent GPU machine that cannot reach
# any registry: the detectron2 source snapshot and wheels, for that machine's Python 3.12, of the
# packages its image lacks. Run here, where PyPI is reachable; then carry `.gpu` to the device.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
snapshot=${DETECTRON2_SOURCE:-../shared/vendor/detectron2-02b5c4e2.tar.gz}
mkdir -p .gpu/wheels
cp "$snapshot" .gpu/detectron2-src.tar.gz
# binary or pure-Python wheels on PyPI, for CPython 3.12 on manylinux x86_64
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/wheels pycocotools==2.0.11 iopath==0.1.9 yacs==0.1.8 termcolor==3.3.0 \
    omegaconf==2.3.1 hydra-core==1.3.8
# sdist-only, pure Python: build their wheels here
"$PY" -m pip wheel -q --no-deps -w .gpu/wheels fvcore==0.1.5.post20221221 \
    antlr4-python3-runtime==4.9.3
ls -la .gpu .gpu/wheels
du -sh .gpu
