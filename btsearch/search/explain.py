"""Why this hit: where a text's words look in an image, read from the cross-modal layers.

For a (text, image) pair the cross-modal encoder is run in full (`Encoder.text_attentions`:
every text position, every layer, every head), and three things are read from it:

- **The heat map** (`Explanation.grid`, G x G with G = image_size / patch_size from the config):
  the text tokens' cross-attention probabilities over the image's patch tokens, averaged over
  the cross-modal layers, their heads and the text's word tokens (special tokens <s>, </s> and
  padding left out), the image [CLS] token dropped, then divided by its sum, so the grid sums to
  1: a distribution over patches. What went to the image [CLS] instead is `patch_share`'s
  complement (`patch_share` = the averaged attention the patches got, before the division).
  Each word has its own map the same way, over its own sub-tokens (`word_grids`).
- **The words' weights** (`Explanation.weights`, summing to 1 over the words): how much the text
  [CLS] position, the one the ITM head reads (through the pooler), attends to each word in the
  cross-modal text layers' self-attention, averaged over layers and heads, summed over the
  word's sub-tokens and renormalised over the words. A word is what the user typed between
  spaces: a maximal run of sub-tokens with no gap between their character spans (BPE splits
  "grassland," into several; they are one word, shown without the punctuation around it).
- **The match probability**: softmax of the ITM head's logits in the same pass (as search's).

Attention is where the model looked, not a proof of why it decided; the map shows it over the
picture as the model saw it: the processor's resize and centre crop (`Explanation.picture`).
The image side is computed from the file (exact), never from the float16 re-rank cache.
"""

from __future__ import annotations

import io
import json
import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from ..errors import BtsearchError, CollectionError, ImageReadError
from ..media.crops import decode_crop
from ..media.images import load_rgb
from ..media.video import VideoFrame, read_frame, row_source
from .ranking import match_probability
from .results import Hit, SearchResult

if TYPE_CHECKING:
    from ..indexers import MetadataStore
    from ..indexers.pixel_store import PixelStore
    from ..model.bridgetower import TowerOutput
    from ..model.encoder import Encoder

DISPLAY_SIZE = 384  # pixels a side of each drawn map (the crop itself is 288 or 294 for the hub models)
PANEL_WORDS = 3  # word maps drawn beside the whole text's map by `write_explanations`
JSON_WORDS = 5  # top words listed per hit in explanations.json
HEAT_ALPHA = 0.55  # how much of each drawn pixel is the heat colour
# A dark-to-bright ramp (black, purple, red, orange, pale yellow): low attention is dark.
# English function words, left out of the "words that weigh most" lists (every word keeps its weight).
STOP_WORDS = frozenset(
    "a an the of in on at to for with from by and or but is are was were be been being this that these those it its "
    "as into onto over under near next some any there here his her their our your my".split()
)
HEAT_RAMP = np.array([[0, 0, 4], [81, 18, 124], [183, 55, 121], [252, 137, 97], [252, 253, 191]], dtype=np.float64)


@dataclass
class Explanation:
    text: str
    words: list[str]  # in the text's order
    word_tokens: list[list[int]]  # each word's token positions in the tokenized text
    weights: np.ndarray  # (W,) float64, sums to 1: the text [CLS]'s attention to each word
    grid: np.ndarray  # (G, G) float64, sums to 1: the word tokens' attention over the patches
    word_grids: np.ndarray  # (W, G, G) float64, each sums to 1: one word's attention over the patches
    patch_share: float  # of the word tokens' cross-attention, the part on patches (the rest: image [CLS])
    itm_score: float  # the ITM match logit
    match: float  # P(match), softmax of the ITM head's two logits
    picture: Image.Image  # the image as the model saw it (the processor's crop)
    truncated: bool  # the text was cut to the model's maximum length (later words are absent)

    @property
    def grid_size(self) -> int:
        return int(self.grid.shape[0])

    def top_words(self, n: int = JSON_WORDS) -> list[tuple[int, str, float]]:
        """The n heaviest words, heaviest first: (index in `words`, word, weight). Function words
        ("a", "the", "of", ...) are passed over unless the text has nothing else: the model often
        parks attention on them, and they tell a reader nothing about the picture."""
        order = np.argsort(-self.weights, kind="stable")
        content = [i for i in order if self.words[i].lower() not in STOP_WORDS]
        return [(int(i), self.words[i], float(self.weights[i])) for i in (content or list(order))[:n]]

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text, "match": self.match, "itm_score": self.itm_score, "truncated": self.truncated,
            "words": [{"word": word, "weight": float(weight)} for word, weight in zip(self.words, self.weights)],
            "top_words": [{"index": i, "word": word, "weight": weight} for i, word, weight in self.top_words()],
            "grid_size": self.grid_size, "grid": self.grid.tolist(), "patch_share": self.patch_share,
        }


def merge_words(text: str, offsets: Sequence[tuple[int, int]], special: Sequence[bool]) -> list[tuple[str, list[int]]]:
    """Sub-tokens into words: (word, token positions) in order. Special tokens and tokens that
    cover no text are in no word; a token starts a new word where a gap (whitespace) lies between
    its span and the previous token's. Punctuation around a word is kept out of its label."""
    words: list[tuple[int, int, list[int]]] = []  # (start, end, positions)
    for position, ((start, end), is_special) in enumerate(zip(offsets, special)):
        if is_special or end <= start:
            continue
        if words and start <= words[-1][1]:  # touches (or shares a byte-split character with) the last word
            first, _, positions = words[-1]
            words[-1] = (first, max(end, words[-1][1]), positions + [position])
        else:
            words.append((start, end, [position]))
    return [(text[start:end].strip(string.punctuation) or text[start:end], positions) for start, end, positions in words]


def explain(encoder: Encoder, text: str, picture: Image.Image, image_states: TowerOutput | None = None) -> Explanation:
    """Explain the pair (text, picture); `image_states` (the picture's, with bridge inputs) saves
    running the image tower again when one picture meets several texts."""
    if not encoder.has_itm:
        raise BtsearchError("this checkpoint has no ITM head: its cross-modal layers were not trained to match, so there is nothing to explain")
    if not text.strip():
        raise BtsearchError("the text to explain is empty")
    side = _grid_side(encoder)
    pixels = encoder.prepare_image(picture)
    image = image_states or encoder.image_states(pixels[None], with_bridge=True)
    text_states = encoder.text_states([text], with_bridge=True)
    self_attention, cross_attention, logits = encoder.text_attentions(text_states, image)
    if cross_attention.shape[-1] != side * side + 1:
        raise BtsearchError(f"the image has {cross_attention.shape[-1] - 1} patches, not the config's {side} x {side}: it cannot be drawn as a grid")

    tokenizer = encoder.processor.tokenizer
    tokens = tokenizer(text, truncation=True, max_length=encoder.max_text_length, return_offsets_mapping=True, return_special_tokens_mask=True)
    # Where the tokens sit in the model's (padded) sequence: its unmasked positions, in order.
    assert text_states.mask is not None
    mask = text_states.mask[0].cpu().numpy()
    positions = np.flatnonzero(mask)
    assert len(positions) == len(tokens["input_ids"]), "the model's tokens and the offsets' differ"
    merged = merge_words(text, tokens["offset_mapping"], [bool(s) for s in tokens["special_tokens_mask"]])
    if not merged:
        raise BtsearchError(f"the text {text!r} has no words the model reads")
    words = [word for word, _ in merged]
    word_tokens = [[int(positions[p]) for p in token_list] for _, token_list in merged]

    cls_attention = self_attention[:, :, 0, :].astype(np.float64).mean(axis=(0, 1))  # (T,)
    mass = np.array([cls_attention[t].sum() for t in word_tokens])
    weights = mass / mass.sum() if mass.sum() > 0 else np.full(len(words), 1.0 / len(words))
    on_patches = cross_attention[:, :, :, 1:].astype(np.float64).mean(axis=(0, 1))  # (T, side²), image [CLS] dropped
    every_word = on_patches[[t for tokens_of_word in word_tokens for t in tokens_of_word]].mean(axis=0)
    word_maps = np.stack([on_patches[t].mean(axis=0) for t in word_tokens])
    probability = float(match_probability(logits[None].astype(np.float32))[0])
    return Explanation(
        text=text, words=words, word_tokens=word_tokens, weights=weights,
        grid=_normalised(every_word).reshape(side, side), word_grids=np.stack([_normalised(m) for m in word_maps]).reshape(-1, side, side),
        patch_share=float(every_word.sum()), itm_score=float(logits[1]), match=probability,
        picture=_as_seen(pixels, picture), truncated=encoder.is_truncated(text),
    )


def explain_file(encoder: Encoder, text: str, path: str | Path | VideoFrame) -> Explanation:
    """Explain (text, the image file at `path`, or a video's frame); BtsearchError (one line) when
    it cannot be read."""
    return explain(encoder, text, read_frame(path) if isinstance(path, VideoFrame) else load_rgb(path))


def explain_crop(encoder: Encoder, text: str, crop: np.ndarray) -> Explanation:
    """Explain (text, a stored crop: the model's uint8 input, (3, S, S))."""
    return explain(encoder, text, Image.fromarray(crop.transpose(1, 2, 0)), encoder.image_states(crop[None], with_bridge=True))


def explain_stored_image(encoder: Encoder, store: MetadataStore, text: str, image_id: int, pixels: PixelStore | None = None) -> Explanation:
    """Explain (text, the collection's image `image_id`) as search re-ranks it: from its stored
    crop where the pixel store has one that decodes, else from its file."""
    try:
        row = store.get_images([image_id])[0]
    except KeyError:
        raise CollectionError(f"no image with id {image_id} in the collection") from None
    return _explain_image(encoder, text, row_source(row), image_id, pixels)


def _explain_image(encoder: Encoder, text: str, path: str | VideoFrame, image_id: int, pixels: PixelStore | None) -> Explanation:
    stored = pixels.get([image_id]).get(image_id) if pixels is not None else None
    if stored is not None:
        try:
            return explain_crop(encoder, text, decode_crop(stored, encoder.crop_size))
        except ImageReadError:
            pass  # a damaged row: the file, as re-ranking does
    return explain_file(encoder, text, path)


# -- drawing ------------------------------------------------------------------------------------


def render(explanation: Explanation, word: int | None = None, size: int = DISPLAY_SIZE) -> Image.Image:
    """The picture as the model saw it with a heat map over it: the whole text's (`word` None)
    or one word's (`word` = its index in `explanation.words`). The grid is resized bilinearly to
    the picture and stretched from its minimum (darkest) to its maximum (brightest): the colours
    compare patches of one map, not maps (the grids' values do that)."""
    if word is not None and not 0 <= word < len(explanation.words):
        raise BtsearchError(f"word must be 0..{len(explanation.words) - 1} (the text has {len(explanation.words)} words), not {word}")
    grid = explanation.grid if word is None else explanation.word_grids[word]
    heat = np.asarray(Image.fromarray(grid.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64)
    spread = heat.max() - heat.min()
    heat = (heat - heat.min()) / spread if spread > 1e-12 else np.zeros_like(heat)
    base = np.asarray(explanation.picture.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float64)
    blended = (1 - HEAT_ALPHA) * base + HEAT_ALPHA * _heat_colours(heat)
    return Image.fromarray(np.clip(np.rint(blended), 0, 255).astype(np.uint8))


def render_panels(explanation: Explanation, words: int = PANEL_WORDS, size: int = DISPLAY_SIZE) -> Image.Image:
    """The text explained on top; the whole text's map, then the `words` heaviest words' maps,
    side by side, each labelled; under them the colour scale (each map stretched to its own range)."""
    line = 22
    panels = [(render(explanation, size=size), f"all words  match {explanation.match:.3f}")]
    panels += [(render(explanation, index, size), f"{word}  {weight:.2f}") for index, word, weight in explanation.top_words(words)]
    width = max(len(panels) * size + (len(panels) - 1) * 4, 280)  # room for the scale and its words
    sheet = Image.new("RGB", (width, line + size + 2 * line), "white")
    draw = ImageDraw.Draw(sheet)
    fits = max(8, width // 6)  # characters of the default font that fit across the sheet
    title = explanation.text if len(explanation.text) <= fits else explanation.text[: fits - 3] + "..."
    draw.text((4, 5), title, fill="black")
    for n, (panel, label) in enumerate(panels):
        sheet.paste(panel, (n * (size + 4), line))
        draw.text((n * (size + 4) + 4, line + size + 4), label, fill="black")
    scale_width = min(size, width - 150)
    ramp = _heat_colours(np.linspace(0.0, 1.0, scale_width)[None].repeat(10, axis=0))
    scale_top = line + size + line + 6
    draw.text((4, scale_top), "least", fill="black")
    sheet.paste(Image.fromarray(np.rint(ramp).astype(np.uint8)), (48, scale_top + 1))
    draw.text((56 + scale_width, scale_top), "most attention", fill="black")
    return sheet


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# -- a search result's hits -----------------------------------------------------------------------


class _WithModel(Protocol):
    """What `write_explanations` needs of a collection: its model and its pixel store."""

    encoder: Encoder | None
    pixels: PixelStore | None


def prepare_explanations(encoder: Encoder | None, text: str | None, target: str, folder: str | Path) -> Path:
    """Refuse what cannot be explained (no model, no ITM head, a search without both a text and
    an image: `target` is what it searches), then make `folder`. The CLI calls it before
    searching, so a bad request costs no search and leaves no folder."""
    if encoder is None:
        raise BtsearchError("the collection was opened without its model: nothing to explain with")
    if not encoder.has_itm:
        raise BtsearchError("--explain needs the ITM head, which this checkpoint lacks: there is no cross-modal match to explain")
    if target == "images" and text is None:
        raise BtsearchError("--explain shows where a text's words look in an image: an image-to-image search has no text")
    if target == "texts" and text is not None:
        raise BtsearchError("--explain shows where a text's words look in an image: a text-to-text search has no image")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise BtsearchError(f"--explain {folder}: it exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise BtsearchError(f"--explain {folder}: cannot make the folder: {error.strerror or error}") from None
    return folder


def write_explanations(collection: _WithModel, result: SearchResult, text: str | None, folder: str | Path) -> list[str]:
    """Explain every hit of `result` into `folder` (created): `<rank>-<id>.png` per hit (the
    whole text's map and its heaviest words' maps, `render_panels`) and one `explanations.json`.
    A text -> images result pairs `text` (the query) with each hit's image; an image -> texts
    result pairs each hit's text with the query image (`result.query`, its path). Returns lines
    for the user: what was written, and each hit skipped with its reason."""
    encoder = collection.encoder
    folder = prepare_explanations(encoder, text, result.target, folder)
    assert encoder is not None
    pairs = _pairs(result, text)
    query_picture = query_states = None
    if result.target == "texts":  # one query image for every hit: read it and run its tower once
        query_picture = load_rgb(result.query)
        query_states = encoder.image_states(encoder.prepare_image(query_picture)[None], with_bridge=True)
    lines: list[str] = []
    entries: list[dict[str, Any]] = []
    for hit, pair_text, image_path in pairs:
        try:
            if query_picture is not None:
                explanation = explain(encoder, pair_text, query_picture, query_states)
            else:
                explanation = _explain_image(encoder, pair_text, image_path, hit.id, collection.pixels)
        except BtsearchError as error:
            lines.append(f"skipped hit #{hit.rank} (id {hit.id}): {error}")
            continue
        png = f"{hit.rank}-{hit.id}.png"
        render_panels(explanation).save(folder / png)
        entries.append({
            "rank": hit.rank, "id": hit.id, result.field: getattr(hit, result.field), "match": explanation.match,
            "itm_score": explanation.itm_score, "top_words": [{"word": w, "weight": weight} for _, w, weight in explanation.top_words()],
            "png": png,
        })
    document = {"query": result.query, "target": result.target, "explanations": entries}
    (folder / "explanations.json").write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    lines.append(f"wrote {len(entries)} explanation{'s' if len(entries) != 1 else ''} to {folder}")
    return lines


def _pairs(result: SearchResult, text: str | None) -> list[tuple[Hit, str, str | VideoFrame]]:
    """(hit, text, image path) of each hit to explain (of a search `prepare_explanations` passed);
    a video's moment: its best frame."""
    if result.target == "images":
        assert text is not None
        return [(hit, text, hit.path if hit.t is None else VideoFrame(Path(hit.path), hit.t)) for hit in result.hits if hit.path is not None]
    if not Path(result.query).is_file():
        raise BtsearchError(f"--explain needs the query image's file, and {result.query!r} is not one")
    return [(hit, hit.text, result.query) for hit in result.hits if hit.text is not None]


def _grid_side(encoder: Encoder) -> int:
    vision = encoder.model.config.vision_config
    return int(vision.image_size // vision.patch_size)


def _normalised(values: np.ndarray) -> np.ndarray:
    total = values.sum()
    return values / total if total > 0 else np.full_like(values, 1.0 / values.size)


def _as_seen(pixels: np.ndarray, picture: Image.Image) -> Image.Image:
    """The picture as the model saw it: the processor's uint8 crop, or (for a processor that
    resizes in floats) the same centre square of the picture."""
    if pixels.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)))
    side = int(pixels.shape[-1])
    return ImageOps.fit(picture, (side, side), Image.Resampling.BICUBIC)


def _heat_colours(heat: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] to (H, W, 3) colours along `HEAT_RAMP`."""
    stops = np.linspace(0.0, 1.0, len(HEAT_RAMP))
    return np.stack([np.interp(heat, stops, HEAT_RAMP[:, channel]) for channel in range(3)], axis=-1)
