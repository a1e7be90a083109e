"""The package's module graph: no import cycles (counting imports inside functions, which would
otherwise hide one), and no module too long to read."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "sharedllm_ops"
PACKAGE = PACKAGE_DIR.name
MAX_LINES = 450


def module_files() -> dict[str, Path]:
    """``dotted name -> file`` of every module of the package (a package is its ``__init__.py``)."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(PACKAGE_DIR).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_names(module: str, path: Path, is_package: bool) -> set[str]:
    """Absolute dotted names imported anywhere in the file (also inside functions), except under
    ``if TYPE_CHECKING:``; ``from X import y`` yields ``X.y`` and ``X`` (y may be a module)."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for n in ast.walk(node))
    names = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """``module -> modules whose import it runs``. Importing ``a.b.c`` also runs the ``__init__`` of
    ``a`` and ``a.b``, unless they are ancestors of the importer (which are already being imported)."""
    modules = module_files()
    graph = {}
    for module, path in modules.items():
        ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
        edges = set()
        for name in imported_names(module, path, path.name == "__init__.py"):
            if name not in modules:
                continue  # outside the package, or a name that is not a module
            parts = name.split(".")
            edges.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if p not in ancestors)
        graph[module] = edges - {module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_imports_without_a_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_sees_function_local_imports_and_package_inits(tmp_path, monkeypatch):
    """The checker itself: a cycle closed only by an import inside a function, through a package
    ``__init__``, is found; the same files without that import have none."""
    root = tmp_path / PACKAGE
    (root / "ops").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "ops" / "__init__.py").write_text("from .public import run\n")
    (root / "ops" / "public.py").write_text("from ..kernels import fast\n")
    (root / "kernels.py").write_text("def fast():\n    from .ops.public import run\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE_DIR", root)
    cycle = find_cycle(import_graph())
    assert cycle is not None and set(cycle) == {f"{PACKAGE}.kernels", f"{PACKAGE}.ops", f"{PACKAGE}.ops.public"}
    (root / "kernels.py").write_text("def fast():\n    import torch\n")
    assert find_cycle(import_graph()) is None


@pytest.mark.parametrize("module", sorted(module_files()))
def test_no_module_is_over_the_line_limit(module):
    lines = module_files()[module].read_text().count("\n")
    assert lines <= MAX_LINES, f"{module} has {lines} lines (at most {MAX_LINES}): split it by job"
