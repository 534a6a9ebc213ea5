"""The command line stays light: parsing arguments and `--help` load no torch, transformers,
FAISS or LanceDB, and `info` (storage only) loads no torch. Checked by module, not by clock:
`btsearch --help` answers in tenths of a second only while these stay out (docs/development.md, Tests)."""

import json
import subprocess
import sys

import pytest

from tests.helpers import run

HEAVY = ("torch", "transformers", "faiss", "lancedb", "fastapi", "uvicorn", "matplotlib")
COMMANDS = [[], ["index"], ["add-texts"], ["search"], ["eval"], ["eval", "flickr30k"], ["eval", "coco"], ["eval", "captions"], ["convert"], ["serve"], ["export"], ["info"], ["check"], ["demo"]]


def imported_after(code: str) -> set[str]:
    """The top-level modules a fresh interpreter holds after running `code`."""
    script = f"import sys\n{code}\nimport json; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return set(json.loads(done.stdout.strip().splitlines()[-1]))


def test_importing_the_cli_loads_no_heavy_module():
    assert not imported_after("import btsearch.cli.main") & set(HEAVY)


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "btsearch")
def test_help_loads_no_heavy_module(command):
    code = f"from btsearch.cli.main import main\ntry:\n    main({command + ['--help']!r})\nexcept SystemExit as stop:\n    assert stop.code == 0"
    assert not imported_after(code) & set(HEAVY)


def test_info_opens_storage_without_torch(tmp_path, trained_checkpoint, photos):
    db = tmp_path / "db"
    run("index", photos[0], photos[1], "--db", db, "--model", trained_checkpoint, "-q")
    loaded = imported_after(f"from btsearch.cli.main import main\ntry:\n    main(['info', '--db', {str(db)!r}])\nexcept SystemExit as stop:\n    assert stop.code == 0")
    assert "lancedb" in loaded  # it did open the collection
    assert not loaded & {"torch", "transformers"}
