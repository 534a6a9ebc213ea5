"""ITM re-ranking of FAISS candidates for one query.

The query's tower runs once (its bridge inputs come in with the query); the candidates' bridge
inputs are computed in batches, and each batch of pairs goes through the cross-modal encoder at
once with the query's states broadcast over it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .encoder import Encoder
from .loader import iter_image_batches
from .indexers import BridgeCache
from .model import TowerOutput


class Reranker:
    def __init__(self, encoder: Encoder, batch_size: int = 32):
        if not encoder.has_itm:
            raise ValueError("this checkpoint has no ITM head to re-rank with")
        self.encoder = encoder
        self.batch_size = batch_size

    def score_images(
        self, query: TowerOutput, paths: Sequence[str | Path], ids: Sequence[int] = (), cache: BridgeCache | None = None
    ) -> np.ndarray:
        """ITM logits of (query text, image) for each path; NaN where the file cannot be read.

        Images whose id is in the re-rank cache take their bridge inputs from it; the others
        are read and run through the image tower."""
        scores = np.full(len(paths), np.nan, dtype=np.float32)
        cached = [i for i, item in enumerate(ids) if cache is not None and item in cache]
        for start in range(0, len(cached), self.batch_size):
            where = cached[start : start + self.batch_size]
            states = self.encoder.to_model(cache.get([ids[i] for i in where]))
            scores[where] = self.encoder.match(query, TowerOutput(embeds=None, bridge=states))
        todo = sorted(set(range(len(paths))) - set(cached))
        position = {Path(paths[i]): i for i in todo}
        batches = iter_image_batches(
            [Path(paths[i]) for i in todo], self.encoder.prepare_image, self.batch_size, self.encoder.loader_workers
        )
        for batch in batches:
            if batch.images:
                images = self.encoder.image_states(batch.pixels(), with_bridge=True)
                where = [position[image.path] for image in batch.images]
                scores[where] = self.encoder.match(query, images)
        return scores

    def score_texts(self, query: TowerOutput, texts: Sequence[str]) -> np.ndarray:
        """ITM logits of (text, query image) for each text."""
        scores = np.empty(len(texts), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start : start + self.batch_size])
            states = self.encoder.text_states(chunk, with_bridge=True)
            scores[start : start + len(chunk)] = self.encoder.match(states, query)
        return scores
