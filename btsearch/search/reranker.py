"""ITM re-ranking of FAISS candidates: for one query, or for the pairs of several at once.

The query's tower runs once (its bridge inputs come in with the query); the candidates' bridge
inputs come from the re-rank cache, or else from their files through the image tower, and each
batch of pairs goes through the cross-modal encoder at once, with the query's states broadcast
over it (one query) or gathered per pair (several: `score_pairs`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..model.image_states import embed_image_files

if TYPE_CHECKING:
    from ..indexers import BridgeCache
    from ..model.bridgetower import TowerOutput
    from ..model.encoder import Encoder


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
        for rows, states in self._image_states(paths, ids, cache):
            for query, out in zip(queries, scores):
                out[rows] = self.encoder.match(query, states, both=True)
        return scores

    def score_pairs(
        self, texts: TowerOutput, pairs: Sequence[tuple[int, int]], paths: Sequence[str | Path], ids: Sequence[int] | np.ndarray = (),
        cache: BridgeCache | None = None,
    ) -> np.ndarray:
        """Both ITM logits (len(pairs), 2) of (text t, image i) for each pair (t, i): `texts` is a
        batch of text queries (one tower call, with bridge inputs), i indexes `paths` (and `ids`);
        NaN where the file cannot be read. Each image's bridge inputs are read or computed once,
        and the pairs of a batch of images go through the cross-modal encoder together, whatever
        query each belongs to."""
        import torch

        from ..model.bridgetower import TowerOutput  # torch's, loaded by then: this module stays light to import

        assert texts.bridge is not None and texts.mask is not None, "score_pairs needs the texts' bridge inputs"
        device = texts.bridge.device
        scores = np.full((len(pairs), 2), np.nan, dtype=np.float32)
        text_of = np.array([t for t, _ in pairs], dtype=np.int64)
        image_of = np.array([i for _, i in pairs], dtype=np.int64)
        for rows, states in self._image_states(paths, ids, cache):
            assert states.bridge is not None
            slot = np.full(len(paths), -1, dtype=np.int64)
            slot[rows] = np.arange(len(rows))  # where each image of this batch sits in `states`
            todo = np.flatnonzero(slot[image_of] >= 0)
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start : start + self.batch_size]
                text_rows = torch.as_tensor(text_of[chunk], device=device)
                pair_texts = TowerOutput(embeds=None, bridge=texts.bridge[text_rows], mask=texts.mask[text_rows])
                pair_images = TowerOutput(embeds=None, bridge=states.bridge[torch.as_tensor(slot[image_of[chunk]], device=device)])
                scores[chunk] = self.encoder.match(pair_texts, pair_images, both=True)
        return scores

    def _image_states(
        self, paths: Sequence[str | Path], ids: Sequence[int] | np.ndarray, cache: BridgeCache | None
    ) -> Iterator[tuple[list[int], TowerOutput]]:
        """Batches of (positions in `paths`, their images' bridge inputs): from the cache for the
        ids it holds, else through the image tower; unreadable files are left out."""
        cached = [i for i, item in enumerate(ids) if cache is not None and item in cache]
        for start in range(0, len(cached), self.batch_size):
            where = cached[start : start + self.batch_size]
            assert cache is not None
            yield where, self.encoder.states_from_cache(cache.get([ids[i] for i in where]))
        todo = sorted(set(range(len(paths))) - set(cached))
        position = {Path(paths[i]): i for i in todo}
        for batch in embed_image_files(self.encoder, [Path(paths[i]) for i in todo], self.batch_size, with_bridge=True):
            if batch.states is not None:
                yield [position[image.path] for image in batch.images], batch.states

    def score_texts(self, query: TowerOutput, texts: Sequence[str]) -> np.ndarray:
        """Both ITM logits (n, 2) of (text, query image) for each text."""
        scores = np.empty((len(texts), 2), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start : start + self.batch_size])
            states = self.encoder.text_states(chunk, with_bridge=True)
            scores[start : start + len(chunk)] = self.encoder.match(states, query, both=True)
        return scores
