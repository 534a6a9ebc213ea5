"""Who may use `btsearch serve`: every API operation without, with a wrong and with the right
bearer token; the schema's security scheme; `serve` refusing a non-loopback address without a
token unless --no-auth; -q."""

import io

import pytest
from click.testing import CliRunner
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from PIL import Image

import btsearch.serve.app
from btsearch.cli.main import main
from btsearch.model.encoder import Encoder
from btsearch.serve.app import create_app
from btsearch.serve.auth import is_loopback

TOKEN = "s3cret-token-for-tests"


def _jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(out, format="JPEG")
    return out.getvalue()


# One answerable request per API operation; the test fails when an operation has none, so a new
# endpoint cannot slip by untested.
REQUESTS = {
    ("GET", "/api/health"): {},
    ("GET", "/api/metrics"): {},
    ("GET", "/api/search"): {"params": {"q": "a cat", "k": 2, "candidates": 2}},
    ("POST", "/api/search/image"): {"params": {"k": 2, "target": "images"}, "content": _jpeg(), "headers": {"Content-Type": "image/jpeg"}},
    ("GET", "/api/images/{image_id}"): {},
    ("GET", "/api/images/{image_id}/thumbnail"): {"params": {"size": 128}},
    ("GET", "/api/explain"): {"params": {"q": "a cat", "image_id": 0}},
    ("GET", "/api/explain.png"): {"params": {"q": "a cat", "image_id": 0}},
}


@pytest.fixture(scope="module")
def db(tmp_path_factory, random_checkpoint, photos):
    db = tmp_path_factory.mktemp("auth") / "db"
    args = ["index", str(photos[0].parent), "--db", str(db), "--model", str(random_checkpoint), "--precision", "fp32", "-q"]
    assert CliRunner().invoke(main, args).exit_code == 0
    return db


@pytest.fixture(scope="module")
def app(db, random_checkpoint):
    return create_app(db, encoder=Encoder.from_pretrained(str(random_checkpoint), precision="fp32"), token=TOKEN)


def _operations(app) -> list[tuple[str, str]]:
    return sorted((method, route.path) for route in app.routes if isinstance(route, APIRoute) for method in route.methods if route.path.startswith("/api"))


def _ask(client, method, path, authorization=None):
    request = REQUESTS[(method, path)]
    headers = dict(request.get("headers", {}))
    if authorization is not None:
        headers["Authorization"] = authorization
    url = path.replace("{image_id}", "0")
    return client.request(method, url, params=request.get("params"), content=request.get("content"), headers=headers)


def test_every_api_operation_needs_the_token(app):
    client = TestClient(app)
    operations = _operations(app)
    assert set(operations) == set(REQUESTS), "an API operation without a request in REQUESTS (add one)"
    for method, path in operations:
        for authorization in (None, "Bearer wrong-token", f"Basic {TOKEN}", "Bearer ", f"Bearer {TOKEN}x"):
            refused = _ask(client, method, path, authorization)
            assert refused.status_code == 401, (method, path, authorization, refused.status_code)
            assert refused.headers["www-authenticate"] == "Bearer" and refused.json()["detail"]
        served = _ask(client, method, path, f"Bearer {TOKEN}")
        assert served.status_code == 200, (method, path, served.status_code, served.text[:200])


def test_the_page_and_schema_stay_open_and_the_schema_declares_the_scheme(app):
    client = TestClient(app)
    assert client.get("/").status_code == 200
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"] == {"type": "http", "scheme": "bearer", "description": schema["components"]["securitySchemes"]["HTTPBearer"]["description"]}
    for method, path in _operations(app):
        operation = schema["paths"][path][method.lower()]
        assert operation["security"] == [{"HTTPBearer": []}]
        assert "WWW-Authenticate" in operation["responses"]["401"]["headers"]


def test_without_a_token_the_api_is_open_and_declares_no_scheme(db, random_checkpoint):
    client = TestClient(create_app(db, encoder=Encoder.from_pretrained(str(random_checkpoint), precision="fp32")))
    assert client.get("/api/health").status_code == 200
    schema = client.get("/openapi.json").json()
    assert "securitySchemes" not in schema.get("components", {})
    assert all("401" not in operation["responses"] for item in schema["paths"].values() for operation in item.values())


@pytest.fixture
def started(monkeypatch):
    """What `serve` would start: create_app's token and uvicorn's address (neither really runs)."""
    calls = {}

    def fake_create_app(path, device, precision, token, service=None):
        calls["token"] = token
        return object()

    def fake_run(server, sockets):  # `serve` binds its socket first, then hands it to uvicorn
        calls["host"] = sockets[0].getsockname()[0]
        for listening in sockets:
            listening.close()

    import uvicorn

    monkeypatch.setattr(btsearch.serve.app, "create_app", fake_create_app)
    monkeypatch.setattr(uvicorn.Server, "run", fake_run)
    monkeypatch.delenv("BTSEARCH_TOKEN", raising=False)
    return calls


def test_serve_refuses_every_interface_without_a_token(db, started):
    result = CliRunner().invoke(main, ["serve", "--db", str(db), "--host", "0.0.0.0"])
    assert result.exit_code == 1 and "host" not in started
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("btsearch: error: serving on 0.0.0.0") and "--token" in lines[0] and "--no-auth" in lines[0]
    assert CliRunner().invoke(main, ["serve", "--db", str(db), "--token", ""]).exit_code == 1


def test_serve_takes_the_token_from_the_option_or_the_environment_or_none_with_no_auth(db, started):
    runner = CliRunner()
    assert runner.invoke(main, ["serve", "--db", str(db), "--host", "0.0.0.0", "--token", TOKEN]).exit_code == 0
    assert started == {"token": TOKEN, "host": "0.0.0.0"}
    assert runner.invoke(main, ["serve", "--db", str(db), "--host", "0.0.0.0"], env={"BTSEARCH_TOKEN": "from-env"}).exit_code == 0
    assert started["token"] == "from-env"
    assert runner.invoke(main, ["serve", "--db", str(db), "--host", "0.0.0.0", "--no-auth"]).exit_code == 0
    assert started == {"token": None, "host": "0.0.0.0"}
    loud = runner.invoke(main, ["serve", "--db", str(db)])  # loopback: no token needed
    assert loud.exit_code == 0 and started["token"] is None and "btsearch serving" in loud.output
    quiet = runner.invoke(main, ["serve", "--db", str(db), "-q", "--token", TOKEN])  # loopback: a given token is required too
    assert quiet.exit_code == 0 and quiet.output == "" and started["token"] == TOKEN


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("localhost", True), ("::1", True), ("127.1.2.3", True),
                                                ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("example.org", False)])
def test_which_hosts_are_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_serve_on_ray_without_the_extra_is_one_line_naming_it(db, started, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed: importing it fails
    result = CliRunner().invoke(main, ["serve", "--db", str(db), "--engine", "ray"])
    assert result.exit_code == 1 and "host" not in started
    assert result.output.strip() == "btsearch: error: serve --engine ray needs Ray Serve: pip install 'btsearch[ray]'"


def test_ray_options_without_the_ray_engine_are_refused(db, started):
    for options in (["--address", "10.0.0.1:6379"], ["--replicas", "2"]):
        result = CliRunner().invoke(main, ["serve", "--db", str(db), *options])
        assert result.exit_code == 1 and "host" not in started and "--engine ray" in result.output, result.output
