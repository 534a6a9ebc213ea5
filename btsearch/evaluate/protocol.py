"""Retrieval recall with the ALBEF / BridgeTower protocol.

For every query the top `candidates` by ITC get ITM scores and rank above all others, by ITM;
the rest keep their ITC order (`ranking`). Text-to-image: the rank of each caption's image.
Image-to-text: the best rank of an image's captions. R@K is the percentage of queries whose
rank is below K.

Everything a second run can reuse is kept in the collection folder: the embeddings (in
LanceDB), the images' bridge inputs (memory-mapped), and both ITM logits of every pair scored, so
another `candidates` costs only the pairs not scored yet, and an interrupted run resumes. The
scored pairs, labelled by the annotations, also measure how well the match probability is
calibrated (`calibration`). It works on any collection through its public methods
(`EvaluatedCollection`).
"""

from __future__ import annotations

import logging
import time
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from ..indexers import BridgeCache
from ..indexers.atomic import atomic_write
from ..indexers.layout import TableName, eval_bridges_folder, eval_scores_file
from ..model.image_states import fill_bridge_cache
from ..search.ranking import match_probability, ranks_of, rerank_order, rerank_order_union, top_candidates
from .calibration import calibration

if TYPE_CHECKING:
    from ..indexers import ImageRow, TextRow
    from ..model.encoder import Encoder

RECALL_AT = (1, 5, 10)
PAIR_BATCH = 32
TEXT_CHUNK = 64
SCORE_SAVE_INTERVAL_S = 30.0

log = logging.getLogger(__name__)


class EvaluatedCollection(Protocol):
    """What evaluation needs of a collection (`Collection` has it)."""

    path: Path

    @property
    def encoder(self) -> Encoder | None: ...
    def embeddings(self, table: TableName, ids: Any) -> np.ndarray: ...
    def texts(self, ids: Any = None) -> list[TextRow]: ...
    def images(self, ids: Any) -> list[ImageRow]: ...


# -- ranks and recall -------------------------------------------------------------------------------


def recall(ranks: np.ndarray) -> dict[str, float]:
    return {f"R@{k}": float(100.0 * np.mean(ranks < k)) for k in RECALL_AT}


def recall_table(itc_t2i: np.ndarray, caption_image: np.ndarray, candidates: int, itm_t2i: np.ndarray | None, union: bool = False) -> dict:
    """Both directions' recall from the (captions x images) ITC matrix and, at the top-k places
    of each direction, the ITM matrix (NaN elsewhere). `union`: rank by every ITM score either
    direction computed (`rerank_order_union`), not just the query's own top k."""
    n_images = itc_t2i.shape[1]
    images_captions = [np.flatnonzero(caption_image == i) for i in range(n_images)]
    itm_i2t = itm_t2i.T if itm_t2i is not None else None
    if union:
        assert itm_t2i is not None and itm_i2t is not None, "the union needs ITM scores"
        t2i_order, i2t_order = rerank_order_union(itc_t2i, itm_t2i), rerank_order_union(itc_t2i.T, itm_i2t)
    else:
        t2i_order, i2t_order = rerank_order(itc_t2i, candidates, itm_t2i), rerank_order(itc_t2i.T, candidates, itm_i2t)
    t2i = ranks_of(t2i_order, [np.array([i]) for i in caption_image])
    i2t = ranks_of(i2t_order, images_captions)
    result: dict[str, Any] = {"text_to_image": recall(t2i), "image_to_text": recall(i2t)}
    result["rsum"] = sum(result["text_to_image"].values()) + sum(result["image_to_text"].values())
    return result


def ranking_details(itc: np.ndarray, caption_image: np.ndarray, candidates: int, itm: np.ndarray | None, top: int = 5) -> dict:
    """Per caption: its image's rank by ITC alone and after re-ranking, the re-ranked top hits
    with their scores; per image: the best rank of its captions both ways. Arrays, for reports."""
    n_images = itc.shape[1]
    images_captions = [np.flatnonzero(caption_image == i) for i in range(n_images)]
    by_itc_t2i = rerank_order(itc, 0, None)
    by_itc_i2t = rerank_order(itc.T, 0, None)
    final_t2i = rerank_order(itc, candidates, itm) if itm is not None else by_itc_t2i
    final_i2t = rerank_order(itc.T, candidates, itm.T) if itm is not None else by_itc_i2t
    top_hits = final_t2i[:, :top]
    return {
        "t2i_rank_itc": ranks_of(by_itc_t2i, [np.array([i]) for i in caption_image]),
        "t2i_rank": ranks_of(final_t2i, [np.array([i]) for i in caption_image]),
        "i2t_rank_itc": ranks_of(by_itc_i2t, images_captions),
        "i2t_rank": ranks_of(final_i2t, images_captions),
        "t2i_top": top_hits,
        "t2i_top_itc": np.take_along_axis(itc, top_hits, axis=1),
        "t2i_top_itm": np.take_along_axis(itm, top_hits, axis=1) if itm is not None else None,
    }


# -- the protocol on a collection ----------------------------------------------------------------------


def evaluate_collection(
    collection: EvaluatedCollection,
    caption_image: np.ndarray,
    text_ids: np.ndarray,
    image_ids: np.ndarray,
    candidates: int = 128,
    progress: bool = False,
    details: bool = False,
) -> dict:
    """Recall of the collection's texts `text_ids` against its images `image_ids`, where caption
    t shows image `caption_image[t]`, for ITC alone and ITC top-`candidates` re-ranked by ITM.
    `details=True` adds per-query ranks and top hits (`ranking_details`) for a report."""
    started = time.perf_counter()
    encoder = _model_of(collection)
    text_embeds = collection.embeddings("texts", text_ids)
    image_embeds = collection.embeddings("images", image_ids)
    itc = text_embeds @ image_embeds.T  # (captions, images) cosine
    result: dict[str, Any] = {"itc": recall_table(itc, caption_image, 0, None)}
    if candidates > 0 and encoder.has_itm:
        pairs = _needed_pairs(itc, candidates)
        logits = PairScores(_scores_file(collection), text_ids, image_ids).fill(collection, pairs, progress)
        itm = np.full(itc.shape, np.nan, dtype=np.float32)  # ranking reads the match logit, as before
        itm[pairs[:, 0], pairs[:, 1]] = logits[:, 1]
        result["rerank"] = recall_table(itc, caption_image, candidates, itm)
        result["rerank_union"] = recall_table(itc, caption_image, candidates, itm, union=True)
        # As `search` orders re-ranked hits: by the match probability, i.e. the logits' difference.
        by_match = np.full(itc.shape, np.nan, dtype=np.float64)
        by_match[pairs[:, 0], pairs[:, 1]] = logits[:, 1].astype(np.float64) - logits[:, 0]
        result["rerank_by_match"] = recall_table(itc, caption_image, candidates, by_match)
        # Every scored pair is a labelled example: the caption shows the image or it does not.
        result["calibration"] = calibration(match_probability(logits), np.asarray(caption_image)[pairs[:, 0]] == pairs[:, 1])
    else:
        itm = None
        result["rerank"] = result["rerank_union"] = result["rerank_by_match"] = result["calibration"] = None
    if details:
        result["details"] = ranking_details(itc, caption_image, candidates, itm)
    result.update(
        num_images=int(len(image_ids)),
        num_texts=int(len(text_ids)),
        candidates=int(candidates),
        seconds=round(time.perf_counter() - started, 3),
    )
    return result


def _scores_file(collection: EvaluatedCollection) -> Path:
    # Scores from another precision differ in the last digits: keep them apart.
    return collection.path / eval_scores_file(str(_model_of(collection).dtype).removeprefix("torch."))


def _model_of(collection: EvaluatedCollection) -> Encoder:
    if collection.encoder is None:
        raise ValueError("evaluation needs the collection's model (open it with load_model=True)")
    return collection.encoder


def _needed_pairs(itc: np.ndarray, candidates: int) -> np.ndarray:
    """(caption, image) index pairs that either direction re-ranks, each once."""
    t2i = top_candidates(itc, candidates)
    i2t = top_candidates(itc.T, candidates)
    pairs = np.concatenate(
        [
            np.stack([np.repeat(np.arange(itc.shape[0]), t2i.shape[1]), t2i.ravel()], axis=1),
            np.stack([i2t.ravel(), np.repeat(np.arange(itc.shape[1]), i2t.shape[1])], axis=1),
        ]
    )
    return np.unique(pairs, axis=0)


class PairScores:
    """Both ITM logits of (caption, image) pairs, kept on disk between runs (keyed by collection ids).

    The file holds `text_id`, `image_id` and `logits` (n, 2): the match probability needs both.
    A file from before (one `score` per pair) or one that cannot be read is set aside with a
    warning and its pairs are scored again: a cache is never worth a wrong number.
    """

    def __init__(self, path: Path, text_ids: np.ndarray, image_ids: np.ndarray):
        self.path = path
        self.text_ids = np.asarray(text_ids, dtype=np.int64)
        self.image_ids = np.asarray(image_ids, dtype=np.int64)
        self.keys = np.empty(0, dtype=np.int64)  # sorted, unique `pair_keys`
        self.logits = np.empty((0, 2), dtype=np.float32)  # row n: the pair keys[n]
        self._new: list[tuple[np.ndarray, np.ndarray]] = []  # scored since the last merge
        if path.exists():
            self._load()

    def _load(self) -> None:
        try:
            with np.load(self.path) as saved:
                if "logits" not in saved.files:
                    log.warning("%s holds one ITM logit per pair (an older btsearch); scoring the pairs again", self.path)
                    return
                text_id, image_id, logits = saved["text_id"], saved["image_id"], saved["logits"]
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            log.warning("cannot read the ITM score cache %s (%s); scoring the pairs again", self.path, error)
            return
        if logits.ndim != 2 or logits.shape[1] != 2 or not len(text_id) == len(image_id) == len(logits):
            log.warning("%s does not hold two ITM logits per pair; scoring the pairs again", self.path)
            return
        self.keys, first = np.unique(pair_keys(text_id, image_id), return_index=True)
        self.logits = logits[first].astype(np.float32)

    def _merge(self) -> None:
        if not self._new:
            return
        keys = np.concatenate([self.keys, *(keys for keys, _ in self._new)])
        logits = np.concatenate([self.logits, *(logits for _, logits in self._new)])
        self.keys, first = np.unique(keys, return_index=True)
        self.logits = logits[first]
        self._new = []

    def save(self) -> None:
        self._merge()
        with atomic_write(self.path) as file:
            np.savez(file, text_id=self.keys >> 32, image_id=self.keys & 0xFFFFFFFF, logits=self.logits)

    def _found(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Where each key is in `self.keys`, and whether it is there."""
        at = np.searchsorted(self.keys, keys)
        found = at < len(self.keys)
        found[found] = self.keys[at[found]] == keys[found]
        return at, found

    def fill(self, collection: EvaluatedCollection, pairs: np.ndarray, progress: bool) -> np.ndarray:
        """Score the (caption, image) index pairs not scored yet; return the pairs' two logits,
        (len(pairs), 2), in the order of `pairs`."""
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        keys = pair_keys(self.text_ids[pairs[:, 0]], self.image_ids[pairs[:, 1]])
        self._merge()
        todo = pairs[~self._found(keys)[1]]
        if len(todo):
            self._score(collection, todo, progress)
            self._merge()
        at, found = self._found(keys)
        assert found.all(), "every pair was scored"
        return self.logits[at]

    def _score(self, collection: EvaluatedCollection, todo: np.ndarray, progress: bool) -> None:
        encoder = _model_of(collection)
        texts = {row["id"]: row["text"] for row in collection.texts(self.text_ids[np.unique(todo[:, 0])])}
        image_bridges = _image_bridges(collection, self.image_ids[np.unique(todo[:, 1])], progress)
        last_save = time.monotonic()
        text_index = np.unique(todo[:, 0])
        with tqdm(total=len(todo), desc="ITM re-ranking", unit="pair", disable=not progress, dynamic_ncols=True) as bar:
            for chunk_start in range(0, len(text_index), TEXT_CHUNK):
                # Each caption's tower runs once; its pairs then take its bridge inputs by index.
                chunk = text_index[chunk_start : chunk_start + TEXT_CHUNK]
                slot = {int(t): n for n, t in enumerate(chunk)}
                states = encoder.text_states([texts[int(self.text_ids[t])] for t in chunk], with_bridge=True)
                assert states.bridge is not None and states.mask is not None
                pairs = todo[np.isin(todo[:, 0], chunk)]
                for start in range(0, len(pairs), PAIR_BATCH):
                    batch = pairs[start : start + PAIR_BATCH]
                    rows = torch.as_tensor([slot[int(t)] for t in batch[:, 0]], device=states.bridge.device)
                    images = encoder.to_model(image_bridges.get(self.image_ids[batch[:, 1]]))
                    logits = encoder.model.match_logits(states.bridge[rows], states.mask[rows], images, both=True)
                    keys = pair_keys(self.text_ids[batch[:, 0]], self.image_ids[batch[:, 1]])
                    self._new.append((keys, logits.float().cpu().numpy().reshape(-1, 2)))
                    bar.update(len(batch))
                    if time.monotonic() - last_save > SCORE_SAVE_INTERVAL_S:
                        self.save()
                        last_save = time.monotonic()
        self.save()


def pair_keys(text_ids: np.ndarray, image_ids: np.ndarray) -> np.ndarray:
    """One int64 per (text id, image id) pair, so lookups are a searchsorted over sorted keys
    rather than a dict of millions of tuples (COCO: 25K captions x 256 candidates)."""
    text_ids, image_ids = np.asarray(text_ids, dtype=np.int64), np.asarray(image_ids, dtype=np.int64)
    if len(text_ids) and (text_ids.min() < 0 or text_ids.max() >= 2**31 or image_ids.min() < 0 or image_ids.max() >= 2**32):
        raise ValueError("collection ids beyond 2**31 cannot key the ITM score cache")
    return (text_ids << 32) | image_ids


def _image_bridges(collection: EvaluatedCollection, image_ids: np.ndarray, progress: bool) -> BridgeCache:
    """The images' bridge inputs, memory-mapped from a cache in the collection folder (filled
    here where missing): memory stays flat however many images, and a later eval with another
    `candidates` runs no image tower. Stored in float32 for an fp32 model (exact), else float16
    (which holds bf16 states exactly). One cache per precision, and only states recorded as
    computed in the model's own are used (an older cache's unrecorded ones are computed again):
    the protocol's scores are the precision's own, never a mix."""
    encoder = _model_of(collection)
    exact = encoder.dtype == torch.float32
    cache = BridgeCache.create(collection.path / eval_bridges_folder(encoder.precision), np.dtype(np.float32 if exact else np.float16))
    missing = [int(i) for i in image_ids if not cache.holds(int(i), encoder.precision)]
    rows = [(row["id"], row["path"]) for row in collection.images(missing)]
    fill_bridge_cache(encoder, cache, rows, progress, same_precision=True)
    return cache
