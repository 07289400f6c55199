#!/usr/bin/env python
"""Install detectron2 0.6 as a pure-Python distribution from PyPI's ``pb1-detectron2`` sdist.

Official detectron2 is not on PyPI. ``pb1-detectron2==0.6`` re-uploads the v0.6 tree without
``detectron2/layers/csrc/``, so a plain ``pip install`` of it always fails. This script:

1. downloads the sdist (``pip download``, cached under ``.cache/downloads``) and checks its sha256;
2. unpacks it into a temporary folder and applies the five patches below; every patch first checks
   that the text it replaces is there, so a different sdist fails loudly instead of half-patching;
3. ``pip install --no-build-isolation --no-deps`` the patched tree (runtime dependencies are pinned
   in ``requirements.txt``).

Patches (see ../shared/docs/stack.md for the errors each one fixes):

1. ``setup.py``: no C++ extension, distribution name ``detectron2``, ship the model-zoo yaml files
   (kept under ``detectron2/model_zoo/configs/`` in the sdist), drop the ``black==21.4b2`` pin.
2. ``detectron2/_C.py``: a pure-Python stand-in for the compiled module.
3. ``evaluation/coco_evaluation.py``: use pycocotools' COCOeval when the C++ one is missing.
4. ``model_zoo/model_zoo.py``: find config files without ``pkg_resources``.
5. Every ``.py`` under ``detectron2/``: ``Image.LINEAR`` -> ``Image.BILINEAR`` (Pillow >= 10) and
   ``np.int/np.float/np.str/np.bool`` -> builtins (NumPy >= 1.24).

Only the standard library is used, so the script runs before anything else is installed.
Usage: ``python tools/install_detectron2.py [--python PY] [--cache DIR] [--force]``.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SDIST_NAME = "pb1-detectron2"
SDIST_VERSION = "0.6"
SDIST_FILE = f"{SDIST_NAME}-{SDIST_VERSION}.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
# Bump when the patches change, so that `make` reinstalls over an older patched build.
PATCH_LEVEL = 2
MARKER = f"GKD_D2_PATCH_LEVEL = {PATCH_LEVEL}"

REPO = Path(__file__).resolve().parent.parent


class PatchError(RuntimeError):
    """The sdist does not look like the one these patches were written for."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sdist(path: Path) -> None:
    """Raise PatchError unless ``path`` is the exact sdist the patches were written for."""
    if not path.is_file():
        raise PatchError(f"{path}: sdist not found")
    got = sha256_of(path)
    if got != SDIST_SHA256:
        raise PatchError(
            f"{path}: sha256 {got} does not match the expected {SDIST_SHA256} of "
            f"{SDIST_NAME}=={SDIST_VERSION}; delete the file and run the install again"
        )


def replace_once(path: Path, old: str, new: str) -> None:
    """Replace the single occurrence of ``old`` in ``path``; fail if it occurs 0 or >1 times."""
    text = path.read_text()
    count = text.count(old)
    if count != 1:
        raise PatchError(
            f"{path}: expected exactly one occurrence of {old!r}, found {count}; "
            "this is not the pb1-detectron2 0.6 sdist the patch was written for"
        )
    path.write_text(text.replace(old, new))


# ---- patch 1: setup.py -------------------------------------------------------------------------
SETUP_EDITS = [
    ('name="pb1-detectron2",', 'name="detectron2",'),
    ("ext_modules=get_extensions(),", "ext_modules=[],  # gkd_d2 patch: the sdist has no csrc/"),
    ('cmdclass={"build_ext": torch.utils.cpp_extension.BuildExtension},', ""),
    (
        'package_data={"detectron2.model_zoo": get_model_zoo_configs()},',
        'package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},',
    ),
    ('        "black==21.4b2",\n', ""),
]


def patch_setup(root: Path) -> None:
    for old, new in SETUP_EDITS:
        replace_once(root / "setup.py", old, new)
    zoo = root / "detectron2" / "model_zoo" / "configs"
    if not any(zoo.glob("**/*.yaml")):
        raise PatchError(f"{zoo}: no model-zoo yaml files in the sdist")
    # The stale egg-info carries the old distribution name.
    shutil.rmtree(root / "pb1_detectron2.egg-info", ignore_errors=True)


# ---- patch 2: detectron2/_C.py -----------------------------------------------------------------
C_STANDIN = f'''"""Pure-Python stand-in for detectron2's compiled ``_C`` module (written by gkd_d2).

This build of detectron2 0.6 has no C++/CUDA extension (PyPI's sdist lacks ``layers/csrc``).
Everything the GKD project uses runs without it: torchvision supplies ROIAlign and NMS and
pycocotools supplies COCOeval. Deformable convolution, rotated boxes and the fast C++ COCOeval
are not available; using them raises a NotImplementedError that says so.
"""

{MARKER}
PURE_PYTHON_STANDIN = True


def get_compiler_version() -> str:
    return "none (pure-Python detectron2 build)"


def get_cuda_version() -> str:
    return "none (pure-Python detectron2 build)"


def has_cuda() -> bool:
    return False


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    raise NotImplementedError(
        f"detectron2._C.{{name}} is a compiled op, and this detectron2 0.6 build is pure Python "
        "(installed by gkd_d2's tools/install_detectron2.py). Deformable conv, rotated-box ops "
        "and the C++ COCOeval are unavailable; use modules that do not need them."
    )
'''


def patch_c_standin(root: Path) -> None:
    pkg = root / "detectron2"
    existing = list(pkg.glob("_C.*"))
    if existing:
        raise PatchError(f"{existing[0]}: a _C module already exists in the sdist")
    (pkg / "_C.py").write_text(C_STANDIN)


# ---- patch 3: COCOeval fallback ----------------------------------------------------------------
COCO_EVAL_LINE = (
    "    coco_eval = (COCOeval_opt if use_fast_impl else COCOeval)(coco_gt, coco_dt, iou_type)\n"
)
COCO_EDITS = [
    (
        "from .evaluator import DatasetEvaluator\n",
        "from .evaluator import DatasetEvaluator\n\n\n"
        "def _pure_python_build():\n"
        "    # gkd_d2 patch: this detectron2 build has no C++ COCOeval; use pycocotools' one.\n"
        "    from detectron2 import _C\n\n"
        '    return getattr(_C, "PURE_PYTHON_STANDIN", False)\n',
    ),
    (
        "        self._use_fast_impl = use_fast_impl\n",
        "        self._use_fast_impl = use_fast_impl and not _pure_python_build()\n",
    ),
    (
        COCO_EVAL_LINE,
        "    if _pure_python_build():\n        use_fast_impl = False\n" + COCO_EVAL_LINE,
    ),
]


def patch_coco_eval(root: Path) -> None:
    for old, new in COCO_EDITS:
        replace_once(root / "detectron2" / "evaluation" / "coco_evaluation.py", old, new)


# ---- patch 4: model zoo without pkg_resources --------------------------------------------------
ZOO_EDITS = [
    ("import pkg_resources\n", ""),
    (
        "cfg_file = pkg_resources.resource_filename(\n"
        '        "detectron2.model_zoo", os.path.join("configs", config_path)\n'
        "    )",
        "cfg_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "
        '"configs", config_path)',
    ),
]


def patch_model_zoo(root: Path) -> None:
    for old, new in ZOO_EDITS:
        replace_once(root / "detectron2" / "model_zoo" / "model_zoo.py", old, new)


# ---- patch 5: removed Pillow / NumPy aliases ---------------------------------------------------
NP_ALIAS = re.compile(r"\bnp\.(int|float|str|bool)\b(?![\w.])")
# Counts in the pristine sdist; a different count means a different tree.
EXPECTED_NP_ALIASES = 19
EXPECTED_IMAGE_LINEAR = 1


def patch_aliases(root: Path) -> None:
    n_np = n_lin = 0
    for path in sorted((root / "detectron2").rglob("*.py")):
        text = path.read_text()
        new, k = NP_ALIAS.subn(lambda m: m.group(1), text)
        n_np += k
        n_lin += new.count("Image.LINEAR")
        new = new.replace("Image.LINEAR", "Image.BILINEAR")
        if new != text:
            path.write_text(new)
    if (n_np, n_lin) != (EXPECTED_NP_ALIASES, EXPECTED_IMAGE_LINEAR):
        raise PatchError(
            f"{root / 'detectron2'}: found {n_np} removed NumPy aliases and {n_lin} Image.LINEAR, "
            f"expected {EXPECTED_NP_ALIASES} and {EXPECTED_IMAGE_LINEAR}"
        )


PATCHES = [patch_setup, patch_c_standin, patch_coco_eval, patch_model_zoo, patch_aliases]


def patch_tree(root: Path) -> None:
    """Apply all patches to an unpacked sdist at ``root``; raise PatchError on any mismatch."""
    if not (root / "setup.py").is_file() or not (root / "detectron2").is_dir():
        raise PatchError(f"{root}: not an unpacked detectron2 sdist (no setup.py / detectron2/)")
    for patch in PATCHES:
        patch(root)


def unpack(sdist: Path, dest: Path) -> Path:
    """Unpack ``sdist`` into ``dest`` and return the source root inside it."""
    with tarfile.open(sdist) as tar:
        tar.extractall(dest, filter="data")
    root = dest / f"{SDIST_NAME}-{SDIST_VERSION}"
    if not root.is_dir():
        raise PatchError(f"{sdist}: no top-level folder {root.name}/ inside")
    return root


def installed_patch_level_ok(python: str) -> bool:
    """True if ``python`` already imports a detectron2 patched at this PATCH_LEVEL."""
    probe = (
        "import importlib.util, pathlib, sys\n"
        "s = importlib.util.find_spec('detectron2')\n"
        "p = s and pathlib.Path(s.submodule_search_locations[0]) / '_C.py'\n"
        f"sys.exit(0 if p and p.is_file() and {MARKER!r} in p.read_text() else 1)\n"
    )
    return subprocess.run([python, "-c", probe]).returncode == 0


def download(python: str, cache: Path) -> Path:
    sdist = cache / SDIST_FILE
    if sdist.is_file() and sha256_of(sdist) == SDIST_SHA256:
        return sdist
    cache.mkdir(parents=True, exist_ok=True)
    # --no-build-isolation: the sdist's setup.py imports torch, which must already be installed.
    subprocess.run(
        [
            python,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-d",
            str(cache),
            f"{SDIST_NAME}=={SDIST_VERSION}",
        ],
        check=True,
    )
    verify_sdist(sdist)
    return sdist


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--python", default=sys.executable, help="interpreter to install into")
    parser.add_argument("--cache", type=Path, default=REPO / ".cache" / "downloads")
    parser.add_argument("--force", action="store_true", help="reinstall even if up to date")
    args = parser.parse_args(argv)

    if not args.force and installed_patch_level_ok(args.python):
        print(f"detectron2 0.6 (patch level {PATCH_LEVEL}) already installed")
        return 0
    sdist = download(args.python, args.cache)
    verify_sdist(sdist)
    with tempfile.TemporaryDirectory(prefix="d2-sdist-") as tmp:
        root = unpack(sdist, Path(tmp))
        patch_tree(root)
        subprocess.run(
            [
                args.python,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-build-isolation",
                "--no-deps",
                "--force-reinstall",
                str(root),
            ],
            check=True,
        )
    if not installed_patch_level_ok(args.python):
        raise PatchError("detectron2 installed, but the patched _C stand-in is not importable")
    print(f"installed detectron2 0.6 (pure Python, patch level {PATCH_LEVEL})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PatchError as e:
        sys.exit(f"install_detectron2: {e}")
