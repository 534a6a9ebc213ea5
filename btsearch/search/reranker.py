"""ITM re-ranking of FAISS candidates: for one query, or for the pairs of several at once.

The query's tower runs once (its bridge inputs come in with the query). Each candidate image's
bridge inputs come from the fastest tier that has them (`TIERS`): the re-rank cache (no tower at
all), else the pixel store (its stored crop, decoded, through the image tower), else its source
file (read, decoded and prepared, then the tower). A damaged pixel row falls back to the file.
Where the collection keeps pixels, it has accepted their tolerance, and its files (the few
candidates without pixels) decode at a reduced scale too (`FILE_DECODE_MARGIN`): several times
faster for camera JPEGs, and nearer exact than the stored pixels. Without a pixel store, files
decode whole: the path that equals transformers.
Cached states computed in another precision than the search's are cast to it: within a stated
tolerance, nearer exact than the pixel tier they would otherwise fall to (docs/speed.md,
"Precision of cached states"). Stored crops decode on the GPU itself where torchvision can
(nvJPEG, in batches), else with PIL.
Each batch of pairs goes through the cross-modal encoder at once, with the query's states
broadcast over it (one query) or gathered per pair (several: `score_pairs`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..media.crops import decode_crops
from ..media.video import VideoFrame
from ..model.image_states import embed_image_files
from ..model.pixels import decode_crops_on_device, decodes_on_device

if TYPE_CHECKING:
    import torch

    from ..indexers import BridgeCache
    from ..indexers.pixel_store import PixelStore
    from ..model.bridgetower import TowerOutput
    from ..model.encoder import Encoder

TIERS = ("cache", "pixels", "file")  # where a candidate's model input comes from, fastest first

# A reduced decode keeps at least this many times the processor's resize a side. Its crops then
# differ from a whole decode's by 0.1 levels on average, 2 at most, against 1.5 and 28 for the
# pixel store's JPEG (12 MP camera files at 288 px), and its match probabilities by at most 0.011
# where the pixel store's move by up to 0.045 (64 px; docs/speed.md). At 2x, a small photo's
# match moved by 0.027.
FILE_DECODE_MARGIN = 4


def reduced_file_side(encoder: Encoder) -> int:
    """The shorter side, in pixels, that a reduced decode of a candidate's file keeps at least."""
    return FILE_DECODE_MARGIN * encoder.prepare_image.resize_side


@dataclass
class Scored:
    """ITM logits (n, 2) (no match, match), NaN where an image could not be scored; for each
    image, the tier its input came from (None: not scored); images whose stored pixels did not
    decode (re-ranked from their file where it could be read)."""

    logits: list[np.ndarray]
    tiers: list[str | None]
    damaged: list[int] = field(default_factory=list)


class Reranker:
    def __init__(
        self, encoder: Encoder, batch_size: int = 32, cache: BridgeCache | None = None, pixels: PixelStore | None = None, decode_on_device: bool = True,
    ):
        """`decode_on_device`: decode stored crops on the GPU where it can (False: always with PIL,
        as the benchmark compares)."""
        if not encoder.has_itm:
            raise ValueError("this checkpoint has no ITM head to re-rank with")
        self.encoder = encoder
        self.batch_size = batch_size
        self.cache, self.pixels = cache, pixels
        self.decode_on_device = decode_on_device and decodes_on_device(encoder.device)
        self.reduce_files_to = reduced_file_side(encoder) if pixels is not None else None

    def score_images(self, query: TowerOutput, paths: Sequence[str | Path | VideoFrame], ids: Sequence[int] | np.ndarray = ()) -> Scored:
        """Both ITM logits of (query text, image) for each image (its path, or its video's frame,
        and its id where the cache or the pixel store may hold it): `Scored.logits[0]`."""
        return self.score_images_many([query], paths, ids)

    def score_images_many(self, queries: Sequence[TowerOutput], paths: Sequence[str | Path | VideoFrame], ids: Sequence[int] | np.ndarray = ()) -> Scored:
        """`score_images` for several text queries at once (a query and its negatives): each
        image's bridge inputs are read or computed once, for all of them."""
        scored = Scored([np.full((len(paths), 2), np.nan, dtype=np.float32) for _ in queries], [None] * len(paths))
        for rows, states in self._image_states(paths, ids, scored):
            for query, out in zip(queries, scored.logits):
                out[rows] = self.encoder.match(query, states, both=True)
        return scored

    def score_pairs(self, texts: TowerOutput, pairs: Sequence[tuple[int, int]], paths: Sequence[str | Path | VideoFrame], ids: Sequence[int] | np.ndarray = ()) -> Scored:
        """Both ITM logits (len(pairs), 2) of (text t, image i) for each pair (t, i), as
        `Scored.logits[0]`: `texts` is a batch of text queries (one tower call, with bridge
        inputs), i indexes `paths` (and `ids`). Each image's bridge inputs are read or computed
        once, and the pairs of a batch of images go through the cross-modal encoder together,
        whatever query each belongs to."""
        import torch

        from ..model.bridgetower import TowerOutput  # torch's, loaded by then: this module stays light to import

        assert texts.bridge is not None and texts.mask is not None, "score_pairs needs the texts' bridge inputs"
        device = texts.bridge.device
        scored = Scored([np.full((len(pairs), 2), np.nan, dtype=np.float32)], [None] * len(paths))
        text_of = np.array([t for t, _ in pairs], dtype=np.int64)
        image_of = np.array([i for _, i in pairs], dtype=np.int64)
        for rows, states in self._image_states(paths, ids, scored):
            assert states.bridge is not None
            slot = np.full(len(paths), -1, dtype=np.int64)
            slot[rows] = np.arange(len(rows))  # where each image of this batch sits in `states`
            todo = np.flatnonzero(slot[image_of] >= 0)
            for start in range(0, len(todo), self.batch_size):
                chunk = todo[start : start + self.batch_size]
                text_rows = torch.as_tensor(text_of[chunk], device=device)
                pair_texts = TowerOutput(embeds=None, bridge=texts.bridge[text_rows], mask=texts.mask[text_rows])
                pair_images = TowerOutput(embeds=None, bridge=states.bridge[torch.as_tensor(slot[image_of[chunk]], device=device)])
                scored.logits[0][chunk] = self.encoder.match(pair_texts, pair_images, both=True)
        return scored

    def _image_states(self, paths: Sequence[str | Path | VideoFrame], ids: Sequence[int] | np.ndarray, scored: Scored) -> Iterator[tuple[list[int], TowerOutput]]:
        """Batches of (positions in `paths`, their images' bridge inputs), tier by tier (each
        position's tier noted in `scored.tiers`); unreadable files are left out."""
        ids = [int(item) for item in ids]
        cache = self.cache
        if cache is not None and ids and cache.max_bytes is not None:
            cache.record_use(ids)  # a bounded cache keeps the most re-ranked
        cached = [i for i, item in enumerate(ids) if cache is not None and item in cache]
        for start in range(0, len(cached), self.batch_size):
            where = cached[start : start + self.batch_size]
            assert cache is not None
            self._note(scored, where, "cache")
            yield where, self.encoder.states_from_cache(cache.get([ids[i] for i in where]))
        todo = sorted(set(range(len(paths))) - set(cached))
        if self.pixels is not None and ids and todo:
            stored = self.pixels.get(ids[i] for i in todo)
            held = [i for i in todo if ids[i] in stored]
            for start in range(0, len(held), self.batch_size):
                chunk = held[start : start + self.batch_size]
                crops = self._decode([stored[ids[i]] for i in chunk])
                where = [i for i, crop in zip(chunk, crops) if not isinstance(crop, str)]
                scored.damaged += [i for i, crop in zip(chunk, crops) if isinstance(crop, str)]
                if where:
                    self._note(scored, where, "pixels")
                    yield where, self.encoder.image_states(_stack([crop for crop in crops if not isinstance(crop, str)]), with_bridge=True)
            done = set(held) - set(scored.damaged)
            todo = [i for i in todo if i not in done]
        sources = {i: _source(paths[i]) for i in todo}  # a frame is decoded from its video at its time
        position = {source: i for i, source in sources.items()}
        for batch in embed_image_files(self.encoder, list(sources.values()), self.batch_size, with_bridge=True, reduce_to=self.reduce_files_to):
            if batch.states is not None:
                where = [position[image.source] for image in batch.images]
                self._note(scored, where, "file")
                yield where, batch.states

    def _decode(self, blobs: list[bytes]) -> Sequence[np.ndarray | torch.Tensor | str]:
        """Stored crops as (3, S, S) uint8 (on the GPU when it decodes them), or why not."""
        side = self.encoder.crop_size
        if self.decode_on_device:
            return decode_crops_on_device(blobs, side, self.encoder.device)
        # Threads pay off for real crops (a millisecond each at 288 px), not for the tests' 64 px ones.
        workers = self.encoder.loader_workers if side >= 128 else 1
        return decode_crops(blobs, side, workers)

    @staticmethod
    def _note(scored: Scored, where: list[int], tier: str) -> None:
        for i in where:
            scored.tiers[i] = tier

    def score_texts(self, query: TowerOutput, texts: Sequence[str]) -> np.ndarray:
        """Both ITM logits (n, 2) of (text, query image) for each text."""
        scores = np.empty((len(texts), 2), dtype=np.float32)
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start : start + self.batch_size])
            states = self.encoder.text_states(chunk, with_bridge=True)
            scores[start : start + len(chunk)] = self.encoder.match(states, query, both=True)
        return scores


def _stack(crops: Sequence[np.ndarray | torch.Tensor]) -> np.ndarray | torch.Tensor:
    """Decoded crops as one batch: a tensor where they were decoded on the GPU."""
    if isinstance(crops[0], np.ndarray):
        return np.stack(crops)
    import torch

    return torch.stack(crops)  # type: ignore[arg-type]


def _source(path: str | Path | VideoFrame) -> Path | VideoFrame:
    """How the loader names what it read (`LoadedImage.source`)."""
    return path if isinstance(path, VideoFrame) else Path(path)
