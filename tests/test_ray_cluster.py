"""Both Ray engines joining a cluster by address: a head started as users start one (`ray start
--head`, token authentication on, as Ray now starts it), `index --engine ray --address` and
`serve --engine ray --address` on it, with the local engine's rows and answers, and an image
indexed on the cluster while it serves found within seconds; the server's SIGTERM deletes its
deployments and leaves the cluster running. An address where nothing
listens, or a cluster whose token the driver lacks, is one line."""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

if not os.environ.get("BTSEARCH_REQUIRE_RAY"):  # CI installs the extra: there the tests must run
    pytest.importorskip("ray.serve", reason="pip install 'btsearch[ray]'")

from btsearch.collection import Collection  # noqa: E402
from btsearch.errors import RayClusterError  # noqa: E402
from tests.helpers import free_port, kill_session, process_title, run, session_processes  # noqa: E402

STARTUP_S = 240
RAY = Path(sys.executable).parent / "ray"


def session_titles(session: int) -> list[str]:
    """The command lines of a session's live processes."""
    return [process_title(pid) for pid in session_processes(session)]


def wait_for_port(port: int, process: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + STARTUP_S
    while True:
        assert process.poll() is None, f"{what} exited with {process.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"{what} did not listen on {port}"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A Ray head in a session of its own, with token authentication (a token of the test's, and a
    HOME of its own, nothing of the user's): (address, env for the drivers that join it, its session)."""
    home = tmp_path_factory.mktemp("ray-home")
    port = free_port()
    token = secrets.token_hex(32)
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--port={port}", "--num-cpus=4", "--include-dashboard=false", "--disable-usage-stats"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_for_port(port, head, "ray start --head")
        yield f"127.0.0.1:{port}", env, head.pid
    finally:
        kill_session(head.pid)
        head.wait()
        # `ray start` names its cluster in /tmp/ray for `ray.init()` to find; `ray stop` would remove it.
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def btsearch(*args, env, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "btsearch.cli.main", *map(str, args)], env=env, **popen)


def test_index_and_serve_join_a_running_cluster_and_leave_it_running(tmp_path, cluster, photos, random_checkpoint):
    address, env, head = cluster
    album = tmp_path / "album"
    album.mkdir()
    for photo in photos[:4]:
        (album / photo.name).write_bytes(photo.read_bytes())
    common = ("--model", random_checkpoint, "--precision", "fp32", "--batch-size", 4, "--json", "-q")

    def index_on_the_cluster() -> dict:
        indexing = btsearch("index", album, "--db", tmp_path / "ray", *common, "--engine", "ray", "--address", address, "--workers", 1,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = indexing.communicate(timeout=STARTUP_S)
        assert indexing.returncode == 0, err
        return json.loads(next(line for line in out.splitlines() if line.startswith('{"added"')))

    assert index_on_the_cluster()["added"] == 4
    run("index", album, "--db", tmp_path / "local", *common)

    def vectors(db):
        collection = Collection.open(db, load_model=False, read_only=True)
        rows = collection.store.image_files()
        ids, found = collection.store.get_embeddings("images", [row["id"] for row in rows.values()])
        by_id = dict(zip(ids.tolist(), found))
        return {row["path"]: by_id[row["id"]] for row in rows.values()}

    on_cluster, local = vectors(tmp_path / "ray"), vectors(tmp_path / "local")
    assert on_cluster.keys() == local.keys()
    for path in local:
        np.testing.assert_allclose(on_cluster[path], local[path], atol=1e-5)

    port = free_port()
    server = btsearch("serve", "--db", tmp_path / "ray", "--engine", "ray", "--address", address, "--replicas", 1, "--precision", "fp32",
                      "--port", port, "--no-auth", env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + STARTUP_S
        while True:
            assert server.poll() is None, f"serve exited with {server.returncode}"
            try:
                if httpx.get(f"{url}/api/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "serve --engine ray --address did not start"
            time.sleep(0.5)
        assert any("ServeReplica" in title and "Rerank" in title for title in session_titles(head)), "the replicas run on the cluster"
        served = httpx.get(f"{url}/api/search", params={"q": "a cat", "k": 5}, timeout=120).json()["hits"]
        alone = json.loads(run("search", "a cat", "--db", tmp_path / "ray", "-k", 5, "--precision", "fp32", "--no-server", "--json").stdout)["hits"]
        assert {hit["id"]: hit["itm_score"] for hit in served} == pytest.approx({hit["id"]: hit["itm_score"] for hit in alone}, abs=1e-4)
        assert httpx.get(f"{url}/api/metrics", timeout=10).json()["engine"]["name"] == "ray"
        # Indexed on the cluster while it serves: searchable within seconds of the run's end.
        (album / photos[4].name).write_bytes(photos[4].read_bytes())
        assert index_on_the_cluster()["added"] == 1
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/api/health", timeout=10).json()["images"] != 5 or not any(
            hit["path"].endswith(photos[4].name) for hit in httpx.get(f"{url}/api/search", params={"q": "a cat", "k": 5}, timeout=120).json()["hits"]
        ):
            assert time.monotonic() < deadline, "the image indexed on the cluster was not searchable within 10 s"
            time.sleep(0.5)
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=90)
    finally:
        kill_session(server.pid)
    deadline = time.monotonic() + 30
    while any("ServeReplica" in title and "btsearch" in title for title in session_titles(head)):
        assert time.monotonic() < deadline, "the server's replicas outlived it on the cluster"
        time.sleep(0.5)
    assert any("gcs_server" in title for title in session_titles(head)), "the cluster it joined still runs"


def test_without_an_address_a_ray_of_its_own_starts_beside_a_running_cluster(tmp_path, cluster, photos, random_checkpoint):
    """`ray start` leaves its address where `ray.init()` finds it: the documented "without
    --address a local Ray starts" must hold all the same (Ray refused the engine's num_cpus)."""
    _, env, head = cluster
    album = tmp_path / "album"
    album.mkdir()
    for photo in photos[:2]:
        (album / photo.name).write_bytes(photo.read_bytes())
    before = session_titles(head)
    alone = {key: value for key, value in env.items() if not key.startswith("RAY_AUTH")}  # no token: it must not join
    indexing = btsearch("index", album, "--db", tmp_path / "db", "--model", random_checkpoint, "--engine", "ray", "--workers", 1, "--json", "-q",
                        env=alone, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = indexing.communicate(timeout=STARTUP_S)
    assert indexing.returncode == 0, err
    assert json.loads(next(line for line in out.splitlines() if line.startswith('{"added"')))["added"] == 2
    assert not any("MapWorker" in title for title in session_titles(head) if title not in before)  # none of its actors ran on the cluster


def test_an_address_where_nothing_listens_is_one_line(tmp_path, photos, random_checkpoint):
    run("index", photos[0].parent, "--db", tmp_path / "db", "--model", random_checkpoint, "--precision", "fp32", "-q")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    with socket.socket() as closed:  # a port bound and not listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
        line = f"btsearch: error: cannot join the Ray cluster at {address}: nothing accepts a connection there (Connection refused)"
        indexing = run("index", photos[0].parent, "--db", tmp_path / "db", "--engine", "ray", "--address", address, ok=False)
        assert indexing.exit_code != 0 and [text for text in indexing.output.splitlines() if text.startswith("btsearch: error:")] == [line], indexing.output
        # serve in a process of its own: it turns Ray's auto-connect off for the process it runs in.
        serving = btsearch("serve", "--db", tmp_path / "db", "--no-auth", "--port", free_port(), "--engine", "ray", "--address", address,
                           env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output, _ = serving.communicate(timeout=STARTUP_S)
    assert serving.returncode != 0 and [text for text in output.splitlines() if text.startswith("btsearch: error:")] == [line], output
    assert "Traceback" not in indexing.output + output


def test_a_cluster_that_wants_its_token_says_how_to_send_it():
    """Ray's refusal comes wrapped twice (ConnectionError from RuntimeError from its
    AuthenticationError): the line names the fix, whichever layer says it."""
    try:
        try:
            try:
                raise RuntimeError("RPC error: InvalidAuthToken: Authentication token is missing or incorrect")
            except RuntimeError as refusal:
                raise RuntimeError("Failed to connect to GCS") from refusal
        except RuntimeError as inner:
            raise ConnectionError("Failed to connect to Ray cluster at 10.0.0.5:6379") from inner
    except ConnectionError as error:
        line = str(RayClusterError("10.0.0.5:6379", error))
    assert line.startswith("cannot join the Ray cluster at 10.0.0.5:6379: the cluster wants its token: set RAY_AUTH_MODE=token")
    assert "\n" not in line
    plain = str(RayClusterError("head:6379", ConnectionError("Traceback (most recent call last):\n  ...\nThe GCS at head:6379 did not answer in 60 s\n")))
    assert plain == "cannot join the Ray cluster at head:6379: The GCS at head:6379 did not answer in 60 s"  # its last line
