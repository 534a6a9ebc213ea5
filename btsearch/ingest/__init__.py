"""The ingest stage: image files and texts into a collection, as a pipeline of named stages.

`sync` finds the files and plans what to embed, update or drop; `pipeline` loads, embeds and
writes them (the re-rank cache, then LanceDB, whose commit makes them searchable, then FAISS)
and is the local engine; `ray_engine` runs the same stages on a Ray cluster, with `ray_stages` the
code on its actors; `runner` runs either, then `catch_up` fills the re-rank cache and the pixel
store with what they lack.

May import: `btsearch.model`, `btsearch.media`, `btsearch.indexers` (storage), `btsearch.errors`,
`btsearch.defaults`. Not search, the collection facade, serve, evaluate or the CLI.
"""
