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

    assert inst.installed_patch_level_ok(sys.executable)
