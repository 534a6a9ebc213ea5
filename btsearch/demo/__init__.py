"""What runs with nothing downloaded: scikit-image's sample photos with captions
(`sample_photos`), small BridgeTower checkpoints trained on them in seconds (`small_checkpoint`,
the tests' checkpoints too), and the demo's inputs with its offline fallback (`prepare`).

May import: `btsearch.model` and what it may. Nothing of storage, search, ingest or above.
"""
