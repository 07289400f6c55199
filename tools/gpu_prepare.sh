#!/usr/bin/env bash
# Put in .gpu/ (git-ignored) what tools/gpu_check.sh needs on a lent GPU machine that cannot reach
# any registry: the detectron2 source, packed as .gpu/detectron2-src.tar.gz, and wheels, for that
# machine's Python 3.12, of the packages its image lacks. Run here, where PyPI is reachable; then
# carry `.gpu` to the device.
# The source is the one `make install` builds, found as tools/install_detectron2.py finds it:
# DETECTRON2_SOURCE unset or `main` = main at the pinned commit, `v0.6`, a .tar.gz snapshot (its
# sha256 checked), a source folder, or git+URL@commit (cloned here). Without GitHub, set
# DETECTRON2_SOURCE to a .tar.gz snapshot or a folder of the source.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .gpu/wheels
"$PY" - <<'PY'
import os
import sys
import tarfile
import tempfile
from pathlib import Path

from tools.install_detectron2 import PatchError, resolve_source, unpack_source

given = os.environ.get("DETECTRON2_SOURCE", "")
spec = resolve_source(given)
with tempfile.TemporaryDirectory(prefix="d2-src-") as tmp:
    try:
        tree, _, what = unpack_source(spec, Path(tmp))
    except PatchError as e:
        sys.exit(
            f"gpu_prepare: no detectron2 source from DETECTRON2_SOURCE={given!r} ({spec}): {e}\n"
            "gpu_prepare: set DETECTRON2_SOURCE to a .tar.gz snapshot or a source folder of "
            "detectron2 (what `make install` builds: main at the pinned commit), or to main, "
            "v0.6 or git+URL@commit where git can reach it"
        )
    with tarfile.open(".gpu/detectron2-src.tar.gz", "w:gz") as tar:
        tar.add(tree, arcname="detectron2", filter=lambda t: None if ".git" in Path(t.name).parts else t)
print(f"gpu_prepare: .gpu/detectron2-src.tar.gz is detectron2 {what} (source: {spec})")
PY
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
