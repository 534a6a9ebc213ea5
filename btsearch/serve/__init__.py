"""The serve stage: `btsearch serve`, an HTTP API and a web page over one collection.

`app` builds the FastAPI application; `schema` is the API's contract; `auth` its bearer token;
`service` answers searches over the collection's snapshots, batching concurrent ones through
`batching`; `cursor` encodes next-page cursors; `server_file` is how the warm CLI finds a running
server. The page itself is `web/index.html`. With `--engine ray`, `ray_service` answers the
app's searches through the `Recall` and `Rerank` Ray Serve deployments of `ray_deployments`.

May import: the collection facade and every stage below it. Not evaluate or the CLI.
"""
