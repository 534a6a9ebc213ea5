"""`btsearch serve`: the HTTP API and web page over one collection."""

from __future__ import annotations

import click

from .options import db_option, device_option, model_option


@click.command()
@db_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: every one).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@model_option
@device_option
def serve(db, host, port, model, device, precision):
    """Serve the collection: a web page at / and an HTTP API under /api (OpenAPI schema at
    /openapi.json, interactive docs at /docs): search by text, uploaded image or image id,
    thumbnails, health and metrics. The model is loaded once; searches queue.
    """
    import uvicorn

    from btsearch import server_file
    from btsearch.collection import Collection
    from btsearch.server import create_app

    app = create_app(Collection.open(db, model=model, load_model=False).path, device=device, precision=precision)
    click.echo(f"btsearch serving {db} at http://{host}:{port}/", err=True)
    # While it runs, `btsearch search --db` on this collection sends its queries here.
    with server_file.announced(db, server_file.local_url(host, port), device, precision):
        uvicorn.run(app, host=host, port=port, log_level="warning")
