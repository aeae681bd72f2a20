"""The package's architecture, checked: layers import only downwards, no import circle, a small top level."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pytest_quantgate"

# bottom to top; a module may import its own layer and the layers below it, never one above
LAYERS = ("base", "io", "engine", "producers", "analysis", "runner", "reporting", "frontends")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 2 and parts[1] in LAYERS else 0


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Return every package module each module imports: lazy, conditional and TYPE_CHECKING imports included."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                prefix = ".".join(base + ([node.module] if node.module else []))
                targets = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
            for target in targets:
                # a package's own __init__ (its docstring) is not a dependency of the modules inside it
                if target in modules and target != module and not module.startswith(target + "."):
                    graph[module].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Return the strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_circle_counting_lazy_and_type_only_imports() -> None:
    assert _cycles(_imports(_modules())) == []


def test_every_layer_imports_only_downwards() -> None:
    upward = [f"{m} -> {t}" for m, targets in _imports(_modules()).items() for t in sorted(targets)
              if _layer(t) > _layer(m)]
    assert upward == []


def test_the_top_level_keeps_the_base_modules_only() -> None:
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert top == ["errors", "fileio", "records", "settings", "system"]
    layers = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert layers == sorted(LAYERS[1:])


def test_each_layer_says_what_it_owns_and_may_import() -> None:
    for layer in LAYERS[1:]:
        doc = ast.get_docstring(ast.parse((PACKAGE / layer / "__init__.py").read_text("utf-8"))) or ""
        assert "May import" in doc or "may import" in doc, layer


def test_one_module_dequantises_weights() -> None:
    """Only qgraph turns int8 weights back into floats: (q - zero_point) * scale is written once."""
    pattern = "zero_point"
    writers = sorted(p.relative_to(PACKAGE).as_posix() for p in PACKAGE.rglob("*.py")
                     if "def dequantize" in p.read_text("utf-8") or "def dequantise" in p.read_text("utf-8"))
    assert writers in ([], ["analysis/qgraph.py"]), writers
    users = sorted(p.relative_to(PACKAGE).as_posix() for p in (PACKAGE / "analysis").glob("*.py")
                   if pattern in p.read_text("utf-8"))
    assert users == ["analysis/qgraph.py"], users
