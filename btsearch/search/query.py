"""What a search asks: the `Query` value every caller builds (library, CLI, server), its checks
in each caller's words (`Spelling`), and the recall vector of composed and negative queries.

Text finds images; an image finds texts; a text with an image finds images like the image that
match the text. Composed and negative queries, exactly (`query_vector` here, `rerank_scores` in
`ranking`):
- recall ranks by s(x) = mean of cos(p, x) over the positives p (the text, the image) minus
  NEGATIVE_WEIGHT x the mean of cos(n, x) over the `--not` texts n: one FAISS search, since a
  sum of cosines with unit x is the inner product with the sum of the query vectors;
- re-ranking (a text is present) gives each candidate match = P(x matches the text) x the
  product over the negatives of (1 - P(x matches n)), each P the ITM head's softmax: the
  probability that x shows the text and none of the negatives, taken as independent, and
  candidates rank by it, so the order and the `match` shown agree (without negatives that is the
  softmax of the ITM head's two logits, the quantity its two-class training fits; the papers rank
  by the match logit alone, which `eval` keeps as the protocol and reports beside it). The image
  of a composed query acts through recall (ITM scores text-image pairs only).

More like this (`like`, `unlike`: stored image ids) is the same rule with stored embeddings: the
liked images are one positive, the normalised mean of their embeddings (`like_vector`); the
unliked are one negative, theirs alike. With a text, the positives are the text and that vector
(each weighs half in recall) and the text re-ranks by ITM as above; without one, recall's order
(ITC) is the answer; the unliked act through recall alone, as a composed query's image does. The
liked images themselves are never hits.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..errors import BtsearchError
from ..indexers.layout import TABLES, TableName
from ..media.video import VideoFrame

NEGATIVE_WEIGHT = 0.5  # how hard a --not text pushes in recall, against the positives' mean cosine
MAX_WHERE_CHARS = 2000


@dataclass(frozen=True)
class Spelling:
    """How a caller names the query's parts, so that one check speaks each caller's language."""

    text: str
    image: str
    k: str
    candidates: str
    no_rerank: str
    min_match: str
    offset: str
    where: str
    negatives: str
    target: str
    like: str
    unlike: str
    collapse: str


LIBRARY = Spelling(
    text="a text query", image="an image query", k="k", candidates="candidates", no_rerank="rerank=False", min_match="min_match",
    offset="offset", where="where", negatives="negatives", target="target", like="like", unlike="unlike", collapse="collapse=True",
)
CLI = Spelling(
    text="a TEXT query", image="--image PATH", k="-k", candidates="--candidates", no_rerank="--no-rerank", min_match="--min-match",
    offset="--offset", where="--where", negatives="--not", target="--target", like="--like", unlike="--unlike", collapse="--collapse",
)
API = Spelling(
    text="q (a text)", image="image_id", k="k", candidates="candidates", no_rerank="rerank=false", min_match="min_match",
    offset="offset", where="where", negatives="not", target="target", like="like", unlike="unlike", collapse="collapse=true",
)


@dataclass(frozen=True)
class Query:
    """What a search asks, whoever asks it (library, CLI, server). Text finds images; an image
    finds texts; both find images like the image that match the text. `candidates`: how many
    FAISS candidates ITM re-ranks (None until a collection gives its default); `target`
    overrides what is searched; `min_match` keeps re-ranked hits whose match probability
    reaches it; `offset` skips that many hits of the ranking; `where` (SQL) restricts the rows;
    `negatives` push away images that show them; `like` finds images like these stored ones,
    pushed away from the `unlike` ones (module docstring); `collapse` shows one hit per group of
    duplicates (`duplicates`)."""

    text: str | None = None
    image: str | os.PathLike[str] | Image.Image | VideoFrame | None = None  # a VideoFrame: a stored video frame
    k: int = 10
    candidates: int | None = None
    rerank: bool = True
    target: str | None = None
    min_match: float | None = None
    offset: int = 0
    where: str | None = None
    negatives: tuple[str, ...] = ()
    like: tuple[int, ...] = ()
    unlike: tuple[int, ...] = ()
    collapse: bool = False

    def __post_init__(self) -> None:
        for name in ("negatives", "like", "unlike"):  # a list given is kept as a tuple: the query stays immutable
            object.__setattr__(self, name, tuple(getattr(self, name)))

    @property
    def searched(self) -> TableName:
        """The table the query searches: its target, or the other modality's."""
        if self.target is not None:
            return "images" if self.target == "images" else "texts"
        return "images" if self.text is not None or self.like else "texts"

    @property
    def batchable(self) -> bool:
        """A plain text finding images: `batch` answers such queries together."""
        return self.text is not None and self.image is None and self.searched == "images" and not self.negatives

    def check(self, spelling: Spelling = LIBRARY) -> None:
        """Refuse a query that cannot be answered, with one line in the caller's words: every
        caller checks here, so they all accept and refuse the same queries."""
        text, image, target = self.text, self.image, self.target
        self._check_like(spelling)
        if text is None and image is None and not self.like:
            raise BtsearchError(f"give either {spelling.text} or {spelling.image} (or both: images like the image that match the text), or {spelling.like} ID")
        if self.k < 1:
            raise BtsearchError(f"{spelling.k} must be at least 1")
        if self.offset < 0:
            raise BtsearchError(f"{spelling.offset} must be 0 or more (the hits to skip)")
        if self.candidates is not None and self.candidates < 1:
            raise BtsearchError(f"{spelling.candidates} must be at least 1 ({spelling.no_rerank} ranks by ITC alone)")
        if target is not None and target not in TABLES:
            raise BtsearchError(f"unknown target {target!r}: choose images or texts")
        if text is not None and not text.strip():
            raise BtsearchError("the text query is empty")
        if text is not None and image is not None and target == "texts":
            raise BtsearchError(f"a text with an image finds images like the image: drop {spelling.target} texts")
        if self.negatives:
            if self.searched != "images":
                raise BtsearchError(f"{spelling.negatives} pushes away images: it needs a search of images (a text, or {spelling.target} images)")
            if any(not negative.strip() for negative in self.negatives):
                raise BtsearchError(f"a {spelling.negatives} text is empty")
        if self.collapse and self.searched != "images":
            raise BtsearchError(f"{spelling.collapse} shows one image per group of duplicates: it needs a search of images")
        where = self.where
        if where is not None and (not where.strip() or len(where) > MAX_WHERE_CHARS):
            raise BtsearchError(f"{spelling.where} needs a SQL condition of 1 to {MAX_WHERE_CHARS} characters, e.g. \"width >= 1000\"")
        if self.min_match is not None:
            if not 0.0 <= self.min_match <= 1.0:  # NaN fails this too
                raise BtsearchError(f"{spelling.min_match} is a probability: give a number from 0 to 1, not {self.min_match}")
            if not self.rerank:
                raise BtsearchError(f"{spelling.min_match} keeps re-ranked hits by their match probability: drop {spelling.no_rerank}")

    def _check_like(self, spelling: Spelling) -> None:
        if not (self.like or self.unlike):
            return
        if self.image is not None:
            raise BtsearchError(f"{spelling.like} and {spelling.unlike} search with stored images: drop {spelling.image}")
        if self.target == "texts":
            raise BtsearchError(f"{spelling.like} and {spelling.unlike} find images: drop {spelling.target} texts")
        if self.unlike and not self.like and self.text is None:
            raise BtsearchError(f"{spelling.unlike} pushes away from what is asked: give {spelling.like} ID or {spelling.text} too")
        if any(item < 0 for item in self.like + self.unlike):
            raise BtsearchError(f"{spelling.like} and {spelling.unlike} take image ids, which are 0 or more")


def like_vector(embeddings: np.ndarray) -> np.ndarray:
    """One direction for several stored images (n, D): their mean embedding, normalised, so that
    liking more images does not weigh more than a text beside them."""
    mean = np.asarray(embeddings, dtype=np.float64).mean(axis=0)
    norm = float(np.linalg.norm(mean))
    return np.asarray(mean / norm if norm > 0 else mean, dtype=np.float32)


def query_vector(positives: Sequence[np.ndarray], negatives: Sequence[np.ndarray]) -> np.ndarray:
    """The ITC vector whose inner product with a unit x is the recall score s(x) (module docstring)."""
    vector = np.mean(positives, axis=0)
    if len(negatives):
        vector = vector - NEGATIVE_WEIGHT * np.mean(negatives, axis=0)
    return np.ascontiguousarray(vector, dtype=np.float32)
