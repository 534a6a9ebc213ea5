"""Our split model equals transformers' BridgeTower classes on the same checkpoint."""

import numpy as np
import pytest
import torch
from PIL import Image

from btsearch.demo.small_checkpoint import build_small_checkpoint
from btsearch.media.images import load_rgb
from btsearch.model.encoder import Encoder

from . import reference

TEXTS = [
    "a cat",
    "an astronaut in an orange space suit smiling in front of a flag",
    "a cup of coffee on a red saucer",
]


@pytest.fixture(scope="module")
def encoder(random_checkpoint):
    return Encoder.from_pretrained(str(random_checkpoint), device="cpu", precision="fp32")


def test_preprocessing_equals_processor(encoder, random_checkpoint, photos):
    # Non-square photos and grey ones: the centre crop and RGB conversion must match.
    ours = np.stack([encoder.preprocess_image(load_rgb(p)) for p in photos])
    theirs = reference.pixel_values(random_checkpoint, photos).numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_prepared_bytes_become_the_processors_pixels(encoder, random_checkpoint, photos):
    """Loaders hand over uint8 pixels (resized and cropped only); the table lookup where the
    model runs must give the processor's float32 pixels bit for bit: on the photos, and on
    noise that holds every byte value in every channel."""
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 420, 3), dtype=np.uint8))
    pictures = [load_rgb(p) for p in photos] + [noise]
    prepared = np.stack([encoder.prepare_image(picture) for picture in pictures])
    assert prepared.dtype == np.uint8
    theirs = reference.pixel_values(random_checkpoint, pictures)
    np.testing.assert_array_equal(encoder.pixels_to_model(prepared).numpy(), theirs.numpy())
    np.testing.assert_array_equal(encoder.embed_pixels(prepared), encoder.embed_pixels(theirs))


def test_a_processor_that_resizes_in_floats_gets_its_own_pixels(encoder, random_checkpoint, photos):
    """Should an image processor hand back floats even unscaled, the preparer takes its finished
    pixels instead of bytes, and they still equal the processor's."""
    from btsearch.model.pixels import ImagePreparer

    class FloatProcessor:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, *args, **kwargs):
            features = self.inner(*args, **kwargs)
            features["pixel_values"] = features["pixel_values"].astype(np.float32)
            return features

    prepare = ImagePreparer(FloatProcessor(encoder.processor.image_processor))
    pictures = [load_rgb(p) for p in photos[:3]]
    prepared = np.stack([prepare(picture) for picture in pictures])
    assert prepared.dtype == np.float32 and not prepare.keeps_bytes
    theirs = reference.pixel_values(random_checkpoint, pictures)
    np.testing.assert_array_equal(prepared, theirs.numpy())
    np.testing.assert_array_equal(encoder.pixels_to_model(prepared).numpy(), theirs.numpy())


def test_embeddings_equal_contrastive_model(encoder, random_checkpoint, photos):
    images = photos[: len(TEXTS)]
    ref_text, ref_image = reference.itc_embeddings(random_checkpoint, TEXTS, images)
    ours_text = encoder.embed_texts(TEXTS)
    pixels = np.stack([encoder.preprocess_image(load_rgb(p)) for p in images])
    ours_image = encoder.embed_pixels(pixels)  # the towers' last layers compute [CLS] alone
    np.testing.assert_allclose(ours_text, ref_text, atol=1e-5)
    np.testing.assert_allclose(ours_image, ref_image, atol=1e-5)
    # With bridge inputs (re-ranking, the re-rank cache) the towers run whole: the same embeddings.
    np.testing.assert_allclose(encoder.image_states(pixels, with_bridge=True).embeds.numpy(), ref_image, atol=1e-5)
    np.testing.assert_allclose(encoder.text_states(TEXTS, with_bridge=True).embeds.numpy(), ref_text, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(ours_text, axis=1), 1.0, atol=1e-5)


def test_text_embedding_does_not_depend_on_batch_padding(encoder):
    alone = encoder.embed_texts([TEXTS[0]])
    padded = encoder.embed_texts(TEXTS)[0:1]
    np.testing.assert_allclose(alone, padded, atol=1e-5)


def test_itm_scores_equal_retrieval_model_for_every_pair(encoder, random_checkpoint, photos):
    images = photos[:4]
    pixels = np.stack([encoder.preprocess_image(load_rgb(p)) for p in images])
    image_states = encoder.image_states(pixels, with_bridge=True)  # once for all pairs
    for text in TEXTS:
        text_states = encoder.text_states([text], with_bridge=True)
        ours = encoder.match(text_states, image_states)
        theirs = [reference.itm_logit(random_checkpoint, text, image) for image in images]
        np.testing.assert_allclose(ours, theirs, atol=1e-4)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_hidden_layers=3),  # 3 cross-modal layers on a 3-layer tower: the bridge starts at layer 0
        dict(num_hidden_layers=1),  # a single cross-modal layer: no link tower
        dict(link_tower_type="interpolate"),
    ],
    ids=["cross3", "cross1", "interpolate"],
)
def test_other_architectures_equal_reference(tmp_path, photos, overrides):
    checkpoint = build_small_checkpoint(tmp_path / "ckpt", seed=2, **overrides)
    encoder = Encoder.from_pretrained(str(checkpoint), device="cpu", precision="fp32")
    ref_text, ref_image = reference.itc_embeddings(checkpoint, TEXTS[:2], photos[:2])
    np.testing.assert_allclose(encoder.embed_texts(TEXTS[:2]), ref_text, atol=1e-5)
    pixels = np.stack([encoder.preprocess_image(load_rgb(p)) for p in photos[:2]])
    np.testing.assert_allclose(encoder.embed_pixels(pixels), ref_image, atol=1e-5)
    states = encoder.image_states(pixels, with_bridge=True)
    ours = encoder.match(encoder.text_states([TEXTS[1]], with_bridge=True), states)
    theirs = [reference.itm_logit(checkpoint, TEXTS[1], p) for p in photos[:2]]
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_embedding_never_runs_the_cross_modal_encoder(encoder, photos, monkeypatch):
    calls = []
    for layer in encoder.model.bridgetower.cross_modal_text_layers:
        monkeypatch.setattr(layer, "forward", lambda *a, **k: calls.append(1))
    encoder.embed_texts(TEXTS)
    encoder.embed_pixels(np.stack([encoder.preprocess_image(load_rgb(photos[0]))]))
    assert calls == []


def test_image_modes_become_rgb(tmp_path):
    base = Image.new("RGB", (40, 30), (200, 30, 10))
    cases = {
        "grey.png": base.convert("L"),
        "palette.png": base.convert("P"),
        "cmyk.jpg": base.convert("CMYK"),
        "alpha.png": base.convert("RGBA"),
        "sixteen.png": Image.fromarray((np.full((30, 40), 40000)).astype(np.uint16)),
    }
    for name, image in cases.items():
        image.save(tmp_path / name)
        loaded = load_rgb(tmp_path / name)
        assert loaded.mode == "RGB" and loaded.size == (40, 30), name
    # 16-bit greys are scaled, not clipped to white.
    assert load_rgb(tmp_path / "sixteen.png").getpixel((0, 0))[0] == round(40000 / 65535 * 255)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (60, 20), (0, 0, 255))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_rgb(tmp_path / "rotated.jpg").size == (20, 60)


@torch.inference_mode()
def test_last_layer_first_token_equals_full_layer(encoder, photos):
    """The shortcut of the last cross-modal layer against the layer run whole, padding included."""
    from btsearch.model.bridgetower import _cross_layer_first_token

    bt = encoder.model.bridgetower
    text = encoder.text_states(TEXTS, with_bridge=True)  # padded to the longest
    pixels = np.stack([encoder.preprocess_image(load_rgb(p)) for p in photos[: len(TEXTS)]])
    image = encoder.image_states(pixels, with_bridge=True)
    mask = encoder.model._text_mask(text.bridge[:, 0], text.mask)
    text_in, image_in = text.bridge[:, -1], image.bridge[:, -1]
    for layer, hidden, other, self_mask, cross_mask in [
        (bt.cross_modal_text_layers[-1], text_in, image_in, mask, None),
        (bt.cross_modal_image_layers[-1], image_in, text_in, None, mask),
    ]:
        full = layer(hidden, other, attention_mask=self_mask, encoder_attention_mask=cross_mask)[0][:, :1]
        torch.testing.assert_close(_cross_layer_first_token(layer, hidden, other, self_mask, cross_mask), full, atol=1e-5, rtol=1e-5)


def test_bf16_stays_close_to_fp32(random_checkpoint, photos):
    exact = Encoder.from_pretrained(str(random_checkpoint), device="cpu", precision="fp32")
    fast = Encoder.from_pretrained(str(random_checkpoint), device="cpu", precision="bf16")
    assert fast.dtype == torch.bfloat16
    prepared = np.stack([fast.prepare_image(load_rgb(p)) for p in photos[:2]])  # the table, rounded to bf16 ...
    exact_pixels = torch.as_tensor(np.stack([exact.preprocess_image(load_rgb(p)) for p in photos[:2]]))
    assert torch.equal(fast.pixels_to_model(prepared), exact_pixels.to(torch.bfloat16))  # ... = the pixels, rounded
    cosine = np.sum(exact.embed_texts(TEXTS) * fast.embed_texts(TEXTS), axis=1)
    assert cosine.min() > 0.98
    pixels = np.stack([exact.preprocess_image(load_rgb(p)) for p in photos[:2]])
    scores = [e.match(e.text_states([TEXTS[0]], with_bridge=True), e.image_states(pixels, with_bridge=True)) for e in (exact, fast)]
    np.testing.assert_allclose(scores[0], scores[1], atol=0.1)
