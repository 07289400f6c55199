#!/usr/bin/env python
"""Install detectron2, built from its official source with its C++ ops.

Detectron2 is published as source on GitHub (not on PyPI) and its users build it from git; main
still says version 0.6 (no release since v0.6, 2021). ``DETECTRON2_SOURCE`` (or ``--source``)
says which source to build:

* unset or ``main`` (the default): main at the pinned commit;
* ``v0.6``: the v0.6 release tag;
* a ``.tar.gz`` snapshot (its sha256 is checked: the known snapshots against their recorded
  digests, any other against ``DETECTRON2_SHA256`` when set), a source folder, or a
  ``git+URL@commit`` (or ``@tag``).

``main`` and ``v0.6`` are cloned from ``https://github.com/facebookresearch/detectron2.git`` at
their commit, unless a local copy of the official snapshot (``detectron2-02b5c4e2.tar.gz``,
``detectron2-v0.6.tar.gz``) sits in the vendor folder beside the checkout, for machines without
GitHub.

A source tree is copied, patched only where this stack needs it (each patch checks the text it
replaces, so an unexpected tree fails loudly), and built with ``pip wheel --no-build-isolation``
(the C++ ops for the CPU; with ``nvcc`` present, the CUDA ops too). The wheel is cached under
``.cache/detectron2-wheels`` and a marker module ``detectron2/_gkd_d2_build.py`` names the build,
so that a second run with the same source is instant. Patches:

* ``model_zoo/model_zoo.py`` without ``pkg_resources`` (main and v0.6; setuptools >= 81 has none:
  ``import detectron2.model_zoo`` fails);
* v0.6 only: ``Image.LINEAR`` -> ``Image.BILINEAR`` (Pillow >= 10 removed it; it is a default
  argument in ``data/transforms``, so ``import detectron2.data`` fails), and
  ``np.int/np.float/np.str/np.bool`` -> the builtins (NumPy >= 1.24 removed them; e.g. the class
  histogram that every training data loader prints fails). main has both fixes upstream.

Only the standard library is used, so the script runs before anything else is installed.
Usage: ``python tools/install_detectron2.py [--source SRC] [--python PY] [--cache DIR] [--force]``.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

# Bump when the patches change, so that `make` reinstalls over an older patched build.
PATCH_LEVEL = 3

REPO = Path(__file__).resolve().parent.parent

# The official source: the pinned main commit, the v0.6 tag, and their snapshot files.
OFFICIAL_GIT = "https://github.com/facebookresearch/detectron2.git"
PINNED_COMMIT = "02b5c4e295e990042a714712c21dc79b731e8833"
V06_COMMIT = "d1e04565d3bec8719335b88be9e9b961bf3ec464"  # the tag v0.6
SNAPSHOTS = {  # file name -> (sha256, what it is)
    "detectron2-02b5c4e2.tar.gz": (
        "a42c29a2376e7bcc0b704a173612dd6f75960d837ccf4d340a0d714ac92e36f0",
        "main 02b5c4e2",
    ),
    "detectron2-v0.6.tar.gz": (
        "2325864a06a5010bd242eda2aae02285b01123cd5d414185e98c24e0195ea243",
        "v0.6 d1e04565",
    ),
}
NAMED = {  # DETECTRON2_SOURCE name -> (snapshot file, commit)
    "main": ("detectron2-02b5c4e2.tar.gz", PINNED_COMMIT),
    "v0.6": ("detectron2-v0.6.tar.gz", V06_COMMIT),
}
DEFAULT_SNAPSHOT = NAMED["main"][0]
VENDOR = REPO.parent / "shared" / "vendor"
BUILD_MODULE = "_gkd_d2_build.py"


class PatchError(RuntimeError):
    """The source does not look like the one these patches were written for, or cannot be had."""


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def replace_once(path: Path, old: str, new: str) -> None:
    """Replace the single occurrence of ``old`` in ``path``; fail if it occurs 0 or >1 times."""
    text = path.read_text()
    count = text.count(old)
    if count != 1:
        raise PatchError(
            f"{path}: expected exactly one occurrence of {old!r}, found {count}; "
            "this is not a detectron2 tree the patch was written for"
        )
    path.write_text(text.replace(old, new))


# ---- model zoo without pkg_resources -------------------------------------------------------------
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


# ---- removed Pillow / NumPy aliases --------------------------------------------------------------
NP_ALIAS = re.compile(r"\bnp\.(int|float|str|bool)\b(?![\w.])")
# Counts in the pristine v0.6 tree; a different count means a different tree.
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


def patch_source_tree(root: Path) -> list[str]:
    """Patch an official source tree where this stack needs it; return what was patched.

    main and v0.6 import ``pkg_resources`` in their model zoo; v0.6 also uses the removed Pillow /
    NumPy aliases. A tree with neither needs nothing.
    """
    check_source_tree(root)
    done = []
    zoo = root / "detectron2" / "model_zoo" / "model_zoo.py"
    if "import pkg_resources" in zoo.read_text():
        patch_model_zoo(root)
        done.append("model_zoo without pkg_resources")
    text = "".join(p.read_text() for p in (root / "detectron2").rglob("*.py"))
    if NP_ALIAS.search(text) or "Image.LINEAR" in text:
        patch_aliases(root)
        done.append("NumPy/Pillow aliases")
    return done


def check_source_tree(root: Path, source: str = "") -> None:
    if not (root / "setup.py").is_file() or not (root / "detectron2" / "layers" / "csrc").is_dir():
        raise PatchError(
            f"{source or root}: not a detectron2 source tree (needs setup.py and "
            "detectron2/layers/csrc/)"
        )


def describe_tree(root: Path) -> str:
    """Which line a tree is on: "main-like" (it has comm.create_local_process_group, added after
    v0.6) or "0.6"."""
    comm = (root / "detectron2" / "utils" / "comm.py").read_text()
    return "main-like" if "def create_local_process_group" in comm else "0.6"


def tree_digest(root: Path) -> str:
    """sha256 over the paths and contents of a source folder (the cache key of a folder source)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and ".git" not in p.parts):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def named_source(name: str) -> str:
    """The source of ``main`` or ``v0.6``: the local snapshot when there is one, else git."""
    snapshot, commit = NAMED[name]
    path = VENDOR / snapshot
    return str(path) if path.is_file() else f"git+{OFFICIAL_GIT}@{commit}"


def default_source() -> str:
    return named_source("main")


def resolve_source(spec: str) -> str:
    """``DETECTRON2_SOURCE`` as given (empty = main) -> a snapshot, folder or git source."""
    return named_source(spec or "main") if (spec or "main") in NAMED else spec


def unpack_source(spec: str, tmp: Path) -> tuple[Path, str, str]:
    """Make the source ``spec`` a folder under ``tmp``; return (tree, build id, description)."""
    if spec.startswith("git+") or spec.startswith("git@"):
        url, _, commit = spec.removeprefix("git+").rpartition("@")
        if not url or not commit:
            raise PatchError(f"DETECTRON2_SOURCE {spec!r}: a git source is git+URL@commit")
        if shutil.which("git") is None:
            raise PatchError(f"DETECTRON2_SOURCE {spec!r}: git is not installed")
        tree = tmp / "detectron2"
        for cmd in (
            ["git", "clone", "-q", "--filter=blob:none", url, str(tree)],
            ["git", "-C", str(tree), "checkout", "-q", commit],
        ):
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode:
                raise PatchError(
                    f"{' '.join(cmd)} failed: {run.stderr.strip()[-300:]} (without GitHub, give "
                    "DETECTRON2_SOURCE a .tar.gz snapshot or a folder of the source)"
                )
        check_source_tree(tree, spec)
        head = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        return tree, f"git-{head}", f"{url}@{head[:8]} ({describe_tree(tree)})"
    path = Path(spec).expanduser()
    if not path.exists():
        raise PatchError(
            f"DETECTRON2_SOURCE {spec!r}: no such file or folder (a source is "
            f"{' or '.join(map(repr, NAMED))}, a .tar.gz, a folder, or git+URL@commit)"
        )
    if path.is_dir():
        tree = tmp / "detectron2"
        shutil.copytree(path, tree, ignore=shutil.ignore_patterns(".git", "build", "*.so"))
        check_source_tree(tree, str(path))
        return tree, f"dir-{tree_digest(tree)[:16]}", f"folder {path} ({describe_tree(tree)})"
    got = sha256_of(path)
    known = SNAPSHOTS.get(path.name)
    expected = known[0] if known else os.environ.get("DETECTRON2_SHA256")
    if expected and got != expected:
        raise PatchError(
            f"{path}: sha256 {got} does not match the expected {expected}"
            + ("" if known else " (DETECTRON2_SHA256)")
            + "; the file is damaged or not the snapshot it is named after"
        )
    if not expected:
        print(f"install_detectron2: {path} is not a known snapshot; its sha256 is {got}")
    with tarfile.open(path) as tar:
        tar.extractall(tmp / "src", filter="data")
    tops = [p for p in (tmp / "src").iterdir() if p.is_dir()]
    if len(tops) != 1:
        raise PatchError(f"{path}: expected one top-level folder inside, found {len(tops)}")
    check_source_tree(tops[0], str(path))
    what = known[1] if known else f"{path.name} ({describe_tree(tops[0])})"
    return tops[0], f"sha256-{got[:16]}", what


def builds_cuda(python: str) -> bool:
    """Whether detectron2's setup.py will compile the CUDA ops with ``python``: it does when torch
    sees a GPU and finds the CUDA toolkit (CUDA_HOME), or when FORCE_CUDA=1."""
    probe = (
        "import os, torch\n"
        "from torch.utils.cpp_extension import CUDA_HOME\n"
        "gpu = torch.cuda.is_available() and CUDA_HOME is not None\n"
        "print(int(gpu or os.environ.get('FORCE_CUDA') == '1'))\n"
    )
    run = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    return run.stdout.strip() == "1"


def _same_build(info: dict, cuda: bool) -> bool:
    return info.get("patch_level") == PATCH_LEVEL and info.get("cuda") == cuda


def write_build_module(tree: Path, info: dict) -> None:
    (tree / "detectron2" / BUILD_MODULE).write_text(
        '"""Which detectron2 build this is (gkd_d2\'s tools/install_detectron2.py wrote it)."""\n\n'
        f"GKD_D2_BUILD = {info!r}\n"
    )


def installed_build(python: str) -> dict | None:
    """The GKD_D2_BUILD dict of the detectron2 that ``python`` imports, or None."""
    probe = (
        "import importlib.util, pathlib\n"
        "s = importlib.util.find_spec('detectron2')\n"
        f"p = s and pathlib.Path(s.submodule_search_locations[0]) / {BUILD_MODULE!r}\n"
        "print(p.read_text() if p and p.is_file() else '')\n"
    )
    run = subprocess.run([python, "-c", probe], capture_output=True, text=True)
    text = run.stdout if run.returncode == 0 else ""
    marker = "GKD_D2_BUILD = "
    if marker not in text:
        return None
    return ast.literal_eval(text.split(marker, 1)[1].strip())


def pip(python: str, *args: str, env: dict | None = None) -> None:
    subprocess.run([python, "-m", "pip", *args], check=True, env=env)


def install_from_source(python: str, spec: str, cache: Path, force: bool) -> str:
    """Build ``spec`` with its C++ ops and install it; return the one-line summary."""
    current = installed_build(python)
    cuda = builds_cuda(python)
    git_commit = re.fullmatch(r"git\+.+@([0-9a-f]{40})", spec)
    if not force and current and current.get("source") == spec and git_commit:
        # a full commit names one tree: no clone needed to know it is installed
        if current.get("id") == f"git-{git_commit.group(1)}" and _same_build(current, cuda):
            return f"detectron2 {current['what']} (compiled) already installed"
    with tempfile.TemporaryDirectory(prefix="d2-src-") as tmp:
        tree, build_id, what = unpack_source(spec, Path(tmp))
        ops = "C++ ops for the CPU and CUDA" if cuda else "C++ ops for the CPU"
        info = {
            "source": spec,
            "id": build_id,
            "what": what,
            "compiled": True,
            "cuda": cuda,
            "patch_level": PATCH_LEVEL,
        }
        if not force and current == info:
            return f"detectron2 {what} (compiled, {ops}) already installed"
        patched = patch_source_tree(tree)
        write_build_module(tree, info)
        wheels = cache / f"{build_id}-{'cuda' if cuda else 'cpu'}-p{PATCH_LEVEL}"
        start = time.perf_counter()
        if force or not list(wheels.glob("detectron2-*.whl")):
            shutil.rmtree(wheels, ignore_errors=True)
            env = {**os.environ, "MAX_JOBS": os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))}
            print(f"install_detectron2: compiling detectron2 {what} ({ops}); a few minutes")
            pip(
                python,
                "wheel",
                "-q",
                "--no-build-isolation",
                "--no-deps",
                "-w",
                str(wheels),
                str(tree),
                env=env,
            )
        wheel = next(wheels.glob("detectron2-*.whl"))
        pip(python, "install", "-q", "--no-deps", "--force-reinstall", str(wheel))
    if installed_build(python) != info:
        raise PatchError("detectron2 installed, but its build marker is not importable")
    took = time.perf_counter() - start
    extra = f"; patched: {', '.join(patched)}" if patched else ""
    return f"installed detectron2 {what} (compiled, {ops}) in {took:.0f} s{extra}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--source",
        default=os.environ.get("DETECTRON2_SOURCE", ""),
        help="'main' (the pinned commit), 'v0.6', a .tar.gz snapshot, a source folder or "
        "git+URL@commit (default: $DETECTRON2_SOURCE, else main)",
    )
    parser.add_argument("--python", default=sys.executable, help="interpreter to install into")
    parser.add_argument("--cache", type=Path, default=REPO / ".cache")
    parser.add_argument("--force", action="store_true", help="rebuild and reinstall")
    args = parser.parse_args(argv)

    spec = resolve_source(args.source)
    print(install_from_source(args.python, spec, args.cache / "detectron2-wheels", args.force))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except PatchError as e:
        sys.exit(f"install_detectron2: {e}")
