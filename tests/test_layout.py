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


def test_the_public_api_is_a_short_list_with_adapters_and_errors_in_their_own_modules():
    import ppwrap
    import ppwrap.adapters
    import ppwrap.errors

    assert sorted(ppwrap.__all__) == [
        "PipelineHead",
        "Stage",
        "Watchdog",
        "__version__",
        "batch_generate_step",
        "generate",
        "generate_step",
        "load",
        "pipeline",
        "row_sampler",
        "stream_generate",
    ]
    assert "register_adapter" in ppwrap.adapters.__all__
    assert "Adapter" in ppwrap.adapters.__all__
    for module in (ppwrap, ppwrap.adapters, ppwrap.errors):
        for name in module.__all__:
            assert getattr(module, name) is not None, (module.__name__, name)
    for name in ppwrap.errors.__all__:
        error = getattr(ppwrap.errors, name)
        assert issubclass(error, Exception) and error.__doc__, name
        assert getattr(ppwrap, name) is error  # still importable from the package
    assert ppwrap.register_adapter is ppwrap.adapters.register_adapter
