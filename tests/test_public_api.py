"""gkd_d2 uses detectron2 and fvcore through their public API: anything else appears only in
gkd_d2/compat.py, where each use has its reason.

The scan covers the package (gkd_d2/), benchmarks/, tools/ and train_net.py, and reports, in
any file but gkd_d2/compat.py:

* a private name of detectron2 or fvcore (one that starts with ``_``, not a dunder, and that
  either package defines: a function, class, module global or assigned attribute) read,
  written, imported or overridden as an attribute or method (``t._trainer``,
  ``def _load_file``), or named by a string constant in ``getattr``/``setattr``/``hasattr``/
  ``delattr`` (``getattr(t, "_trainer")``);
* an import of a private module: a detectron2/fvcore module path with a component that
  starts with ``_`` (``from detectron2.foo._bar import x``, ``import detectron2._C``,
  ``from detectron2 import _C``);
* a name that detectron2 (or fvcore) does not export, imported from one of its modules
  (``from M import N``) or read from one (``M.N``, ``M`` an imported detectron2 module);
* an assignment to an attribute of a detectron2/fvcore module (``M.N = ...``,
  ``setattr(M, "N", ...)``): replacing a function that detectron2's own code looks up.

"Exported", precisely: the object ``N`` of module ``M`` is exported when there is a module
``Q`` such that ``Q.N`` is the same object and ``N`` is one of ``Q``'s public names, where ``Q``
is ``M`` itself, a package that encloses ``M`` (``detectron2.modeling`` for
``detectron2.modeling.poolers``), or a module of detectron2's API documentation
(``DOCUMENTED_MODULES``), and the public names of ``Q`` are

* its ``__all__``, when it has one;
* else, when ``Q`` is a documented module: the public functions and classes it defines (the
  callables whose ``__module__`` is ``Q``, decorated ones included), which is what the
  documentation's ``automodule :members:`` shows;
* else none.

So ``assign_boxes_to_levels`` (``detectron2.modeling.poolers.__all__`` is ``["ROIPooler"]``)
and ``permute_to_N_HWA_K`` (``detectron2.modeling.meta_arch.dense_detector`` has no
``__all__``, is not documented, and no enclosing package re-exports it) are not exported;
``from detectron2.engine import DefaultTrainer`` is (``detectron2.engine.__all__`` leaves
``defaults`` out on purpose, but ``detectron2.engine.defaults`` is documented and lists it).
A submodule imported as a name (``from detectron2.utils import comm``) is a module import,
judged by the private-module rule only. A name the installed module lacks is not judged (code
for another detectron2 version guards it, e.g. with ``hasattr``). The judgement is of the
installed detectron2 (main, or 0.6).
"""

import ast
import functools
import importlib
import importlib.util
from pathlib import Path
from types import ModuleType

import torch

REPO = Path(__file__).resolve().parent.parent
COMPAT = REPO / "gkd_d2" / "compat.py"
PACKAGES = ("detectron2", "fvcore")

# The modules of detectron2's API documentation: every ``.. automodule::`` (all with
# ``:members:``) of docs/modules/*.rst, identical in v0.6 (d1e0456) and main (02b5c4e). Its
# ``autodata`` entries (DatasetCatalog, MetadataCatalog, the modeling registries) are in the
# ``__all__`` of detectron2.data and detectron2.modeling already.
DOCUMENTED_MODULES = (
    "detectron2.checkpoint",
    "detectron2.config",
    "detectron2.data",
    "detectron2.data.detection_utils",
    "detectron2.data.datasets",
    "detectron2.data.samplers",
    "detectron2.data.transforms",
    "detectron2.engine",
    "detectron2.engine.defaults",
    "detectron2.engine.hooks",
    "detectron2.evaluation",
    "detectron2.export",
    "detectron2.layers",
    "detectron2.model_zoo",
    "detectron2.modeling",
    "detectron2.modeling.poolers",
    "detectron2.modeling.sampling",
    "detectron2.modeling.box_regression",
    "detectron2.solver",
    "detectron2.structures",
    "detectron2.utils.colormap",
    "detectron2.utils.comm",
    "detectron2.utils.events",
    "detectron2.utils.logger",
    "detectron2.utils.registry",
    "detectron2.utils.memory",
    "detectron2.utils.analysis",
    "detectron2.utils.visualizer",
    "detectron2.utils.video_visualizer",
    "fvcore.nn",
    "fvcore.common.checkpoint",
    "fvcore.common.config",
    "fvcore.common.history_buffer",
    "fvcore.common.param_scheduler",
    "fvcore.common.registry",
    "fvcore.common.timer",
)
ATTRIBUTE_BUILTINS = {"getattr", "setattr", "hasattr", "delattr"}
# gkd_d2's own module inside the detectron2 package, not detectron2's: the marker that
# tools/install_detectron2.py writes to name the build it installed (``BUILD_MODULE``)
OWN_MODULES = {"detectron2._gkd_d2_build"}


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _is_ours(module: str) -> bool:
    """Whether ``module`` is detectron2's or fvcore's (gkd_d2's ``OWN_MODULES`` are not)."""
    return module.split(".")[0] in PACKAGES and module not in OWN_MODULES


def private_module(module: str) -> bool:
    """Whether a module path has a private component (``detectron2.foo._bar``); gkd_d2's own
    ``OWN_MODULES`` are not detectron2's."""
    return module not in OWN_MODULES and any(_is_private(p) for p in module.split("."))


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


@functools.cache
def all_private_names() -> frozenset[str]:
    return frozenset(set().union(*(private_names(p) for p in PACKAGES)))


def public_names(module: str) -> frozenset[str]:
    """The names ``module`` exports itself: its ``__all__``; without one, the public functions
    and classes it defines when it is documented (``DOCUMENTED_MODULES``), else none."""
    mod = importlib.import_module(module)
    if hasattr(mod, "__all__"):
        return frozenset(mod.__all__)
    if module not in DOCUMENTED_MODULES:
        return frozenset()
    return frozenset(
        n
        for n, v in vars(mod).items()
        if not n.startswith("_") and callable(v) and getattr(v, "__module__", None) == module
    )


_MISSING = object()


@functools.cache
def exported(module: str, name: str) -> bool:
    """Whether ``module.name`` is exported (the rule of this file's docstring); a name the
    installed module lacks counts as exported (not judged)."""
    obj = getattr(importlib.import_module(module), name, _MISSING)
    if obj is _MISSING:
        return True
    parts = module.split(".")
    enclosing = [".".join(parts[:i]) for i in range(len(parts), 0, -1)]
    for q in dict.fromkeys(enclosing + list(DOCUMENTED_MODULES)):
        try:
            q_obj = getattr(importlib.import_module(q), name, _MISSING)
        except ImportError:  # a documented module another detectron2 version lacks
            continue
        if q_obj is obj and name in public_names(q):
            return True
    return False


def _imported(module: str, name: str) -> object:
    """What ``from module import name`` gives: the attribute, else the submodule."""
    parent = importlib.import_module(module)
    obj = getattr(parent, name, _MISSING)
    # only a package has submodules (a name another version lacks is no module either)
    if (
        obj is _MISSING
        and hasattr(parent, "__path__")
        and importlib.util.find_spec(f"{module}.{name}") is not None
    ):
        obj = importlib.import_module(f"{module}.{name}")
    return obj


def module_aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> detectron2/fvcore module, for every module a file imports (by any scope:
    the names a file gives detectron2 modules are taken to be unambiguous)."""
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _is_ours(a.name):
                    if a.asname:
                        aliases[a.asname] = a.name
                    else:
                        aliases[a.name.split(".")[0]] = a.name.split(".")[0]
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and _is_ours(node.module or "")
            and not private_module(node.module)
        ):
            for a in node.names:
                if isinstance(_imported(node.module, a.name), ModuleType):
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
    return aliases


def _module_of(node: ast.expr, aliases: dict[str, str]) -> str | None:
    """The detectron2/fvcore module that the expression ``node`` names, if any
    (``comm``, ``detectron2.utils.comm``)."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute):
        outer = _module_of(node.value, aliases)
        if outer is not None and isinstance(_imported(outer, node.attr), ModuleType):
            return f"{outer}.{node.attr}"
    return None


def uses_of(
    path: Path, private: set[str] | frozenset[str] | None = None, root: Path = REPO
) -> list[str]:
    """``file:line what`` (``file`` relative to ``root``) for each use of a non-public
    detectron2/fvcore name in ``path`` (the kinds of this file's docstring); ``private``: the
    private names (default: detectron2's and fvcore's)."""
    private = all_private_names() if private is None else private
    tree = ast.parse(path.read_text(), str(path))
    aliases = module_aliases(tree)
    found: list[tuple[int, str]] = []

    def on_module(lineno: int, module: str, name: str, store: bool) -> None:
        """``module.name`` read (or assigned, ``store``) at ``lineno``."""
        if store:
            found.append((lineno, f"{name} (assigned in {module})"))
        elif name.startswith("__"):  # a module's dunders (``__file__``, ``__version__``)
            return
        elif isinstance(_imported(module, name), ModuleType):
            if private_module(f"{module}.{name}"):
                found.append((lineno, f"{module}.{name} (private module)"))
        elif _is_private(name):
            found.append((lineno, name))
        elif not exported(module, name):
            found.append((lineno, f"{name} (not exported by {module})"))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [
                (node.lineno, f"{a.name} (private module)")
                for a in node.names
                if _is_ours(a.name) and private_module(a.name)
            ]
        elif isinstance(node, ast.ImportFrom):
            if node.level or not _is_ours(node.module or ""):
                continue
            if private_module(node.module):
                found.append((node.lineno, f"{node.module} (private module)"))
                continue
            for a in node.names:
                if a.name != "*":
                    on_module(node.lineno, node.module, a.name, store=False)
        elif isinstance(node, ast.Attribute):
            module = _module_of(node.value, aliases)
            if module is not None:
                on_module(node.lineno, module, node.attr, isinstance(node.ctx, ast.Store))
            elif node.attr in private:
                found.append((node.lineno, node.attr))
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            if node.name in private:
                found.append((node.lineno, node.name))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ATTRIBUTE_BUILTINS
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
        ):
            name = node.args[1].value
            module = _module_of(node.args[0], aliases)
            if module is not None and node.func.id in {"setattr", "delattr"}:
                found.append((node.lineno, f"{name} (assigned in {module})"))
            elif name in private or (module is not None and _is_private(name)):
                found.append((node.lineno, f"{name} ({node.func.id})"))
    return [f"{path.relative_to(root)}:{line} {what}" for line, what in sorted(found)]


def scanned_files(root: Path = REPO) -> list[Path]:
    """The package, the benchmarks, the tools and train_net.py of the tree at ``root``."""
    return [
        *sorted((root / "gkd_d2").rglob("*.py")),
        *sorted((root / "benchmarks").rglob("*.py")),
        *sorted((root / "tools").rglob("*.py")),
        root / "train_net.py",
    ]


def uses_outside_compat(root: Path = REPO) -> list[str]:
    """Every use the scan reports in the tree at ``root``, but in its gkd_d2/compat.py."""
    compat = root / COMPAT.relative_to(REPO)
    return [u for p in scanned_files(root) if p != compat for u in uses_of(p, root=root)]


def test_no_private_or_unexported_detectron2_name_outside_compat():
    uses = uses_outside_compat()
    assert not uses, (
        "private or non-exported detectron2/fvcore names used outside gkd_d2/compat.py (use "
        "the public API, or add an entry with its reason to gkd_d2/compat.py):\n" + "\n".join(uses)
    )


PROBE_BENCHMARK = """\
import detectron2._C
from detectron2 import _C as c
from detectron2.engine import DefaultTrainer, defaults, hooks
from detectron2.foo._bar import x
from detectron2.modeling import ROIPooler
from detectron2.modeling.backbone import fpn
from detectron2.modeling.meta_arch.dense_detector import permute_to_N_HWA_K
from detectron2.modeling.poolers import assign_boxes_to_levels
from detectron2.utils import comm
from detectron2.utils.comm import _LOCAL_PROCESS_GROUP, get_world_size


def f(t, top):
    getattr(t, "_trainer").state_dict()
    hasattr(t, "_hooks")
    setattr(t, "_trainer", None)
    getattr(t, "_my_own"), getattr(t, "model"), hasattr(comm, "create_local_process_group")
    defaults.create_ddp_model = top
    fpn.LastLevelMaxPool(), fpn.FPN, comm.get_world_size(), comm.__file__, hooks.PeriodicWriter
    return DefaultTrainer, ROIPooler, get_world_size, t.model, t._my_own
"""
PROBE_TOOL = """\
class C:
    def _load_file(self, f):
        return f

    def _my_own(self, t):
        return t._trainer.storage, t.storage
"""


def test_the_check_finds_each_kind_of_non_public_use_and_no_public_one(tmp_path):
    """Each kind of use that the scan reports is reported, in benchmarks/, tools/ and
    train_net.py as in the package, but not in gkd_d2/compat.py; public uses are not."""
    assert {"_trainer", "_hooks", "_load_file", "_load_model"} <= all_private_names()
    assert "_my_own" not in all_private_names()
    (tmp_path / "gkd_d2").mkdir()
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "tools").mkdir()
    (tmp_path / "gkd_d2" / "compat.py").write_text(PROBE_BENCHMARK + PROBE_TOOL)
    (tmp_path / "gkd_d2" / "public.py").write_text(
        "from detectron2.modeling import build_model\n"
        "from detectron2.utils import comm\n\n\n"
        "def f(cfg):\n    return build_model(cfg), comm.get_rank(), getattr(cfg, 'MODEL')\n"
    )
    (tmp_path / "benchmarks" / "probe.py").write_text(PROBE_BENCHMARK)
    (tmp_path / "tools" / "probe.py").write_text(PROBE_TOOL)
    (tmp_path / "train_net.py").write_text("def main(trainer):\n    return trainer._hooks\n")
    assert uses_outside_compat(tmp_path) == [
        "benchmarks/probe.py:1 detectron2._C (private module)",
        "benchmarks/probe.py:2 detectron2._C (private module)",
        "benchmarks/probe.py:4 detectron2.foo._bar (private module)",
        "benchmarks/probe.py:7 permute_to_N_HWA_K "
        "(not exported by detectron2.modeling.meta_arch.dense_detector)",
        "benchmarks/probe.py:8 assign_boxes_to_levels "
        "(not exported by detectron2.modeling.poolers)",
        "benchmarks/probe.py:10 _LOCAL_PROCESS_GROUP",
        "benchmarks/probe.py:14 _trainer (getattr)",
        "benchmarks/probe.py:15 _hooks (hasattr)",
        "benchmarks/probe.py:16 _trainer (setattr)",
        "benchmarks/probe.py:18 create_ddp_model (assigned in detectron2.engine.defaults)",
        "benchmarks/probe.py:19 LastLevelMaxPool "
        "(not exported by detectron2.modeling.backbone.fpn)",
        "tools/probe.py:2 _load_file",
        "tools/probe.py:6 _trainer",
        "train_net.py:2 _hooks",
    ]


def test_every_compat_entry_says_why_and_uses_something_non_public():
    """compat.py holds only its docstring, imports and entries (functions and classes); each
    entry has a docstring (its reason), and each entry and each method of one contains a use
    that the scan reports, so that public code does not pile up there."""
    tree = ast.parse(COMPAT.read_text())
    body = tree.body[1:] if ast.get_docstring(tree) else tree.body
    defs = [n for n in body if not isinstance(n, ast.Import | ast.ImportFrom)]
    assert defs and all(isinstance(d, ast.FunctionDef | ast.ClassDef) for d in defs)
    assert [d.name for d in defs if not ast.get_docstring(d)] == []
    lines = {int(u.split()[0].split(":")[1]) for u in uses_of(COMPAT)}
    spans = defs + [m for d in defs if isinstance(d, ast.ClassDef) for m in d.body]
    public = [
        d.name
        for d in spans
        if isinstance(d, ast.FunctionDef | ast.ClassDef)
        and not any(d.lineno <= line <= d.end_lineno for line in lines)
    ]
    assert public == [], f"compat.py entries that use only detectron2's public API: {public}"
