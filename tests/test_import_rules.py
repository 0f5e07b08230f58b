"""The import rules of the house, read from the sources (nothing is imported): the runtime stays slim, plugins know
no command line, and no two modules import each other, directly or around a loop.

Every import statement counts, those inside functions too: a lazy import still ties two modules together.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def package_dirs() -> dict[str, Path]:
    """pyproject's package-dir: the installed package name of each top-level source folder."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return {name: ROOT / folder for name, folder in pyproject["tool"]["setuptools"]["package-dir"].items()}


def modules() -> dict[str, Path]:
    """Every source module by its dotted name (a package's __init__.py under the package's name)."""
    found = {}
    for package, folder in package_dirs().items():
        for path in folder.rglob("*.py"):
            if ".venv" in path.parts or "build" in path.relative_to(ROOT).parts[:1]:
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules `name` imports: absolute names; `from pkg import sub` names the submodule when it is one."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def _violations(prefix: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(f"{module} imports {target}" for module, targets in import_graph().items()
                  if module == prefix or module.startswith(prefix + ".")
                  for target in targets if any(target == f or target.startswith(f + ".") for f in forbidden))


def test_the_runtime_imports_neither_torch_nor_the_export_side():
    assert _violations("moetrt.runtime", ("torch", "transformers", "moetrt.export")) == []


def test_plugins_know_no_command_line():
    assert _violations("moetrt.plugins", ("moetrt.cli", "typer", "moetrt.bench")) == []


def test_the_core_imports_no_backend_or_torch():
    core = [m for m in import_graph() if m.startswith("moetrt.") and m.count(".") == 1
            and m not in ("moetrt.cli", "moetrt.export", "moetrt.runtime", "moetrt.plugins", "moetrt.bench")]
    graph = import_graph()
    bad = sorted(f"{m} imports {t}" for m in core for t in graph[m]
                 if t.split(".")[0] in ("torch", "tensorrt", "onnxruntime", "onnx", "onnx_ir"))
    assert bad == []


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm), among moetrt's modules."""
    edges = {m: sorted(t for t in targets if t in graph and t != m) for m, targets in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_between_modules():
    graph = import_graph()
    # A package's __init__ that re-exports its own submodules is not a cycle between two ideas.
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    assert cycles(graph) == []


def test_the_rules_see_real_imports():
    """The checker itself: it finds the runtime's import of the session protocol and the export's of torch."""
    graph = import_graph()
    assert "moetrt.runtime.session" in graph["moetrt.runtime.generate"]
    assert "torch" in graph["moetrt.export.model"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
