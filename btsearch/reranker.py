"""ITM re-ranking of FAISS candidates for one query.

The query's tower runs once (its bridge inputs come in with the query); the candidates' bridge
inputs come from the re-rank cache, or else from their files through the image tower, and each
batch of pairs goes through the cross-modal encoder at once with the query's states broadcast
over it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .image_states import embed_image_files

if TYPE_CHECKING:
    from .encoder import Encoder
    from .indexers import BridgeCache
    from .model import TowerOutput


class Reranker:
    def __init__(self, encoder: Encoder, batch_size: int = 32):
        if not encoder.has_itm:
            raise ValueError("this checkpoint has no ITM head to re-rank with")
        self.encoder = encoder
        self.batch_size = batch_size

    def score_images(
        self, query: TowerOutput, paths: Sequence[str | Path], ids: Sequence[int] | np.ndarray = (), cache: BridgeCache | None = None
    ) -> np.ndarray:
        """Both ITM logits (n, 2) of (query text, image) for each path; NaN where the file cannot be read.

        Images whose id is in the re-rank cache take their bridge inputs from it; the others
        are read and run through the image tower."""
        return self.score_images_many([query], paths, ids, cache)[0]

    def score_images_many(
        self, queries: Sequence[TowerOutput], paths: Sequence[str | Path], ids: Sequence[int] | np.ndarray = (), cache: BridgeCache | None = None
    ) -> list[np.ndarray]:
        """`score_images` for several text queries at once (a query and its negatives): each
        image's bridge inputs are read or computed once, for all of them."""
        scores = [np.full((len(paths), 2), np.nan, dtype=np.float32) for _ in queries]
        cached = [i for i, item in enumerate(ids) if cache is not None and item in cache]
        for start in range(0, len(cached), self.batch_size):
            where = cached[start : start + self.batch_size]
            assert cache is not None
            states = self.encoder.states_from_cache(cache.get([ids[i] for i in where]))
            for query, out in zip(queries, scores):
                out[where] = self.encoder.match(query, states, both=True)
        todo = sorted(set(range(len(paths))) - set(cached))
        position = {Path(paths[i]): i for i in todo}
        for batch in embed_image_files(self.encoder, [Path(paths[i]) for i in todo], self.batch_size, with_bridge=True):
            if batch.states is not None:
                rows = [position[image.path] for image in batch.images]
                for query, out in zip(queries, scores):
                    out[rows] = self.encoder.match(query, batch.states, both=True)
        return scores

    def score_texts(self, query: TowerOutput, texts: Sequence[str]) -> np.ndarray:
        """Both ITM logits (n, 2) of (text, query image) for each text."""
        scores = np.empty((len(texts), 2), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start : start + self.batch_size])
            states = self.encoder.text_states(chunk, with_bridge=True)
            scores[start : start + len(chunk)] = self.encoder.match(states, query, both=True)
        return scores
