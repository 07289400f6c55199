"""The package's import graph has no circle.

Every import of a gkd_d2 module by another is an edge: at the top of a module, inside a
function (run later, but a circle all the same), or under ``TYPE_CHECKING``. Importing
``gkd_d2.a.b`` also runs the ``__init__`` of ``gkd_d2.a``, so it is an edge to that package too,
unless the importer lives in it (a package's own modules are imported while it initialises).
"""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def package_modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, whether it is a package's ``__init__``), for every module
    of the package at ``root``."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def imported_names(module: str, is_package: bool, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The dotted names an import statement may load: each module path, and for ``from M
    import n`` both ``M`` and ``M.n`` (``n`` may be a submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    return [target] + [f"{target}.{a.name}" for a in node.names]


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, anywhere in its file."""
    modules = package_modules(root)
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, (path, is_package) in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            for name in imported_names(module, is_package, node):
                parts = name.split(".")
                for i in range(1, len(parts) + 1):
                    target = ".".join(parts[:i])
                    # the importer's own packages are initialising already: no edge
                    if target in modules and not f"{module}.".startswith(f"{target}."):
                        graph[module].add(target)
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str]:
    """One circle of ``graph`` as its path (first module repeated at the end), or []."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = "done"
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_no_import_circle_among_gkd_d2_modules():
    graph = import_graph(REPO / "gkd_d2")
    assert "gkd_d2.engine.hooks" in graph and graph["gkd_d2.engine.hooks"]
    circle = find_circle(graph)
    assert not circle, "import circle: " + " -> ".join(circle)


def test_the_check_finds_a_circle_through_a_function_local_import(tmp_path):
    """A function-local import back, and an import of a submodule whose package imports the
    importer, are both circles; a package importing its own modules is none."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import a\n")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from .a import g\n    return g\n")
    (pkg / "sub" / "__init__.py").write_text("from .c import h\n")
    (pkg / "sub" / "c.py").write_text("def h():\n    return 1\n")
    graph = import_graph(pkg)
    assert graph["pkg.b"] == {"pkg.a"} and graph["pkg.sub"] == {"pkg.sub.c"}
    assert find_circle(graph) == ["pkg.a", "pkg.b", "pkg.a"]

    (pkg / "b.py").write_text("def f():\n    return 1\n")
    (pkg / "sub" / "c.py").write_text("def h():\n    from ..a import f\n    return f\n")
    (pkg / "a.py").write_text("from .b import f\n\n\ndef g():\n    from .sub.c import h\n")
    assert find_circle(import_graph(pkg)) == ["pkg.a", "pkg.sub", "pkg.sub.c", "pkg.a"]
    (pkg / "sub" / "c.py").write_text("def h():\n    return 1\n")
    assert find_circle(import_graph(pkg)) == []
