"""`btsearch serve`: the HTTP API and web page over one collection, and who may use it."""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from btsearch.errors import BtsearchError

from .options import db_option, device_option, model_option, quiet_option, say


@click.command()
@db_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: every one).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@click.option(
    "--token", envvar="BTSEARCH_TOKEN", default=None, metavar="T",
    help="Require `Authorization: Bearer T` on every API request (env BTSEARCH_TOKEN). Needed to listen on "
    "an address other than loopback, unless --no-auth.",
)
@click.option("--no-auth", is_flag=True, help="Listen on a non-loopback address without a token: anyone who reaches the port sees every image.")
@click.option(
    "--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
    help="local: searches run in this process. ray: recall and ITM re-ranking run as Ray Serve deployments "
    "(Recall, and --replicas Rerank replicas, one GPU each where the cluster has GPUs); this process serves the page and API.",
)
@click.option("--address", default=None, metavar="ADDR", help="With --engine ray: the cluster to join [default: RAY_ADDRESS, else a local Ray on this machine's cores].")
@click.option(
    "--replicas", type=click.IntRange(min=1), default=None, metavar="N",
    help="With --engine ray: Rerank replicas [default: one per GPU of the cluster, else 1].",
)
@model_option
@device_option
@quiet_option
def serve(db, host, port, token, no_auth, engine, address, replicas, model, device, precision):
    """Serve the collection: a web page at / and an HTTP API under /api (OpenAPI schema at
    /openapi.json, interactive docs at /docs): search by text, uploaded image or image id,
    thumbnails, health and metrics. The model is loaded once; searches that arrive together run as one batch.
    With --engine ray the same page and API run here, and the searches on a Ray cluster (the collection's
    folder must be at the same path on every node).
    """
    from btsearch.serve.auth import is_loopback

    if token is not None and not token.strip():
        raise BtsearchError("the token (--token or BTSEARCH_TOKEN) is empty: give one, or leave both unset")
    if token is None and not no_auth and not is_loopback(host):
        raise BtsearchError(
            f"serving on {host} would show every image to anyone who reaches it: give --token T (or BTSEARCH_TOKEN), "
            "or --no-auth to serve without one"
        )

    if engine == "local" and (address is not None or replicas is not None):
        raise BtsearchError("--address and --replicas place searches on a Ray cluster: add --engine ray")
    if engine == "ray":
        from btsearch.serve.ray_service import require_serve

        require_serve()  # before the port and the collection: one line naming the extra

    import uvicorn

    from btsearch.collection import Collection
    from btsearch.serve import server_file
    from btsearch.serve.app import create_app, uvicorn_config

    path = Collection.open(db, model=model, load_model=False).path
    listening = _bound_socket(host, port)  # a busy port answers now, not after the model has loaded
    with _searches(engine, path, address, replicas, device, precision) as service:
        app = create_app(path, device=device, precision=precision, token=token, service=service)
        where = f" (Ray: {service.rerank_replicas} Rerank replicas)" if engine == "ray" else ""
        say(f"btsearch serving {db} at http://{host}:{port}/" + (" (token required)" if token is not None else "") + where)
        # While it runs, `btsearch search --db` on this collection sends its queries here (with the token).
        with server_file.announced(db, server_file.local_url(host, port), device, precision, token=token):
            uvicorn.Server(uvicorn_config(app)).run(sockets=[listening])


@contextmanager
def _searches(engine: str, path, address, replicas, device: str, precision: str) -> Iterator[Any]:
    """Who answers the searches: None (the app's own, in this process), or the Ray deployments,
    taken down when the server stops."""
    if engine == "local":
        yield None
        return
    from btsearch.serve.ray_service import deployed

    say("btsearch: starting the Recall and Rerank deployments on Ray ...")
    with deployed(path, address, replicas, device, precision) as service:
        yield service


def _bound_socket(host: str, port: int) -> socket.socket:
    """A socket bound to (host, port), as uvicorn would bind it; one line when it cannot be."""
    listening = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
    try:
        listening.bind((host, port))
    except OSError as error:
        listening.close()
        hint = ": another server listens there; choose another --port" if error.errno == errno.EADDRINUSE else ""
        raise BtsearchError(f"cannot listen on {host}:{port}: {error.strerror or error}{hint}") from None
    return listening
