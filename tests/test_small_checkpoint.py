"""The checkpoint factory the tests and the offline demo rely on: hub layout, heads as asked."""

import json

import pytest
from safetensors import safe_open
from transformers import BridgeTowerForContrastiveLearning, BridgeTowerForImageAndTextRetrieval

from btsearch.encoder import Encoder
from btsearch.errors import ModelLoadError
from btsearch.small_checkpoint import build_small_checkpoint


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
