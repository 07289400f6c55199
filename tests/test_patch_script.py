"""tools/install_detectron2.py: checksum, patches, and loud failure on an unexpected sdist."""

import importlib.util
import shutil
import tarfile

import pytest
from conftest import REPO

spec = importlib.util.spec_from_file_location(
    "install_detectron2", REPO / "tools" / "install_detectron2.py"
)
inst = importlib.util.module_from_spec(spec)
spec.loader.exec_module(inst)

SDIST = REPO / ".cache" / "downloads" / inst.SDIST_FILE


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    if not SDIST.is_file():
        pytest.skip(f"{SDIST} not downloaded (run `make install`)")
    inst.verify_sdist(SDIST)
    return inst.unpack(SDIST, tmp_path_factory.mktemp("sdist"))


@pytest.fixture
def tree(pristine, tmp_path):
    dest = tmp_path / pristine.name
    shutil.copytree(pristine, dest)
    return dest


def test_patches_apply_to_pristine_sdist(tree):
    inst.patch_tree(tree)
    setup = (tree / "setup.py").read_text()
    assert 'name="detectron2"' in setup and "ext_modules=[]" in setup
    assert "black==" not in setup
    c_mod = (tree / "detectron2" / "_C.py").read_text()
    assert inst.MARKER in c_mod
    zoo = (tree / "detectron2" / "model_zoo" / "model_zoo.py").read_text()
    assert "pkg_resources" not in zoo
    for path in (tree / "detectron2").rglob("*.py"):
        text = path.read_text()
        assert not inst.NP_ALIAS.search(text), path
        assert "Image.LINEAR" not in text, path


def test_tampered_setup_fails_naming_file_and_text(tree):
    setup = tree / "setup.py"
    setup.write_text(setup.read_text().replace("ext_modules=get_extensions(),", "ext_modules=[],"))
    with pytest.raises(
        inst.PatchError,
        match=r"setup\.py: expected exactly one occurrence of "
        r"'ext_modules=get_extensions\(\),', found 0",
    ):
        inst.patch_tree(tree)


def test_extra_numpy_alias_is_detected(tree):
    extra = tree / "detectron2" / "utils" / "extra.py"
    extra.write_text("import numpy as np\nx = np.float(1)\n")
    with pytest.raises(inst.PatchError, match="found 20 removed NumPy aliases"):
        inst.patch_tree(tree)


def test_patching_twice_fails(tree):
    inst.patch_tree(tree)
    with pytest.raises(inst.PatchError, match="setup.py"):
        inst.patch_tree(tree)


def test_not_an_sdist_fails(tmp_path):
    with pytest.raises(inst.PatchError, match="not an unpacked detectron2 sdist"):
        inst.patch_tree(tmp_path)


def test_checksum_mismatch_names_file(pristine, tmp_path):
    bad = tmp_path / inst.SDIST_FILE
    with tarfile.open(bad, "w:gz") as tar:
        tar.add(pristine / "setup.py", arcname=f"{pristine.name}/setup.py")
    with pytest.raises(inst.PatchError, match=rf"{bad.name}: sha256 [0-9a-f]{{64}} does not match"):
        inst.verify_sdist(bad)
    with pytest.raises(inst.PatchError, match="sdist not found"):
        inst.verify_sdist(tmp_path / "missing.tar.gz")


def test_installed_build_is_current():
    import sys

    build = inst.installed_build(sys.executable)
    assert build is not None and build["patch_level"] == inst.PATCH_LEVEL


# ---- official source snapshots (../shared/vendor on these machines) ----------------------------
VENDOR = REPO.parent / "shared" / "vendor"


def snapshot(name: str):
    path = VENDOR / name
    if not path.is_file():
        pytest.skip(f"{path} not here (the official snapshots live in ../shared/vendor)")
    return path


@pytest.mark.parametrize(
    "name, patched",
    [
        ("detectron2-02b5c4e2.tar.gz", ["model_zoo without pkg_resources"]),
        ("detectron2-v0.6.tar.gz", ["model_zoo without pkg_resources", "NumPy/Pillow aliases"]),
    ],
)
def test_source_snapshot_checked_and_patched(name, patched, tmp_path):
    tree, build_id, what = inst.unpack_source(str(snapshot(name)), tmp_path)
    assert build_id == "sha256-" + inst.SNAPSHOTS[name][0][:16]
    assert what == inst.SNAPSHOTS[name][1]
    assert (tree / "detectron2" / "layers" / "csrc" / "vision.cpp").is_file()
    assert inst.patch_source_tree(tree) == patched
    text = "".join(p.read_text() for p in (tree / "detectron2").rglob("*.py"))
    assert "pkg_resources" not in text and not inst.NP_ALIAS.search(text)
    assert inst.patch_source_tree(tree) == []  # a patched tree needs nothing more


def test_damaged_snapshot_is_refused_by_name(tmp_path):
    snapshot("detectron2-02b5c4e2.tar.gz")
    fake = tmp_path / "detectron2-02b5c4e2.tar.gz"
    with tarfile.open(fake, "w:gz") as tar:
        tar.add(REPO / "setup.cfg", arcname="detectron2-02b5c4e2/setup.cfg")
    with pytest.raises(inst.PatchError, match=rf"{fake}: sha256 [0-9a-f]{{64}} does not match"):
        inst.unpack_source(str(fake), tmp_path / "x")


def test_bad_sources_are_named(tmp_path):
    with pytest.raises(inst.PatchError, match="'/no/such/detectron2': no such file or folder"):
        inst.unpack_source("/no/such/detectron2", tmp_path)
    with pytest.raises(inst.PatchError, match="a git source is git\\+URL@commit"):
        inst.unpack_source("git+https://example.com/detectron2.git", tmp_path)
    (tmp_path / "folder").mkdir()
    with pytest.raises(inst.PatchError, match="folder: not a detectron2 source tree"):
        inst.unpack_source(str(tmp_path / "folder"), tmp_path / "copy")
    with pytest.raises(inst.PatchError, match="not a detectron2 source tree"):
        inst.patch_source_tree(tmp_path / "folder")


def test_default_source_is_the_pinned_main():
    source = inst.default_source()
    if (VENDOR / inst.DEFAULT_SNAPSHOT).is_file():
        assert source == str(VENDOR / inst.DEFAULT_SNAPSHOT)
    else:
        assert source == f"git+{inst.OFFICIAL_GIT}@{inst.PINNED_COMMIT}"
