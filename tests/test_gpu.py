"""On a CUDA GPU: transformers' numbers on the same device in fp32, half precision that stays
close to fp32, and a collection indexed and searched there end to end.

Skipped where torch sees no CUDA device (CI has none); run on a lent GPU machine."""

import json
import math

import numpy as np
import pytest
import torch

from btsearch.media.images import load_rgb
from btsearch.model.encoder import Encoder

from . import reference
from .helpers import run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TEXTS = ["a cat", "an astronaut in an orange space suit smiling in front of a flag", "a cup of coffee on a red saucer"]
QUERY = "a close up of a tabby cat"


def _pixels(encoder, photos):
    return np.stack([encoder.preprocess_image(load_rgb(p)) for p in photos])


def test_fp32_on_cuda_equals_transformers_on_cuda(random_checkpoint, photos):
    encoder = Encoder.from_pretrained(str(random_checkpoint), device="cuda", precision="fp32")
    assert encoder.device.type == "cuda" and encoder.dtype == torch.float32
    images = photos[: len(TEXTS)]
    ref_text, ref_image = reference.itc_embeddings(random_checkpoint, TEXTS, images, device="cuda")
    pixels = _pixels(encoder, images)
    np.testing.assert_allclose(encoder.embed_texts(TEXTS), ref_text, atol=1e-5)
    np.testing.assert_allclose(encoder.embed_pixels(pixels), ref_image, atol=1e-5)
    image_states = encoder.image_states(pixels, with_bridge=True)
    np.testing.assert_allclose(image_states.embeds.cpu().numpy(), ref_image, atol=1e-5)
    for text in TEXTS:
        ours = encoder.match(encoder.text_states([text], with_bridge=True), image_states)
        theirs = [reference.itm_logit(random_checkpoint, text, image, device="cuda") for image in images]
        np.testing.assert_allclose(ours, theirs, atol=1e-4)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_on_cuda_stays_close_to_fp32(random_checkpoint, photos, precision):
    exact = Encoder.from_pretrained(str(random_checkpoint), device="cuda", precision="fp32")
    fast = Encoder.from_pretrained(str(random_checkpoint), device="cuda", precision=precision)
    assert fast.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    cosine = np.sum(exact.embed_texts(TEXTS) * fast.embed_texts(TEXTS), axis=1)
    assert cosine.min() > 0.98
    pixels = _pixels(exact, photos[:4])
    cosine = np.sum(exact.embed_pixels(pixels) * fast.embed_pixels(pixels), axis=1)
    assert cosine.min() > 0.98
    scores = [e.match(e.text_states([TEXTS[0]], with_bridge=True), e.image_states(pixels, with_bridge=True)) for e in (exact, fast)]
    assert np.isfinite(scores[1]).all()
    np.testing.assert_allclose(scores[0], scores[1], atol=0.1)


ITM_TOLERANCE = 0.25  # an ITM logit in half precision against fp32
# Hits rank by log P(match) = log sigmoid(logit difference): 1-Lipschitz in the difference, which
# moves by at most both logits' tolerance.
KEY_TOLERANCE = 2 * ITM_TOLERANCE


def rank_key(hit: dict) -> float:
    """log P(match), what re-ranked hits are ordered by (a float32 P of 0 stands for any tinier one)."""
    return math.log(max(hit["match"], 1e-45))


def assert_ranks_alike(fast: list[dict], exact: list[dict]) -> None:
    """One search's hits in half precision and in fp32, every item present and re-ranked in
    both: each item's scores within tolerance, and two items in the fp32 order wherever their
    fp32 rank keys differ by more than the two runs' tolerances together; nearer than that,
    either order is right (a half-precision rounding may swap them)."""
    assert sorted(h["id"] for h in fast) == sorted(h["id"] for h in exact)
    assert all(h["itm_score"] is not None for h in fast + exact)
    found = {h["id"]: h for h in fast}
    position = {h["id"]: n for n, h in enumerate(fast)}
    for want in exact:
        got = found[want["id"]]
        assert got["itm_score"] == pytest.approx(want["itm_score"], abs=ITM_TOLERANCE)
        assert got["match"] == pytest.approx(want["match"], abs=KEY_TOLERANCE / 4)  # sigmoid: slope at most 1/4
    ordered = 0
    for a in exact:
        for b in exact:
            if rank_key(a) - rank_key(b) > 2 * KEY_TOLERANCE:
                assert position[a["id"]] < position[b["id"]], (a, b)
                ordered += 1
    assert ordered > 0  # the scores spread: some order is checked


def test_collection_indexed_and_searched_on_cuda_ranks_as_on_the_cpu(tmp_path, trained_checkpoint, photos, photo_captions):
    """Indexing (pinned transfers, the re-rank cache) and both searches on the GPU in its default
    precision: the hits of the CPU in fp32, scores within half precision's error, and orders the
    same wherever the scores are further apart than that error."""
    db = tmp_path / "db"
    run("index", photos[0].parent, "--db", db, "--model", trained_checkpoint, "--rerank-cache", "--device", "cuda", "--quiet")
    captions = tmp_path / "captions.txt"
    texts = [c for cs in photo_captions.values() for c in cs]
    captions.write_text("\n".join(texts) + "\n", encoding="utf-8")
    run("add-texts", captions, "--db", db, "--device", "cuda")

    def search(*args, device, precision="auto"):
        out = run("search", *args, "--db", db, "--device", device, "--precision", precision, "--json").output
        return json.loads(out)["hits"]

    # Every image (and below every text) returned and re-ranked: 128 candidates by default on a GPU.
    gpu = search(QUERY, "-k", len(photos), device="cuda")
    cpu = search(QUERY, "-k", len(photos), "--candidates", len(photos), device="cpu", precision="fp32")
    assert_ranks_alike(gpu, cpu)
    assert cpu[0]["path"].endswith("chelsea.jpg")  # the trained checkpoint finds the cat its caption names

    astronaut = next(p for p in photos if p.stem == "astronaut")
    gpu = search("--image", astronaut, "-k", len(texts), device="cuda")
    cpu = search("--image", astronaut, "-k", len(texts), "--candidates", len(texts), device="cpu", precision="fp32")
    assert_ranks_alike(gpu, cpu)
    assert cpu[0]["text"] in photo_captions["astronaut"]


# nvJPEG may round a decoded pixel differently from libjpeg (PIL); both stay within the pixel
# tier's tolerance of the exact path (tests/test_pixels.py), which bounds their difference here.
# Written without a GPU lent: not yet run (docs/speed.md).
PIXEL_ITM_TOLERANCE, PIXEL_MATCH_TOLERANCE = 0.25, 0.02


def test_crops_decoded_on_the_gpu_score_as_those_decoded_by_pil(tmp_path, trained_checkpoint, photos):
    pytest.importorskip("torchvision.io", reason="decoding on the GPU needs torchvision")
    from btsearch.indexers.pixel_store import PixelStore
    from btsearch.media.crops import decode_crop, encode_crop
    from btsearch.model.pixels import decode_crops_on_device, decodes_on_device
    from btsearch.search.ranking import match_probability
    from btsearch.search.reranker import Reranker

    encoder = Encoder.from_pretrained(str(trained_checkpoint), device="cuda", precision="fp32")
    assert decodes_on_device(encoder.device)
    blobs = [encode_crop(encoder.prepare_image(load_rgb(path))) for path in photos]
    decoded = decode_crops_on_device([*blobs[:2], b"\xff\xd8 not a jpeg"], encoder.crop_size, encoder.device)
    assert decoded[0].is_cuda and decoded[0].dtype == torch.uint8 and tuple(decoded[0].shape) == (3, encoder.crop_size, encoder.crop_size)
    assert np.abs(decoded[0].cpu().numpy().astype(int) - decode_crop(blobs[0]).astype(int)).mean() < 1  # a level at most, on average
    assert isinstance(decoded[2], str) and "do not decode" in decoded[2]

    ids = np.arange(len(photos))
    store = PixelStore.open(tmp_path, create=True)
    store.append(ids, blobs)
    query = encoder.text_states([QUERY], with_bridge=True)
    on_gpu = Reranker(encoder, pixels=store).score_images(query, photos, ids)
    with_pil = Reranker(encoder, pixels=store, decode_on_device=False).score_images(query, photos, ids)
    assert on_gpu.tiers == with_pil.tiers == ["pixels"] * len(photos)
    np.testing.assert_allclose(on_gpu.logits[0][:, 1], with_pil.logits[0][:, 1], atol=PIXEL_ITM_TOLERANCE)
    np.testing.assert_allclose(match_probability(on_gpu.logits[0]), match_probability(with_pil.logits[0]), atol=PIXEL_MATCH_TOLERANCE)
