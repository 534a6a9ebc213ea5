"""The search stage: a `Query` answered by recall and re-ranking.

`query` holds what a search asks and its checks; `recall` finds ITC candidates in FAISS (or
exactly, under a `where`); `reranker` scores the top ones with the ITM head; `ranking` merges the
two orders (and is the one merge evaluation uses too); `pipeline` runs them for one query and
`batch` for several texts at once; `results` is the typed answer and its JSON; `explain` shows
where a text's words look in an image.

May import: `btsearch.model`, `btsearch.media`, `btsearch.indexers` (storage), `btsearch.errors`,
`btsearch.defaults`. Not ingest, the collection facade, serve, evaluate or the CLI.
"""
