"""The API's OpenAPI schema is the truth: `schemathesis run --checks all` (every phase: examples,
coverage, fuzzing, stateful) against the real server finds 0 failures.

The server is uvicorn on a free loopback port over a tiny collection (the random small checkpoint,
the sample photos, their captions), with a token, so that the 401s and the security scheme are
checked too. Examples are bounded and the seed fixed, so a run is repeatable. Without schemathesis
the contract test skips, unless BTSEARCH_REQUIRE_SCHEMATHESIS=1 (as CI sets) makes that a failure.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from btsearch.collection import Collection
from btsearch.model.encoder import Encoder
from btsearch.search.query import MAX_WHERE_CHARS
from btsearch.serve.app import create_app
from btsearch.serve.schema import WHERE_PATTERNS
from tests.helpers import index_with_captions, serve_in_thread

TOKEN = "contract-token"
SCHEMATHESIS = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
REQUIRED = os.environ.get("BTSEARCH_REQUIRE_SCHEMATHESIS") == "1"
MISSING = "schemathesis is not installed (pip install -e '.[dev]')"


@pytest.fixture(scope="module")
def db(tmp_path_factory, random_checkpoint, photos, photo_captions):
    db = tmp_path_factory.mktemp("contract") / "db"
    index_with_captions(db, random_checkpoint, photos, photo_captions)
    return db


@pytest.fixture(scope="module")
def server_url(db, random_checkpoint):
    url, _, stop = serve_in_thread(create_app(db, encoder=Encoder.from_pretrained(str(random_checkpoint), precision="fp32"), token=TOKEN))
    yield url
    stop()


@pytest.mark.skipif(SCHEMATHESIS is None and not REQUIRED, reason=MISSING)
def test_schemathesis_finds_no_failure_with_every_check(server_url, tmp_path):
    assert SCHEMATHESIS is not None, f"BTSEARCH_REQUIRE_SCHEMATHESIS=1 but {MISSING}"
    command = [
        SCHEMATHESIS, "run", f"{server_url}/openapi.json", "--checks", "all", "--header", f"Authorization: Bearer {TOKEN}",
        "--max-examples", "6", "--seed", "17", "--workers", "1", "--generation-database", "none", "--no-color",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    summary = run.stdout[-4000:]
    assert run.returncode == 0, summary
    selected = re.search(r"Selected: (\d+)/(\d+)\s+Tested: (\d+)", run.stdout)
    assert selected and len(set(selected.groups())) == 1 and int(selected.group(1)) >= 8, summary  # every operation tested
    assert "No issues found" in run.stdout, summary
    assert "Stateful" in run.stdout and "Coverage" in run.stdout and "Fuzzing" in run.stdout, summary


@pytest.mark.parametrize("table", ["images", "texts"])
def test_every_where_the_schema_allows_applies_in_lancedb(db, table):
    """The API's `where` pattern promises that a predicate it matches can be applied: LanceDB
    (DataFusion) is the judge, over generated predicates and the README's examples."""
    store = Collection.open(db, load_model=False, read_only=True).store
    pattern = re.compile(WHERE_PATTERNS[table])

    @settings(max_examples=50, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.from_regex(pattern).filter(lambda where: len(where) <= MAX_WHERE_CHARS))
    def applies(where):
        store.filter_ids(table, where)  # raises FilterError when it cannot be applied

    applies()
    examples = {"images": ["width >= 1000 AND folder LIKE '%/2024%'", "taken >= '2024-06-01' AND camera LIKE 'Canon%'",
                           "NOT (id = 1 OR id = 2) and camera IS NULL", "path = 'it''s'", "size IN (1, 2)"],
                "texts": ["text LIKE '%cat%' AND id >= 3", "image_path IS NOT NULL"]}[table]
    assert all(pattern.search(where) for where in examples)
    assert len(store.filter_ids(table, examples[0])) <= store.count_rows(table)
    # What it refuses is what LanceDB would refuse or this table lacks.
    assert not pattern.search("lens = 1") and not pattern.search("width >= 'wide'") and not pattern.search("")


@pytest.fixture(scope="module")
def images_only_url(tmp_path_factory, random_checkpoint, photos):
    """A collection of images without texts (what a new user has first), served with no token."""
    db = tmp_path_factory.mktemp("images-only") / "db"
    Collection.create(db, model=str(random_checkpoint), precision="fp32").add_images([photos[0].parent])
    url, _, stop = serve_in_thread(create_app(db, encoder=Encoder.from_pretrained(str(random_checkpoint), precision="fp32")))
    yield url
    stop()


def test_a_table_with_nothing_to_search_is_an_answer_not_a_client_error(images_only_url, photos):
    """The collection's state is not the request's fault: a valid search of the empty texts table
    answers 200 with no hits and the note that says how to add texts (ST202 before)."""
    import httpx

    answers = [
        httpx.get(f"{images_only_url}/api/search", params={"image_id": 0}, timeout=60),
        httpx.post(f"{images_only_url}/api/search/image", content=photos[1].read_bytes(), headers={"Content-Type": "image/jpeg"}, timeout=60),
        httpx.get(f"{images_only_url}/api/search", params={"q": "a cat", "target": "texts"}, timeout=60),
    ]
    for answer in answers:
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["hits"] == [] and body["more"] is False and body["next"] is None
        assert any("no texts to search" in note and "add-texts" in note for note in body["notes"])
    assert httpx.get(f"{images_only_url}/api/search", params={"q": "a cat"}, timeout=60).json()["hits"]  # images still are


@pytest.mark.skipif(SCHEMATHESIS is None and not REQUIRED, reason=MISSING)
def test_schemathesis_finds_no_failure_on_a_collection_without_texts(images_only_url, tmp_path):
    """The issue's run: seed 7, 30 examples (two ST202 before)."""
    assert SCHEMATHESIS is not None, f"BTSEARCH_REQUIRE_SCHEMATHESIS=1 but {MISSING}"
    command = [
        SCHEMATHESIS, "run", f"{images_only_url}/openapi.json", "--checks", "all", "--max-examples", "30", "--seed", "7",
        "--workers", "1", "--generation-database", "none", "--no-color",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0 and "No issues found" in run.stdout, run.stdout[-4000:]


def test_what_other_seeds_found(images_only_url):
    """Seed 3 found a text the schema called valid and the server blank ("\x1c": blank to Python,
    not to ECMA or Rust regexes), and seed 2 a cursor that decodes to a number (a 500)."""
    import base64

    import httpx

    for params in ({"q": "\x1c"}, {"q": "a cat", "not": "\x1c"}, {"q": "\ufeff"}):
        assert httpx.get(f"{images_only_url}/api/search", params=params, timeout=60).status_code == 422, params
    assert httpx.get(f"{images_only_url}/api/explain", params={"q": "\x1c", "image_id": 0}, timeout=60).status_code == 422
    # The schema's own patterns: written out (a \s or \S means other characters to Python, ECMA
    # and Rust), and blank to them wherever Python's strip() leaves nothing.
    schema = httpx.get(f"{images_only_url}/openapi.json", timeout=60).json()
    parameters = schema["paths"]["/api/search"]["get"]["parameters"][0]["schema"]["properties"]  # one form-style object
    explain = {p["name"]: p["schema"] for p in schema["paths"]["/api/explain"]["get"]["parameters"]}
    for pattern in (parameters["q"]["pattern"], parameters["not"]["items"]["pattern"], explain["q"]["pattern"]):
        assert not re.search(r"\\[sSwWdD]", pattern), pattern
        blanks = [chr(c) for c in range(0x3001) if chr(c).isspace()] + ["\ufeff"]
        assert not any(re.search(pattern, blank) for blank in blanks), pattern
    number = base64.urlsafe_b64encode(b"5").decode().rstrip("=")
    assert httpx.get(f"{images_only_url}/api/search", params={"cursor": number}, timeout=60).status_code == 404

