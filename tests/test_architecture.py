"""The architecture, checked from the source: no import circle among btsearch's modules (lazy and
type-only imports included), storage and model code apart, modules small and saying what they own."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Source folder -> package, as pyproject.toml's package-dir maps them.
PACKAGES = {"btsearch": "btsearch", "indexers": "btsearch.indexers", "cli": "btsearch.cli"}
MAX_LINES = 400


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imports_of(name: str, known: dict[str, Path]) -> set[str]:
    """Every btsearch module `name` imports anywhere in its source (top level, in functions, under
    TYPE_CHECKING). A name taken from a package's re-exports (`from .indexers import MetadataStore`)
    counts as importing every module that package's __init__ names."""
    path = known[name]
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    found.add(f"{base}.{alias.name}")
                elif base in PACKAGES.values() and base != name:
                    found |= imports_of(base, known)  # a re-exported name: whatever the package imports
                elif base in known:
                    found.add(base)
    return found - {name} - set(PACKAGES.values())


def graph() -> dict[str, set[str]]:
    known = modules()
    # Packages' __init__ only re-export (lazily); every module imports its package anyway.
    return {name: imports_of(name, known) for name in known if name not in PACKAGES.values()}


def test_no_import_circle():
    edges = graph()
    state: dict[str, str] = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                pytest.fail("import circle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_storage_knows_nothing_of_models_search_or_the_cli():
    for name, targets in graph().items():
        if name.startswith("btsearch.indexers."):
            outside = {t for t in targets if not t.startswith("btsearch.indexers.")}
            assert not outside, f"{name} (storage) imports {sorted(outside)}"


def test_model_code_knows_nothing_of_storage_or_the_cli():
    for name in ("btsearch.model", "btsearch.managertower", "btsearch.encoder", "btsearch.pixels", "btsearch.device"):
        reached = {t for t in graph()[name] if t.startswith(("btsearch.indexers", "btsearch.cli", "btsearch.collection", "btsearch.search", "btsearch.ingest"))}
        assert not reached, f"{name} imports {sorted(reached)}"


def test_only_the_cli_imports_the_cli():
    for name, targets in graph().items():
        if not name.startswith("btsearch.cli."):
            assert not {t for t in targets if t.startswith("btsearch.cli")}, f"{name} imports the CLI"


@pytest.mark.parametrize("name", sorted(modules()))
def test_modules_are_small_and_open_with_what_they_own(name):
    path = modules()[name]
    source = path.read_text(encoding="utf-8")
    assert len(source.splitlines()) <= MAX_LINES, f"{path.relative_to(ROOT)} has over {MAX_LINES} lines"
    docstring = ast.get_docstring(ast.parse(source))
    assert docstring and source.lstrip().startswith('"""'), f"{path.relative_to(ROOT)} does not open with what it owns"
