"""`serve --engine ray`: the real command, on a local Ray it starts itself, with two `Rerank`
replicas. Its answers equal the local server's (ids, order, scores to 1e-4) for every kind of
search; a `Rerank` or `Recall` replica SIGKILLed under concurrent searches fails none of them, and
Ray starts it again; images indexed while it serves are found; the token rules and the warm CLI
hold; the cluster gone is a 503 at once; SIGTERM leaves no process and no server file behind.

One server for the module (starting Ray and three replicas costs tens of seconds on 2 cores); the
tests that break it (the cluster gone, the stop) run last, in file order.
"""

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from PIL import Image

if not os.environ.get("BTSEARCH_REQUIRE_RAY"):  # CI installs the extra: there the tests must run
    pytest.importorskip("ray.serve", reason="pip install 'btsearch[ray]'")

from btsearch.model.encoder import Encoder  # noqa: E402
from btsearch.serve import server_file  # noqa: E402
from btsearch.serve.app import create_app  # noqa: E402
from tests.helpers import free_port, index_with_captions, kill_session, process_title, run, serve_in_thread, session_processes  # noqa: E402

TOKEN = "ray-serve-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STARTUP_S = 240


@pytest.fixture(scope="module")
def db(tmp_path_factory, random_checkpoint, photos, photo_captions):
    """The sample photos and their captions, and a video of three of them (its frames as rows)."""
    from tests.test_video import SCENE_S, SCENES, still, write_video

    db = tmp_path_factory.mktemp("ray-serve") / "db"
    index_with_captions(db, random_checkpoint, photos, photo_captions)  # equal answers need no trained model
    videos = db.parent / "videos"
    videos.mkdir()
    by_name = {photo.stem: photo for photo in photos}
    write_video(videos / "scenes.mp4", [(still(by_name[scene]), SCENE_S) for scene in SCENES])
    run("index", videos, "--db", db, "--precision", "fp32", "-q")
    return db


@pytest.fixture(scope="module")
def ray_server(db):
    """`btsearch serve --engine ray` in a process of its own: (url, process)."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "BTSEARCH_TOKEN": TOKEN}
    env.pop("RAY_ADDRESS", None)
    log = open(db.parent / "serve.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "btsearch.cli.main", "serve", "--db", str(db), "--engine", "ray", "--replicas", "2", "--precision", "fp32", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_S
    while True:
        assert process.poll() is None, (db.parent / "serve.log").read_text()
        try:
            if httpx.get(f"{url}/api/health", headers=AUTH, timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "serve --engine ray did not start: " + (db.parent / "serve.log").read_text()
        time.sleep(0.5)
    yield url, process
    kill_session(process.pid)
    process.wait()


@pytest.fixture(scope="module")
def local_url(db, random_checkpoint, ray_server):
    """The local server on the same collection (after the Ray one is up: the CPU is shared)."""
    url, _, stop = serve_in_thread(create_app(db, encoder=Encoder.from_pretrained(str(random_checkpoint), precision="fp32"), token=TOKEN))
    yield url
    stop()


def replicas(session: int, deployment: str) -> list[int]:
    """The pids of a deployment's replicas (their process titles name it)."""
    titles = {pid: process_title(pid) for pid in session_processes(session)}
    return [pid for pid, title in titles.items() if title.startswith("ray::ServeReplica:") and title.split()[0].endswith(f":{deployment}")]


def get(url, path, **params):
    answer = httpx.get(f"{url}{path}", params=params, headers=AUTH, timeout=120)
    return answer.status_code, answer.json() if answer.headers.get("content-type", "").startswith("application/json") else answer.content


def same_answer(ray_answer: dict, local_answer: dict) -> None:
    """Equal to the local server's: every field, scores to 1e-4. The two compute a score in
    different batches, so two hits closer than that may come out in either order (or either make
    the cut) on another CPU: position by position the ranking score (match for a re-ranked hit,
    else ITC) must agree, and a hit both show must agree in every field but its rank."""
    scores = ("itc_score", "itm_score", "match")
    assert {k: v for k, v in ray_answer.items() if k not in ("hits", "next")} == {k: v for k, v in local_answer.items() if k not in ("hits", "next")}
    assert (ray_answer["next"] is None) == (local_answer["next"] is None)
    assert len(ray_answer["hits"]) == len(local_answer["hits"])
    ranking = lambda hit: ("match", hit["match"]) if hit["match"] is not None else ("itc", hit["itc_score"])  # noqa: E731
    for r, lo in zip(ray_answer["hits"], local_answer["hits"]):
        assert r["rank"] == lo["rank"] and ranking(r)[0] == ranking(lo)[0] and abs(ranking(r)[1] - ranking(lo)[1]) <= 1e-4, (r, lo)
    local_by_id = {hit["id"]: hit for hit in local_answer["hits"]}
    for r in ray_answer["hits"]:
        lo = local_by_id.get(r["id"])
        if lo is None:
            continue  # a near-tie at the cut: the position check above holds it
        assert {k: v for k, v in r.items() if k not in (*scores, "rank")} == {k: v for k, v in lo.items() if k not in (*scores, "rank")}
        for name in scores:
            assert (r[name] is None) == (lo[name] is None) and (r[name] is None or abs(r[name] - lo[name]) <= 1e-4), (name, r, lo)


SEARCHES = [
    {"q": "a cat"},
    {"q": "a red rocket on a launch pad", "k": 3, "candidates": 6},
    {"q": "a cat", "not": ["coffee"], "k": 4},
    {"q": "a cup of coffee", "where": "width >= 100", "k": 5},
    {"q": "a cat", "min_match": 0.01, "k": 5},
    {"q": "a cat", "rerank": "false", "k": 5},
    {"q": "an astronaut", "k": 2, "offset": 2},
    {"image_id": 0, "k": 4},
    {"image_id": 1, "q": "a photo", "k": 3},
    {"image_id": 2, "target": "images", "k": 3},
    {"like": 0, "k": 4},
    {"q": "a cat", "like": [1, 3], "unlike": 2, "k": 4},
    {"q": "a cat", "collapse": "true", "k": 5},
    {"q": "a cup of coffee on a red saucer", "where": "kind = 'video'", "k": 3},
    {"q": "a rocket", "k": 12, "candidates": 24},
]


@pytest.mark.parametrize("params", SEARCHES, ids=lambda p: "&".join(f"{k}={v}" for k, v in p.items()))
def test_searches_equal_the_local_server(ray_server, local_url, params):
    url, _ = ray_server
    status, ray_answer = get(url, "/api/search", **params)
    local_status, local_answer = get(local_url, "/api/search", **params)
    assert (status, local_status) == (200, 200), (ray_answer, local_answer)
    same_answer(ray_answer, local_answer)


def test_pages_and_uploads_equal_the_local_server(ray_server, local_url, photos):
    url, _ = ray_server
    _, ray_page = get(url, "/api/search", q="a cat", k=3)
    _, local_page = get(local_url, "/api/search", q="a cat", k=3)
    assert ray_page["next"] and local_page["next"]
    _, ray_next = get(url, "/api/search", cursor=ray_page["next"])
    _, local_next = get(local_url, "/api/search", cursor=local_page["next"])
    same_answer(ray_next, local_next)
    upload = photos[3].read_bytes()
    answers = [
        httpx.post(f"{server}/api/search/image", params={"k": 4}, content=upload, headers={**AUTH, "Content-Type": "image/jpeg"}, timeout=120)
        for server in (url, local_url)
    ]
    assert [answer.status_code for answer in answers] == [200, 200], [answer.text for answer in answers]
    same_answer(answers[0].json(), answers[1].json())


def test_explain_thumbnails_and_metrics(ray_server, local_url):
    url, _ = ray_server
    status, explained = get(url, "/api/explain", q="a cat", image_id=0)
    _, local_explained = get(local_url, "/api/explain", q="a cat", image_id=0)
    assert status == 200 and explained["words"] == local_explained["words"]
    assert abs(explained["match"] - local_explained["match"]) <= 1e-4
    status, thumbnail = get(url, "/api/images/0/thumbnail", size=128)
    assert status == 200 and max(Image.open(io.BytesIO(thumbnail)).size) <= 128
    status, metrics = get(url, "/api/metrics")
    assert status == 200 and metrics["engine"]["name"] == "ray" and metrics["engine"]["rerank_replicas"] == 2


def test_token_rules_hold(ray_server):
    url, _ = ray_server
    assert httpx.get(f"{url}/api/search", params={"q": "a cat"}, timeout=30).status_code == 401
    assert httpx.get(f"{url}/api/search", params={"q": "a cat"}, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
    assert httpx.get(f"{url}/", timeout=30).status_code == 200  # the page loads, to ask for the token


def test_schemathesis_finds_no_failure(ray_server, tmp_path):
    """The API's contract holds on this engine too (a few examples: the local server's test runs more)."""
    from tests.test_api_contract import MISSING, REQUIRED, SCHEMATHESIS

    if SCHEMATHESIS is None:
        assert not REQUIRED, f"BTSEARCH_REQUIRE_SCHEMATHESIS=1 but {MISSING}"
        pytest.skip(MISSING)
    url, _ = ray_server
    command = [
        SCHEMATHESIS, "run", f"{url}/openapi.json", "--checks", "all", "--header", f"Authorization: Bearer {TOKEN}",
        "--max-examples", "3", "--seed", "7", "--workers", "1", "--generation-database", "none", "--no-color",
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert run.returncode == 0 and "No issues found" in run.stdout, run.stdout[-4000:]


def test_the_warm_cli_searches_through_it(ray_server, db):
    url, _ = ray_server
    record = server_file.read(db)
    assert record is not None and record.url == url
    _, before = get(url, "/api/metrics")
    result = run("search", "a cat", "--db", db, "--json", "-k", 3, "--precision", "fp32")  # the server's precision: else it runs cold
    assert len(json.loads(result.output)["hits"]) == 3
    _, after = get(url, "/api/metrics")
    assert after["requests"] == before["requests"] + 1


def concurrent_searches(url, count):
    queries = [SEARCHES[n % 5] for n in range(count)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda params: get(url, "/api/search", **params), queries)), queries


@pytest.mark.parametrize("deployment", ["Rerank", "Recall"])
def test_a_replica_killed_under_load_fails_no_search(ray_server, local_url, deployment):
    url, process = ray_server
    victims = replicas(process.pid, deployment)
    assert victims, f"no {deployment} replica found"
    killed = threading.Event()

    def kill_soon():
        time.sleep(0.3)  # searches are in flight by then
        os.kill(victims[0], signal.SIGKILL)
        killed.set()

    killer = threading.Thread(target=kill_soon)
    killer.start()
    answers, queries = concurrent_searches(url, 24)
    killer.join()
    assert killed.is_set()
    assert [status for status, _ in answers] == [200] * len(answers), [answer for status, answer in answers if status != 200][:3]
    for (_, answer), params in zip(answers, queries):
        _, local_answer = get(local_url, "/api/search", **params)
        same_answer(answer, local_answer)
    deadline = time.monotonic() + 120  # Ray starts a replica in its place
    while len(set(replicas(process.pid, deployment)) - {victims[0]}) < len(victims):
        assert time.monotonic() < deadline, f"the killed {deployment} replica was not replaced"
        time.sleep(1)


def test_images_indexed_while_it_serves_are_found(ray_server, db, photos, tmp_path):
    url, _ = ray_server
    _, before = get(url, "/api/health")
    new = tmp_path / "new"
    new.mkdir()
    Image.open(photos[0]).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(new / "flipped.jpg", quality=95)
    run("index", new, "--db", db, "--precision", "fp32", "-q")
    deadline = time.monotonic() + 10
    while True:
        _, health = get(url, "/api/health")
        _, found = get(url, "/api/search", q="a cat", k=before["images"] + 1)
        if health["images"] == before["images"] + 1 and any(hit["path"].endswith("flipped.jpg") for hit in found["hits"]):
            break
        assert time.monotonic() < deadline, "the new image was not searchable within 10 s"
        time.sleep(0.5)


def test_the_cluster_gone_is_a_503_at_once(ray_server):
    url, process = ray_server
    cluster = [pid for pid in session_processes(process.pid) if pid != process.pid]  # its GCS, raylet, workers and replicas
    assert any(process_title(pid).split(" ")[0].endswith("gcs_server") for pid in cluster), "no GCS process found"
    kill_session(process.pid, spare=process.pid)
    started = time.monotonic()
    answer = httpx.get(f"{url}/api/search", params={"q": "a cat"}, headers=AUTH, timeout=60)
    assert answer.status_code == 503, answer.text
    assert "Ray cluster" in answer.json()["detail"] and "\n" not in answer.json()["detail"]
    assert time.monotonic() - started < 10
    assert httpx.get(f"{url}/api/health", headers=AUTH, timeout=10).status_code == 200  # the ingress itself is still there


def test_sigterm_stops_everything(ray_server, db):
    _, process = ray_server
    os.kill(process.pid, signal.SIGTERM)
    process.wait(timeout=60)
    deadline = time.monotonic() + 30
    while session_processes(process.pid):
        assert time.monotonic() < deadline, f"left running: {session_processes(process.pid)}"
        time.sleep(0.5)
    assert server_file.read(db) is None
