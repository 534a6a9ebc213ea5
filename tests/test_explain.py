"""Why this hit: the cross-modal attentions against transformers' own modules, the words and the
heat map as `btsearch.search.explain` defines them, and `search --explain`, the API and its errors."""

import dataclasses
import io
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient
from PIL import Image
from transformers import BridgeTowerModel, BridgeTowerProcessor

from btsearch.cli.main import main
from btsearch.collection import Collection
from btsearch.demo.small_checkpoint import small_config
from btsearch.errors import BtsearchError
from btsearch.media.images import load_rgb
from btsearch.model.encoder import Encoder
from btsearch.model.managertower import ManagerTowerRetrievalModel, managertower_config
from btsearch.search.explain import explain, merge_words, render, render_panels, write_explanations
from btsearch.serve.app import create_app

from . import reference
from .helpers import run

QUERY = "a close up of a tabby cat"


@pytest.fixture(scope="module")
def encoder(random_checkpoint):
    return Encoder.from_pretrained(str(random_checkpoint), precision="fp32")


@pytest.fixture(scope="module")
def collection(tmp_path_factory, trained_checkpoint, photos, photo_captions):
    db = tmp_path_factory.mktemp("explain") / "db"
    run("index", photos[0].parent, "--db", db, "--model", trained_checkpoint, "--precision", "fp32", "--quiet")
    captions = tmp_path_factory.mktemp("explain-texts") / "captions.txt"
    captions.write_text("\n".join(c for cs in photo_captions.values() for c in cs) + "\n", encoding="utf-8")
    run("add-texts", captions, "--db", db, "--precision", "fp32", "--quiet")
    return db


def _states(encoder, text, picture):
    return encoder.text_states([text], with_bridge=True), encoder.image_states(encoder.prepare_image(picture)[None], with_bridge=True)


def _hooked_text_cross_attentions(layers):
    """Forward hooks on each text cross-modal layer's `BridgeTowerCrossAttention`: what it returns
    as its probabilities, per call, in order."""
    seen: list[torch.Tensor] = []
    hooks = [layer.crossattention.self.register_forward_hook(lambda module, args, out: seen.append(out[1])) for layer in layers]
    return seen, hooks


# -- the model's attentions -------------------------------------------------------------------------


def test_text_attentions_equal_transformers_bridgetower_model(encoder, random_checkpoint, photos):
    """transformers' BridgeTowerModel(output_attentions=True) returns each cross-modal layer's
    (text, image) *self*-attentions as `attentions` and no cross-attentions: those are read from
    its text BridgeTowerCrossAttention modules during the same forward."""
    picture = load_rgb(photos[0])
    text = "two tabby cats, sleeping on a sofa"
    text_self, text_cross, logits = encoder.text_attentions(*_states(encoder, text, picture))

    processor = BridgeTowerProcessor.from_pretrained(random_checkpoint)
    model = BridgeTowerModel.from_pretrained(random_checkpoint).eval()
    seen, hooks = _hooked_text_cross_attentions(model.cross_modal_text_layers)
    with torch.no_grad():
        out = model(**processor(images=[picture], text=[text], return_tensors="pt"), output_attentions=True)
    for hook in hooks:
        hook.remove()
    layers = model.config.num_hidden_layers
    assert len(seen) == layers and text_cross.shape == (layers, model.config.num_attention_heads, *seen[0].shape[-2:])
    np.testing.assert_allclose(text_cross, torch.stack(seen, dim=1)[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(text_self, torch.stack([pair[0] for pair in out.attentions], dim=1)[0].numpy(), atol=1e-5)
    assert text_cross.shape[-1] == 1 + (model.config.vision_config.image_size // model.config.vision_config.patch_size) ** 2
    np.testing.assert_allclose(text_cross.sum(axis=-1), 1.0, atol=1e-5)  # probabilities over the image tokens
    assert logits[1] == pytest.approx(reference.itm_logit(random_checkpoint, text, photos[0]), abs=1e-4)


def test_managertower_text_attentions_equal_its_own_layers(random_checkpoint, photos):
    """No transformers class runs ManagerTower: its attentions are checked against the cross-modal
    modules' own probabilities while `match_logits` runs (full layers, then [CLS] in the last)."""
    processor = BridgeTowerProcessor.from_pretrained(random_checkpoint)
    torch.manual_seed(3)
    model = ManagerTowerRetrievalModel(managertower_config(small_config(len(processor.tokenizer), num_hidden_layers=3), managed_layers=2)).eval()
    encoder = Encoder(model, processor, "managertower-random", torch.device("cpu"), has_itm=True)
    text, image = _states(encoder, QUERY, load_rgb(photos[1]))
    text_self, text_cross, logits = encoder.text_attentions(text, image)

    seen, hooks = _hooked_text_cross_attentions(model.cross_modal_text_layers)
    expected_logits = encoder.match(text, image, both=True)[0]
    for hook in hooks:
        hook.remove()
    np.testing.assert_allclose(logits, expected_logits, atol=1e-5)
    for layer, probabilities in enumerate(seen[:-1]):
        np.testing.assert_allclose(text_cross[layer], probabilities[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(text_cross[-1][:, :1], seen[-1][0].numpy(), atol=1e-6)  # the last layer: [CLS] alone
    padding = text.mask[0].numpy() == 0  # texts pad to the training length here; padding gets no attention
    assert padding.any() and np.all(text_self[..., padding] == 0)


# -- words and the heat map ---------------------------------------------------------------------------


def test_merge_words_joins_sub_tokens_and_drops_specials():
    # "a tabby-cat, sleeping" as byte-level BPE splits it: <s> a Ġtab by - c at , Ġs le ep ing </s> <pad>
    text = "a tabby-cat, sleeping"
    offsets = [(0, 0), (0, 1), (2, 5), (5, 7), (7, 8), (8, 9), (9, 11), (11, 12), (13, 14), (14, 16), (16, 18), (18, 21), (0, 0), (0, 0)]
    special = [True] + [False] * 11 + [True, True]
    assert merge_words(text, offsets, special) == [("a", [1]), ("tabby-cat", [2, 3, 4, 5, 6, 7]), ("sleeping", [8, 9, 10, 11])]
    # A character split into several byte tokens (same span) stays one word; "..." alone is kept.
    assert merge_words("café ...", [(0, 3), (3, 4), (3, 4), (5, 8)], [False] * 4) == [("café", [0, 1, 2]), ("...", [3])]


def test_explanation_words_weights_and_grid_follow_their_definitions(encoder, random_checkpoint, photos):
    text = "a man riding a bicycle down a busy city street"
    picture = load_rgb(photos[2])
    found = explain(encoder, text, picture)
    assert found.words == text.split()  # every word once, in order, specials dropped

    tokens = encoder.processor.tokenizer(text)["input_ids"]
    assert [t for word in found.word_tokens for t in word] == list(range(1, len(tokens) - 1))  # all but <s> and </s>
    decoded = [encoder.processor.tokenizer.decode([tokens[t] for t in word]).strip() for word in found.word_tokens]
    assert decoded == found.words

    text_self, text_cross, logits = encoder.text_attentions(*_states(encoder, text, picture))
    cls = text_self[:, :, 0, :].mean(axis=(0, 1))
    mass = np.array([cls[word].sum() for word in found.word_tokens])
    np.testing.assert_allclose(found.weights, mass / mass.sum(), atol=1e-6)
    assert found.weights.sum() == pytest.approx(1.0)

    vision = encoder.model.config.vision_config
    side = vision.image_size // vision.patch_size
    every = [t for word in found.word_tokens for t in word]
    patches = text_cross[:, :, every, 1:].mean(axis=(0, 1, 2))  # layers, heads and word tokens; image [CLS] dropped
    assert found.grid.shape == (side, side) and found.grid_size == side
    np.testing.assert_allclose(found.grid, (patches / patches.sum()).reshape(side, side), atol=1e-6)
    assert found.grid.sum() == pytest.approx(1.0) and found.patch_share == pytest.approx(patches.sum(), abs=1e-6)
    assert found.word_grids.shape == (len(found.words), side, side)
    np.testing.assert_allclose(found.word_grids.sum(axis=(1, 2)), 1.0)
    assert found.match == pytest.approx(reference.match_probability(random_checkpoint, text, photos[2]), abs=1e-5)
    assert found.itm_score == pytest.approx(float(logits[1]))

    drawn = render(found)
    assert drawn.size == (384, 384) and drawn.mode == "RGB"
    assert render_panels(found, words=2).size == (3 * 384 + 2 * 4, 22 + 384 + 2 * 22)  # title, maps, labels and the colour scale
    with pytest.raises(BtsearchError, match="word must be 0..9"):
        render(found, word=10)


# -- search --explain, the API ------------------------------------------------------------------------


def test_search_explain_writes_a_png_and_the_json_per_hit(collection, tmp_path):
    folder = tmp_path / "why" / "nested"
    result = run("search", QUERY, "--db", collection, "-k", 3, "--candidates", 3, "--precision", "fp32", "--json", "--explain", folder)
    hits = json.loads(result.stdout)["hits"]
    assert f"wrote 3 explanations to {folder}" in result.stderr
    document = json.loads((folder / "explanations.json").read_text())
    assert document["query"] == QUERY and document["target"] == "images"
    entries = document["explanations"]
    assert [(e["rank"], e["id"], e["path"]) for e in entries] == [(h["rank"], h["id"], h["path"]) for h in hits]
    for entry, hit in zip(entries, hits):
        assert entry["png"] == f"{hit['rank']}-{hit['id']}.png"
        assert Image.open(folder / entry["png"]).format == "PNG"
        assert entry["match"] == pytest.approx(hit["match"], abs=1e-5)  # exact states: the same probability as search's
        weights = [w["weight"] for w in entry["top_words"]]
        assert entry["top_words"] and weights == sorted(weights, reverse=True) and all(w["word"] in QUERY.split() for w in entry["top_words"])


def test_search_explain_of_an_image_query_explains_each_text_over_it(collection, photos, tmp_path):
    chelsea = next(p for p in photos if p.name == "chelsea.jpg")
    result = run("search", "--image", chelsea, "--db", collection, "-k", 2, "--candidates", 2, "--precision", "fp32", "--json", "--explain", tmp_path)
    hits = json.loads(result.stdout)["hits"]
    entries = json.loads((tmp_path / "explanations.json").read_text())["explanations"]
    assert [e["text"] for e in entries] == [h["text"] for h in hits]
    assert [e["match"] for e in entries] == pytest.approx([h["match"] for h in hits], abs=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--image", "{photo}", "--target", "images", "--explain", "{out}"], "an image-to-image search has no text"),
        (["a cat", "--target", "texts", "--explain", "{out}"], "a text-to-text search has no image"),
        (["a cat", "--explain", "{blocked}"], "cannot make the folder: Not a directory"),  # a file where a folder must go
    ],
)
def test_explain_refuses_what_it_cannot_explain_in_one_line(collection, photos, tmp_path, args, message):
    (tmp_path / "file").write_text("a file, not a folder")
    names = dict(photo=photos[0], out=tmp_path / "out", blocked=tmp_path / "file" / "maps")
    result = CliRunner().invoke(main, ["search", *[a.format(**names) for a in args], "--db", str(collection), "-k", "1", "--quiet"])
    assert result.exit_code == 1, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_write_explanations_refuses_a_file_for_its_folder_and_skips_unreadable_hits(collection, trained_checkpoint, tmp_path):
    library = Collection.open(collection, encoder=Encoder.from_pretrained(str(trained_checkpoint), precision="fp32"), read_only=True)
    result = library.search(text=QUERY, k=1, candidates=1)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(BtsearchError, match="it exists and is not a folder"):
        write_explanations(library, result, QUERY, tmp_path / "file")
    # A hit whose file has become unreadable is skipped with a line saying so; the others are written.
    (tmp_path / "broken.jpg").write_text("no longer pixels")
    result.hits.append(dataclasses.replace(result.hits[0], rank=2, id=12345, path=str(tmp_path / "broken.jpg")))
    lines = write_explanations(library, result, QUERY, tmp_path / "out")
    assert lines[0].startswith("skipped hit #2 (id 12345): cannot read image") and lines[-1] == f"wrote 1 explanation to {tmp_path / 'out'}"
    assert [e["rank"] for e in json.loads((tmp_path / "out" / "explanations.json").read_text())["explanations"]] == [1]


def test_a_checkpoint_without_itm_head_has_nothing_to_explain(tmp_path, photos):
    from btsearch.demo.small_checkpoint import build_small_checkpoint

    checkpoint = build_small_checkpoint(tmp_path / "itc-only", heads=("itc",))
    db = tmp_path / "db"
    run("index", photos[0], "--db", db, "--model", checkpoint, "--quiet")
    result = run("search", QUERY, "--db", db, "--quiet", "--explain", tmp_path / "out", ok=False)
    assert result.exit_code == 1 and "needs the ITM head" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_collection_explain_and_the_api_agree(collection, trained_checkpoint, photos):
    encoder = Encoder.from_pretrained(str(trained_checkpoint), precision="fp32")
    library = Collection.open(collection, encoder=encoder, read_only=True)
    chelsea = next(p for p in photos if p.name == "chelsea.jpg")
    image_id = int(library.image_ids([chelsea])[0])
    found = library.explain(QUERY, image_id)
    client = TestClient(create_app(collection, encoder=encoder))

    body = client.get("/api/explain", params={"q": QUERY, "image_id": image_id}).json()
    assert body["image_id"] == image_id and body["grid_size"] == found.grid_size
    assert [w["word"] for w in body["words"]] == found.words == QUERY.split()
    np.testing.assert_allclose(body["grid"], found.grid, atol=1e-9)
    assert body["match"] == pytest.approx(found.match) and body["top_words"][0]["word"] == found.top_words(1)[0][1]

    png = client.get(body["png"])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (384, 384)
    # The whole text's map, and one word's: each the library's picture of it. (Not merely two
    # pictures that differ: a briefly trained model may spread every word's attention alike, its
    # maps then a few colour levels apart, and whether they round to other pixels is luck.) The
    # word is the one whose map differs most from the whole text's, so that serving the wrong
    # one fails whenever the checkpoint tells them apart.
    whole = np.asarray(render(found), dtype=np.int16)
    pick = max(range(len(found.words)), key=lambda n: np.abs(np.asarray(render(found, word=n), dtype=np.int16) - whole).max())
    word = client.get("/api/explain.png", params={"q": QUERY, "image_id": image_id, "word": pick})
    assert word.status_code == 200
    for served, expected in ((png, render(found)), (word, render(found, word=pick))):
        pixels = np.asarray(Image.open(io.BytesIO(served.content)).convert("RGB"), dtype=np.int16)
        assert np.abs(pixels - np.asarray(expected, dtype=np.int16)).max() <= 1  # one level: a grid equal to 1e-9 may round apart
    schema = client.get("/openapi.json").json()["paths"]["/api/explain.png"]["get"]["responses"]["200"]["content"]
    assert "image/png" in schema

    assert client.get("/api/explain", params={"q": QUERY, "image_id": 999999}).status_code == 404
    assert "no image with id" in client.get("/api/explain.png", params={"q": QUERY, "image_id": 999999}).json()["detail"]
    missing = client.get("/api/explain", params={"image_id": image_id})  # the schema requires q and image_id
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["query", "q"]
    assert client.get("/api/explain", params={"q": QUERY}).json()["detail"][0]["loc"] == ["query", "image_id"]
    bad_word = client.get("/api/explain.png", params={"q": QUERY, "image_id": image_id, "word": 99})
    assert bad_word.status_code == 404 and "no word 99: the text has 7 words (0..6)" in bad_word.json()["detail"]
    with pytest.raises(BtsearchError, match="no image with id 999999"):
        library.explain(QUERY, 999999)
