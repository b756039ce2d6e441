"""The house: a core and three rooms (serve, bench, models); the core imports
nothing from the rooms, and no modules import each other in a circle."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "ppwrap"
ROOMS = ("serve", "bench", "models")
# The command line dispatches to every room; it is not the core.
ENTRY_POINTS = {"_cli", "__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(p for p in parts if p != "__init__") or "__init__"


def imports(path: Path) -> set[str]:
    """The ppwrap modules ``path`` imports, anywhere in it (lazy imports too)."""
    package = list(path.parent.relative_to(PACKAGE).parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = package[: len(package) - (node.level - 1)]
            target = [*base, *(node.module.split(".") if node.module else [])]
            names = [a.name for a in node.names] if node.module is None else [""]
            for name in names:
                found.add(".".join(p for p in [*target, name] if p))
    return {f for f in found if f}


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {i for i in imports(path) if i in modules} for name, path in modules.items()}


def test_the_core_imports_nothing_from_the_rooms():
    for name, targets in graph().items():
        if name.split(".")[0] in ROOMS or name in ENTRY_POINTS:
            continue
        assert not {t for t in targets if t.split(".")[0] in ROOMS}, name


def test_no_modules_import_each_other_in_a_circle():
    edges = graph()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        assert name not in path, " -> ".join([*path, name])
        if name in done:
            return
        for target in edges.get(name, ()):
            visit(target, [*path, name])
        done.add(name)

    for name in edges:
        visit(name, [])
