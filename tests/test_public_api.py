"""gkd_d2 uses detectron2 and fvcore through their public API: a private name of either may
appear only in gkd_d2/compat.py, where each one has its reason."""

import ast
import importlib.util
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
ALLOWED = {REPO / "gkd_d2" / "compat.py"}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_names(package: str) -> set[str]:
    """Every private name that ``package`` defines: functions, classes, module globals and
    attributes it assigns (``self._x = ...``); torch's own (``nn.Module``'s, which detectron2
    also overrides) are not detectron2's."""
    root = Path(importlib.util.find_spec(package).origin).parent
    names: set[str] = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
    return {n for n in names if _is_private(n)} - set(dir(torch.nn.Module))


def uses_of(path: Path, private: set[str]) -> list[str]:
    """``file:line name`` for each private name of ``private`` that ``path`` reads, imports,
    assigns or overrides."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute):
            name = node.attr
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            name = node.name
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            ("detectron2", "fvcore")
        ):
            found += [
                f"{path.relative_to(REPO)}:{node.lineno} {a.name}"
                for a in node.names
                if _is_private(a.name)
            ]
            continue
        else:
            continue
        if name in private:
            found.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
    return found


def package_files() -> list[Path]:
    return sorted((REPO / "gkd_d2").rglob("*.py")) + [REPO / "train_net.py"]


def test_no_private_detectron2_or_fvcore_name_outside_compat():
    private = private_names("detectron2") | private_names("fvcore")
    uses = [u for p in package_files() if p not in ALLOWED for u in uses_of(p, private)]
    assert not uses, (
        "private detectron2/fvcore names used outside gkd_d2/compat.py (use the public API, or "
        "add an entry with its reason to gkd_d2/compat.py):\n" + "\n".join(uses)
    )


def test_the_check_finds_a_private_name(tmp_path):
    """The scan can fail: a file that reads a trainer's ``_trainer`` or overrides fvcore's
    ``_load_file`` is caught, a public call is not."""
    private = private_names("detectron2") | private_names("fvcore")
    assert {"_trainer", "_load_file", "_load_model", "_LOCAL_PROCESS_GROUP"} <= private
    bad = REPO / "tests" / "_private_use_probe.py"
    try:
        bad.write_text(
            "from detectron2.utils.comm import _LOCAL_PROCESS_GROUP\n"
            "def f(t):\n    return t._trainer.state_dict(), t.model\n"
            "class C:\n    def _load_file(self, f):\n        return f\n"
        )
        uses = uses_of(bad, private)
    finally:
        bad.unlink()
    assert [u.split()[-1] for u in uses] == ["_LOCAL_PROCESS_GROUP", "_trainer", "_load_file"] or (
        sorted(u.split()[-1] for u in uses) == ["_LOCAL_PROCESS_GROUP", "_load_file", "_trainer"]
    )


def test_compat_is_small_and_says_why():
    """Every private name in compat.py sits in a function or class with a docstring."""
    tree = ast.parse((REPO / "gkd_d2" / "compat.py").read_text())
    defs = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
    assert defs and all(ast.get_docstring(d) for d in defs)
