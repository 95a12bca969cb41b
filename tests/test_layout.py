"""The package's layers point one way: the command line over the library, the bench over the production path, and
no import cycle between modules (read from the source, nothing imported)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "kvzip_cli"


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, nodes=None) -> set[str]:
    """Every kvzip_cli module `path` imports, at any depth (deferred imports count: they run too), or in `nodes`."""
    here = _module(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found = set()
    for node in nodes if nodes is not None else ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            if base.startswith("kvzip_cli"):
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names if (PACKAGE.parent / f"{base}.{a.name}".replace(
                    ".", "/")).with_suffix(".py").exists())
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("kvzip_cli"))
    return found


GRAPH = {_module(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _top_level_imports(path: Path) -> set[str]:
    """What importing `path` imports at once (not the imports deferred into functions)."""
    return _imports(path, ast.parse(path.read_text()).body) - {_module(path)}


def test_no_production_module_imports_the_bench_or_the_command_line():
    for module, imported in GRAPH.items():
        if module.startswith(("kvzip_cli.bench", "kvzip_cli.cli")) or module == "kvzip_cli.__main__":
            continue
        assert not {m for m in imported if m.startswith(("kvzip_cli.bench", "kvzip_cli.cli"))}, module


def test_the_command_line_only_parses_calls_and_renders():
    """Each command module is small and defines no library types: reports and logic live in the library."""
    for path in (PACKAGE / "cli").glob("*.py"):
        tree = ast.parse(path.read_text())
        classes = [n.name for n in tree.body if isinstance(n, ast.ClassDef)]
        assert set(classes) <= {"OneLineErrors", "DefaultsToFidelity", "_Stream"}, (path.name, classes)
        assert len(path.read_text().splitlines()) < 220, path.name


def test_no_import_cycle_between_modules_at_import_time():
    graph = {_module(p): _top_level_imports(p) for p in PACKAGE.rglob("*.py") if p.name != "__main__.py"}
    assert "kvzip_cli.compress.write" in graph["kvzip_cli.compress.pipeline"]  # the graph is read, not empty
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for other in sorted(graph.get(module, ())):
            if other not in graph:
                continue
            assert state.get(other) != "open", " -> ".join([*trail, module, other])
            if other not in state:
                visit(other, [*trail, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
