"""The architecture, checked from the source: the stages' layers (import-linter's contracts in
pyproject.toml, and proof that they bind this tree), no import circle among btsearch's modules
(lazy and type-only imports included), modules small and saying what they own."""

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Source folder -> package, as pyproject.toml's package-dir maps them.
FOLDERS = {"btsearch": "btsearch", "indexers": "btsearch.indexers", "cli": "btsearch.cli"}
MAX_LINES = 400
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def modules() -> dict[str, Path]:
    """Every module of the installed package, by its dotted name (packages by their own)."""
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = [package, *path.relative_to(ROOT / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(name: str, known: dict[str, Path]) -> set[str]:
    """Every btsearch module `name` imports anywhere in its source (top level, in functions, under
    TYPE_CHECKING). `from package import name` counts the module `package.name` where there is one,
    else the package."""
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
                elif base in known:
                    found.add(base)
    return found - {name}


def test_no_import_circle():
    known = modules()
    # A package's __init__ re-exports lazily, and every module imports its package anyway.
    packages = {name for name, path in known.items() if path.stem == "__init__"}
    edges = {name: imports_of(name, known) - packages for name in known if name not in packages}
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


@pytest.mark.parametrize("name", sorted(modules()))
def test_modules_are_small_and_open_with_what_they_own(name):
    path = modules()[name]
    source = path.read_text(encoding="utf-8")
    assert len(source.splitlines()) <= MAX_LINES, f"{path.relative_to(ROOT)} has over {MAX_LINES} lines"
    docstring = ast.get_docstring(ast.parse(source))
    assert docstring and source.lstrip().startswith('"""'), f"{path.relative_to(ROOT)} does not open with what it owns"


def test_every_stage_package_says_what_it_may_import():
    for init in sorted((ROOT / "btsearch").glob("*/__init__.py")):
        docstring = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        assert "May import:" in docstring, f"{init.relative_to(ROOT)} does not say what its stage may import"


def lint_imports(tmp_path: Path, plant: tuple[str, str] | None = None) -> subprocess.CompletedProcess:
    """import-linter over a copy of the package laid out as installed (indexers/ and cli/ inside
    btsearch/, as .ci/package-tree links them), with one import line `plant`ed in one file."""
    tree = tmp_path / "tree"
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "btsearch", tree / "btsearch", ignore=skip)
    shutil.copytree(ROOT / "indexers", tree / "btsearch" / "indexers", ignore=skip)
    shutil.copytree(ROOT / "cli", tree / "btsearch" / "cli", ignore=skip)
    if plant is not None:
        file, line = plant
        with (tree / file).open("a", encoding="utf-8") as out:
            out.write(f"\n{line}\n")
    env = {**os.environ, "PYTHONPATH": str(tree)}  # before the editable install, which maps btsearch/ alone
    return subprocess.run(
        [str(LINT_IMPORTS), str(ROOT / "pyproject.toml"), "--no-cache", "--no-logo"], cwd=tree, env=env, capture_output=True, text=True,
    )


def test_the_layers_hold(tmp_path):
    result = lint_imports(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 3 kept, 0 broken." in result.stdout


# One planted import per rule the contracts state; each must break its contract, which proves the
# linter sees the whole installed tree (storage and the CLI live outside btsearch/ in the repository).
@pytest.mark.parametrize("plant, broken", [
    (("btsearch/model/encoder.py", "from ..indexers import layout"), "btsearch.model is not allowed to import btsearch.indexers"),
    (("btsearch/indexers/layout.py", "from ..model import device"), "btsearch.indexers is not allowed to import btsearch.model"),
    (("btsearch/indexers/layout.py", "import torch"), "btsearch.indexers is not allowed to import torch"),
    (("btsearch/indexers/atomic.py", "from ..media import images"), "btsearch.indexers is not allowed to import btsearch.media"),
    (("btsearch/search/recall.py", "from ..ingest import sync"), "btsearch.search is not allowed to import btsearch.ingest"),
    (("btsearch/ingest/pipeline.py", "from ..serve import cursor"), "btsearch.ingest is not allowed to import btsearch.serve"),
    (("btsearch/media/images.py", "from ..model import tensors"), "btsearch.media is not allowed to import btsearch.model"),
    (("btsearch/serve/service.py", "from ..evaluate import calibration"), "btsearch.serve is not allowed to import btsearch.evaluate"),
    (("btsearch/search/ranking.py", "from .. import collection"), "btsearch.search is not allowed to import btsearch.collection"),
    (("btsearch/collection.py", "from .cli import options"), "btsearch.collection is not allowed to import btsearch.cli"),
    (("btsearch/cli/options.py", "import torch"), "btsearch.cli.options is not allowed to import torch"),
])
def test_a_broken_rule_breaks_its_contract(tmp_path, plant, broken):
    result = lint_imports(tmp_path, plant)
    assert result.returncode == 1 and broken in result.stdout, result.stdout + result.stderr


@pytest.mark.parametrize("package", ["btsearch", "btsearch.indexers"])
def test_every_name_a_package_exports_imports(package):
    """The lazy re-exports (PEP 562) name their modules as strings, which no import checker reads."""
    import importlib

    module = importlib.import_module(package)
    for name in module.__all__:
        assert getattr(module, name) is not None, f"{package}.{name}"
