"""The checkpoint factory the tests and the offline demo rely on: hub layout, heads as asked."""

import json

import pytest
import torch
from safetensors import safe_open
from transformers import (
    BridgeTowerForContrastiveLearning,
    BridgeTowerForImageAndTextRetrieval,
    BridgeTowerModel,
    BridgeTowerProcessor,
)

from btsearch.demo.small_checkpoint import build_small_checkpoint, sample_batch, sample_ranking_misses
from btsearch.errors import ModelLoadError
from btsearch.model.encoder import Encoder


def _keys(folder):
    with safe_open(folder / "model.safetensors", "pt") as weights:
        return set(weights.keys())


def test_hub_layout_loads_in_transformers_without_missing_keys(random_checkpoint):
    keys = _keys(random_checkpoint)
    assert {"itc_text_head.fc.weight", "itc_image_head.fc.weight", "itm_score.fc.weight", "logit_scale"} <= keys
    for cls in (BridgeTowerForContrastiveLearning, BridgeTowerForImageAndTextRetrieval):
        _, info = cls.from_pretrained(random_checkpoint, output_loading_info=True)
        assert not info["missing_keys"], cls.__name__
    assert json.loads((random_checkpoint / "config.json").read_text())["contrastive_hidden_size"] == 32


def test_checkpoint_without_itc_heads_is_refused_with_reason(tmp_path):
    folder = build_small_checkpoint(tmp_path / "itm-only", heads=("itm",))
    assert not any(key.startswith("itc_") for key in _keys(folder))
    with pytest.raises(ModelLoadError, match="no ITC heads.*itc_text_head"):
        Encoder.from_pretrained(str(folder))


def test_checkpoint_without_itm_head_disables_reranking(tmp_path, caplog):
    folder = build_small_checkpoint(tmp_path / "itc-only", heads=("itc",))
    encoder = Encoder.from_pretrained(str(folder))
    assert not encoder.has_itm
    assert "no ITM head" in caplog.text


def test_folder_without_weights_is_named(tmp_path, random_checkpoint):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text((random_checkpoint / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="has no weights"):
        Encoder.from_pretrained(str(folder))
    with pytest.raises(ModelLoadError, match="no config.json"):
        Encoder.from_pretrained(str(tmp_path))


def test_body_only_checkpoint_has_no_head_keys(tmp_path):
    folder = build_small_checkpoint(tmp_path / "body-only", heads=())
    assert all(key.startswith("bridgetower.") for key in _keys(folder))
    _, info = BridgeTowerModel.from_pretrained(folder, output_loading_info=True)
    assert not info["missing_keys"]


def test_tokenizer_is_the_trained_bpe_with_roberta_ids(random_checkpoint):
    tokenizer = BridgeTowerProcessor.from_pretrained(random_checkpoint).tokenizer
    config = json.loads((random_checkpoint / "config.json").read_text())
    assert len(tokenizer) == config["text_config"]["vocab_size"]
    assert (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert len(tokenizer("a red motorcycle parked in a garage").input_ids) > 5


def test_trained_checkpoint_ranks_each_photo_first_for_its_captions(trained_checkpoint):
    processor = BridgeTowerProcessor.from_pretrained(trained_checkpoint)
    itc_model = BridgeTowerForContrastiveLearning.from_pretrained(trained_checkpoint).eval()
    itm_model = BridgeTowerForImageAndTextRetrieval.from_pretrained(trained_checkpoint).eval()
    pixel_values, texts, owners = sample_batch(processor)
    num_photos, num_captions = len(pixel_values), len(owners)
    with torch.no_grad():
        # The ITC towers are uni-modal: a pair's partner does not change its embeddings.
        first_texts = {key: value[:num_photos] for key, value in texts.items()}
        image_embeds = itc_model(**first_texts, pixel_values=pixel_values).image_embeds
        text_embeds = itc_model(**texts, pixel_values=pixel_values[owners]).text_embeds
        itc = text_embeds @ image_embeds.T

        caption_ids = torch.arange(num_captions).repeat_interleave(num_photos)
        photo_ids = torch.arange(num_photos).repeat(num_captions)
        itm = itm_model(
            input_ids=texts["input_ids"][caption_ids],
            attention_mask=texts["attention_mask"][caption_ids],
            pixel_values=pixel_values[photo_ids],
        ).logits[:, 1].view(num_captions, num_photos)
    # The fixture trains until the sample ranks perfectly (max_train_steps): the factory's own
    # check agrees on the reloaded folder (the computation it trained with, so to the bit) ...
    assert sample_ranking_misses(itc_model, itm_model, (pixel_values, texts, owners)) == 0
    # ... and here, batched otherwise, every caption's own photo scores the best, by ITC and by
    # ITM. Training guarantees only a margin above zero, which float rounding may eat where it is
    # tiny: the own photo must score within the tolerance of the best, not strictly above it.
    for scores, tolerance in ((itc, 1e-5), (itm, 1e-4)):
        own = scores[torch.arange(num_captions), owners]
        assert (own >= scores.max(dim=1).values - tolerance).all(), (own, scores.max(dim=1))


def test_untrained_checkpoint_is_counted_as_missing(random_checkpoint):
    processor = BridgeTowerProcessor.from_pretrained(random_checkpoint)
    itc_model = BridgeTowerForContrastiveLearning.from_pretrained(random_checkpoint).eval()
    itm_model = BridgeTowerForImageAndTextRetrieval.from_pretrained(random_checkpoint).eval()
    assert sample_ranking_misses(itc_model, itm_model, sample_batch(processor)) > 0
