"""`btsearch search` through a running server of the same collection (the warm path): the
same output as the cold path, which it falls back to, quietly, whenever the server cannot
answer for this collection, model, device and precision; and it imports no torch."""

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
import urllib.request

import pytest

from btsearch.indexers.layout import MANIFEST, SERVER_FILE
from btsearch.model.encoder import Encoder
from btsearch.serve import server_file
from btsearch.serve.app import create_app

from .helpers import free_port, index_with_captions, run, serve_in_thread
from .test_light_cli import imported_after

QUERY = "a close up of a tabby cat"


@pytest.fixture(scope="module")
def db(tmp_path_factory, random_checkpoint, photos, photo_captions):
    db = tmp_path_factory.mktemp("warm") / "db"
    index_with_captions(db, random_checkpoint, photos, photo_captions)
    return db


@pytest.fixture(scope="module")
def server(db, random_checkpoint):
    """The app served by uvicorn on a free loopback port, in a thread, announced in the
    collection as `serve` announces itself; it records the Authorization header it is sent."""
    app = create_app(db, encoder=Encoder.from_pretrained(str(random_checkpoint), precision="fp32"))
    seen_authorization: list[str | None] = []

    @app.middleware("http")
    async def record_authorization(request, call_next):
        seen_authorization.append(request.headers.get("authorization"))
        return await call_next(request)

    _, port, stop = serve_in_thread(app)
    url = server_file.local_url("127.0.0.1", port)
    server_file.write(db, url, "auto", "fp32")
    yield app.state.search_service, url, seen_authorization
    server_file.remove(db)
    stop()


def search(db, *args, ok=True):
    return run("search", *args, "--db", db, "--precision", "fp32", ok=ok)


SCORES = ("itc_score", "itm_score", "match")
FIGURE = re.compile(r"-?\d+\.\d+")


def same_up_to_rounding(warm: dict, cold: dict) -> None:
    """Two JSON answers alike, their scores to float rounding: the server re-ranks a batch's
    pairs together (search.batch), the cold path one query's alone."""
    def without_scores(answer: dict) -> dict:
        return {**answer, "hits": [{k: v for k, v in hit.items() if k not in SCORES} for hit in answer["hits"]]}

    assert without_scores(warm) == without_scores(cold)
    for w, c in zip(warm["hits"], cold["hits"]):
        for name in SCORES:
            assert (w[name] is None) == (c[name] is None) and (w[name] is None or abs(w[name] - c[name]) <= 1e-5), (name, w, c)


def same_printout(warm: str, cold: str) -> None:
    """Two printouts alike, each figure to one unit of its last digit: scores equal to float
    rounding may still round apart when they lie at a rounding boundary."""
    assert FIGURE.sub("#", warm) == FIGURE.sub("#", cold)
    for w, c in zip(FIGURE.findall(warm), FIGURE.findall(cold)):
        assert abs(float(w) - float(c)) <= 1.01 * 10 ** -len(w.split(".")[1]), (w, c)


def served(service, call, *args, **kwargs):
    """What `call(*args, **kwargs)` returned, and how many searches the server ran meanwhile."""
    before = service.figures.requests
    return call(*args, **kwargs), service.figures.requests - before


@pytest.mark.parametrize("args", [
    [QUERY],
    [QUERY, "-k", 3, "--offset", 2, "--candidates", 4],
    [QUERY, "--where", "width >= 400", "--min-match", 0.1],
    ["a space rocket", "--not", "the surface of the moon", "-k", 4],
    [QUERY, "--no-rerank", "-k", 20],
    [QUERY, "--offset", 30],  # a note naming --offset
    [QUERY, "--where", "width > 100000"],  # a note naming --where
    ["--image", "PHOTO", "-k", 4, "--candidates", 5],
    ["--image", "PHOTO", "--target", "images", "-k", 3],
], ids=lambda args: " ".join(map(str, args)))
def test_warm_answers_equal_cold_ones(db, server, photos, args):
    service, _, _ = server
    photo = next(p for p in photos if p.stem == "chelsea")
    args = [photo if a == "PHOTO" else a for a in args]
    for form in ([], ["--json"], ["--paths"]):
        warm, served_count = served(service, search, db, *args, *form)
        cold, cold_count = served(service, search, db, *args, *form, "--no-server")
        assert (served_count, cold_count) == (1, 0)
        if form == ["--json"]:
            same_up_to_rounding(json.loads(warm.stdout), json.loads(cold.stdout))  # scores to float rounding; the rest exactly
        else:
            same_printout(warm.output, cold.output)  # stdout and the notes on stderr


def test_a_stale_or_foreign_server_file_means_the_cold_path_quietly(db, server, tmp_path):
    service, url, _ = server
    cold = search(db, QUERY, "-k", 3, "--no-server").output
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        for record in (
            dict(pid=dead.pid),  # killed: the pid is gone
            dict(url=f"http://127.0.0.1:{free_port()}"),  # alive but not answering
            dict(model="another/model"),  # another collection's model
            dict(collection=str(tmp_path)),  # another folder
        ):
            write_record(db, url, **record)
            result, count = served(service, search, db, QUERY, "-k", 3)
            assert (result.output, count) == (cold, 0), record
        (db / SERVER_FILE).write_text("{not json")
        assert served(service, search, db, QUERY, "-k", 3)[0].output == cold
    finally:
        server_file.write(db, url, "auto", "fp32")


def test_a_url_now_served_for_another_collection_means_the_cold_path(db, server, random_checkpoint, tmp_path):
    """A stale file whose url a server of another collection (same model) now answers: its
    health names another creation, so the query stays here."""
    import shutil

    service, url, _ = server
    other = tmp_path / "other"
    shutil.copytree(db, other, ignore=shutil.ignore_patterns(SERVER_FILE))
    manifest = json.loads((other / MANIFEST).read_text())
    (other / MANIFEST).write_text(json.dumps({**manifest, "created": "2001-01-01T00:00:00+00:00"}))
    other_app = create_app(other, encoder=service.encoder)
    other_url, _, stop = serve_in_thread(other_app)
    try:
        cold = search(db, QUERY, "-k", 3, "--no-server").output
        write_record(db, other_url)  # this collection's identity, the other's url
        result, count = served(other_app.state.search_service, search, db, QUERY, "-k", 3)
        assert (result.output, count) == (cold, 0)
        assert served(service, search, db, QUERY, "-k", 3)[1] == 0
    finally:
        stop()
        server_file.write(db, url, "auto", "fp32")


def write_record(db, served_url, **changes):
    """The server file with some fields changed, as a stale or foreign one would hold them."""
    record = server_file.write(db, served_url, "auto", "fp32")
    fields = {**record.__dict__, **changes}
    (db / SERVER_FILE).write_text(json.dumps(fields))


def test_another_model_device_or_precision_or_explain_takes_the_cold_path(db, server, tmp_path):
    service, _, _ = server
    refused, count = served(service, search, db, QUERY, "--model", "another/model", ok=False)
    assert refused.exit_code == 1 and "was built with model" in refused.output and count == 0
    for args in (["--device", "cpu"], ["--explain", tmp_path / "maps"]):
        result, count = served(service, search, db, QUERY, "-k", 2, "--candidates", 2, *args)
        assert result.exit_code == 0 and count == 0, args
    result, count = served(service, run, "search", QUERY, "--db", db, "-k", 2, "--candidates", 2, "--precision", "auto")
    assert result.exit_code == 0 and count == 0
    os.environ["BTSEARCH_NO_SERVER"] = "1"
    try:
        assert served(service, search, db, QUERY, "-k", 2)[1] == 0
    finally:
        del os.environ["BTSEARCH_NO_SERVER"]


def test_the_warm_path_imports_no_torch_and_sends_the_token(db, server):
    service, url, seen_authorization = server
    server_file.write(db, url, "auto", "fp32", token="s3cret")
    try:
        code = (
            "from btsearch.cli.main import main\n"
            f"try:\n    main(['search', {QUERY!r}, '--db', {str(db)!r}, '--precision', 'fp32', '--paths', '-k', '2'])\n"
            "except SystemExit as stop:\n    assert stop.code == 0, stop.code"
        )
        loaded, count = served(service, imported_after, code)
        assert count == 1 and not loaded & {"torch", "transformers", "faiss", "lancedb"}
        assert seen_authorization[-1] == "Bearer s3cret"
    finally:
        server_file.write(db, url, "auto", "fp32")


def test_the_server_file_is_private_and_removed_by_its_writer_only(db, server, tmp_path):
    _, url, _ = server
    mode = stat.S_IMODE(os.stat(db / SERVER_FILE).st_mode)
    assert mode == 0o600
    record = server_file.read(db)
    assert record is not None and record.pid == os.getpid() and record.collection == str(db.resolve()) and record.token is None
    write_record(db, url, pid=1)  # another server announced itself since
    server_file.remove(db)
    assert (db / SERVER_FILE).exists()
    with server_file.announced(db, url, "auto", "fp32"):
        assert server_file.read(db).pid == os.getpid()
    assert not (db / SERVER_FILE).exists()
    server_file.write(db, url, "auto", "fp32")
    assert server_file.local_url("0.0.0.0", 80) == "http://127.0.0.1:80" and server_file.local_url("::", 80) == "http://[::1]:80"


def start_serve(db) -> tuple[subprocess.Popen, str]:
    """`btsearch serve` on a free loopback port, as a user starts it; its url once it answers."""
    port = free_port()
    child = subprocess.Popen(
        [sys.executable, "-m", "btsearch.cli.main", "serve", "--db", str(db), "--port", str(port), "--precision", "fp32"],
        stderr=subprocess.DEVNULL,
    )
    for _ in range(600):
        record = server_file.read(db)
        if record is not None and record.pid == child.pid and record.url.endswith(f":{port}"):
            try:
                with urllib.request.urlopen(record.url + "/api/health", timeout=1):
                    return child, record.url
            except OSError:
                pass
        assert child.poll() is None, "serve exited"
        time.sleep(0.1)
    child.kill()
    raise AssertionError("serve did not answer")


def test_serve_announces_itself_and_a_killed_one_leaves_a_stale_file(db, server):
    """The real command: its file while it runs, gone after SIGTERM; after SIGKILL the file
    stays, and search takes the cold path quietly."""
    before = (db / SERVER_FILE).read_text()
    try:
        child, _ = start_serve(db)
        assert stat.S_IMODE(os.stat(db / SERVER_FILE).st_mode) == 0o600
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=30)
        assert not (db / SERVER_FILE).exists()
        child, _ = start_serve(db)
        child.kill()
        child.wait(timeout=30)
        assert server_file.read(db).pid == child.pid  # stale
        warm = search(db, QUERY, "-k", 3, "--paths")
        assert warm.output == search(db, QUERY, "-k", 3, "--paths", "--no-server").output
    finally:
        (db / SERVER_FILE).write_text(before)
