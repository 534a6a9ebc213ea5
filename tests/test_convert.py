"""`btsearch convert`: microsoft/BridgeTower's Lightning checkpoints into a --model folder.

The original checkpoint is written here from the documented layout of microsoft/BridgeTower
(src/modules/bt_module.py, clip_model.py): keys without prefix, CLIP's ViT under
`vit_model.visual` with `conv1` / `class_embedding` / `positional_embedding`, a learnable
`temperature`, CLIP's unused text-tower leftovers, and the training config in
`hyper_parameters["config"]`.
"""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import BridgeTowerForContrastiveLearning

from btsearch.cli.main import main
from btsearch.demo.small_checkpoint import build_small_checkpoint
from btsearch.model.convert import ConversionError, convert
from btsearch.model.encoder import Encoder

from . import reference
from .helpers import to_original_layout

CAPTIONS = ["a close up of a tabby cat", "a cup of coffee on a red saucer"]


@pytest.fixture(scope="module")
def original_checkpoint(tmp_path_factory):
    """A small trained-like BridgeTower saved as microsoft/BridgeTower saves it; returns (ckpt, hf folder)."""
    hf_folder = build_small_checkpoint(tmp_path_factory.mktemp("hf"), seed=5, train_steps=20)
    state = to_original_layout(load_file(hf_folder / "model.safetensors"), body="bridgetower.")
    config = json.loads((hf_folder / "config.json").read_text())
    ckpt = tmp_path_factory.mktemp("orig") / "bridgetower_irtr.ckpt"
    torch.save(
        {
            "epoch": 9,
            "state_dict": state,
            "hyper_parameters": {"config": {
                "image_size": config["vision_config"]["image_size"], "tokenizer": str(hf_folder),
                "num_heads": config["num_attention_heads"], "max_text_len": 40, "vit": "CLIP-ViT-B/16",
            }},
        },
        ckpt,
    )
    return ckpt, hf_folder


@pytest.fixture(scope="module")
def converted(original_checkpoint, tmp_path_factory):
    ckpt, _ = original_checkpoint
    out = tmp_path_factory.mktemp("converted") / "model"
    result = CliRunner().invoke(main, ["convert", str(ckpt), str(out)])
    assert result.exit_code == 0, result.output
    assert f"search with --model {out}" in result.output
    return out


def test_every_original_tensor_lands_under_its_documented_name(converted, original_checkpoint):
    """Name by name through the authors' layout (helpers.to_original_layout, written from their
    code): each tensor of the source checkpoint is the converted folder's tensor of that name, so
    a swap of two same-shaped weights (text and image cross-modal layers, ITC heads) fails."""
    ckpt, _ = original_checkpoint
    source = torch.load(ckpt, weights_only=True)["state_dict"]
    back = to_original_layout(load_file(converted / "model.safetensors"), body="bridgetower.")
    assert sorted(back) == sorted(source)
    assert float(back.pop("temperature")) == pytest.approx(float(source["temperature"]), rel=1e-5)
    differ = [key for key, tensor in back.items() if not torch.equal(tensor, source[key])]
    assert not differ, f"{len(differ)} converted tensors are not the source's of that name: {differ[:10]}"


def test_itm_scores_equal_transformers_on_the_source_model(converted, original_checkpoint, photos):
    """The converted folder's ITM logits equal the source's own forward: transformers' classes on
    the folder the original checkpoint was written from (its tensors, under transformers' names)."""
    _, source = original_checkpoint
    encoder = Encoder.from_pretrained(str(converted), device="cpu", precision="fp32")
    texts = encoder.text_states(CAPTIONS, with_bridge=True)
    images = encoder.image_states(np.stack([encoder.preprocess_image(reference.load_rgb(p)) for p in photos[:2]]), with_bridge=True)
    logits = []
    for t, caption in enumerate(CAPTIONS):
        for i, photo in enumerate(photos[:2]):
            ours = encoder.match(
                type(texts)(embeds=None, bridge=texts.bridge[t : t + 1], mask=texts.mask[t : t + 1]),
                type(images)(embeds=None, bridge=images.bridge[i : i + 1]),
            )
            theirs = reference.itm_logit(source, caption, photo)
            assert float(ours[0]) == pytest.approx(theirs, abs=1e-4)
            logits.append(theirs)
    assert np.ptp(logits) > 1e-3  # the pairs score apart: equal logits would not tell a swapped weight


def test_itc_follows_the_original_convention_and_text_equals_transformers(converted, original_checkpoint, photos):
    config = json.loads((converted / "config.json").read_text())
    assert config["itc_image_head_input"] == "ln_post"
    _, source = original_checkpoint  # the folder the original checkpoint was written from
    encoder = Encoder.from_pretrained(str(converted), device="cpu", precision="fp32")
    ref_text, ref_image = reference.itc_embeddings(source, CAPTIONS, photos[:2])
    np.testing.assert_allclose(encoder.embed_texts(CAPTIONS), ref_text, atol=1e-5)

    # The original: the image ITC head on ln_post of the last image layer's [CLS], nothing between,
    # computed from the source's weights.
    model = BridgeTowerForContrastiveLearning.from_pretrained(source).eval()
    visual = model.bridgetower.vision_model.visual
    pixels = reference.pixel_values(source, photos[:2])
    with torch.no_grad():
        hidden = visual.forward_pre(pixels)
        for block in visual.transformer.resblocks:
            hidden = block(hidden)
        original = torch.nn.functional.normalize(model.itc_image_head(visual.forward_post(hidden)[:, 0, :]), dim=-1)
    ours = encoder.embed_pixels(pixels.numpy())
    np.testing.assert_allclose(ours, original.numpy(), atol=1e-5)
    assert not np.allclose(ours, ref_image, atol=1e-3)  # transformers' convention gives other vectors


def test_transformers_convention_stays_the_default(original_checkpoint, photos):
    _, hf_folder = original_checkpoint  # a hub-style folder records no convention
    encoder = Encoder.from_pretrained(str(hf_folder), device="cpu", precision="fp32")
    _, ref_image = reference.itc_embeddings(hf_folder, CAPTIONS, photos[:2])
    np.testing.assert_allclose(encoder.embed_pixels(reference.pixel_values(hf_folder, photos[:2]).numpy()), ref_image, atol=1e-5)


def test_converted_folder_round_trips_and_keeps_the_training_setup(converted, original_checkpoint, tmp_path, photos):
    ckpt, hf_folder = original_checkpoint
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    weights = load_file(converted / "model.safetensors")
    assert "vit_model.ln_final.weight" not in weights and "bridgetower.vision_model.visual.embeddings.patch_embedding.weight" in weights
    assert float(weights["logit_scale"]) == pytest.approx(math.log(1 / float(saved["temperature"])), abs=1e-5)
    tokenizer_config = json.loads((converted / "tokenizer_config.json").read_text())
    assert tokenizer_config["model_max_length"] == 40  # captions cut where training cut them
    # Scores are stable under save/load of the converted model.
    first = Encoder.from_pretrained(str(converted), device="cpu", precision="fp32")
    first.model.save_pretrained(tmp_path / "again")
    first.processor.save_pretrained(tmp_path / "again")
    second = Encoder.from_pretrained(str(tmp_path / "again"), device="cpu", precision="fp32")
    pixels = reference.pixel_values(converted, photos[:1]).numpy()
    np.testing.assert_array_equal(first.embed_pixels(pixels), second.embed_pixels(pixels))
    np.testing.assert_array_equal(first.embed_texts(CAPTIONS), second.embed_texts(CAPTIONS))


def test_unmapped_and_missing_keys_are_named(original_checkpoint, tmp_path):
    ckpt, hf_folder = original_checkpoint
    checkpoint = torch.load(ckpt, weights_only=True)
    extra = dict(checkpoint, state_dict={**checkpoint["state_dict"], "vqa_classifier.0.weight": torch.zeros(2, 2)})
    torch.save(extra, tmp_path / "extra.ckpt")
    with pytest.raises(ConversionError, match=r"1 keys have no place.*vqa_classifier\.0\.weight"):
        convert(tmp_path / "extra.ckpt", tmp_path / "out1")
    state = dict(checkpoint["state_dict"])
    del state["cross_modal_image_layers.1.output.dense.weight"]
    torch.save(dict(checkpoint, state_dict=state), tmp_path / "missing.ckpt")
    with pytest.raises(ConversionError, match=r"bridgetower\.cross_modal_image_layers\.1\.output\.dense\.weight"):
        convert(tmp_path / "missing.ckpt", tmp_path / "out2")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    result = CliRunner().invoke(main, ["convert", str(tmp_path / "junk.ckpt"), str(tmp_path / "out3")])
    assert result.exit_code == 1 and "cannot read" in result.stderr and "Traceback" not in result.output
    with pytest.raises(ConversionError, match="not managertower"):
        convert(ckpt, tmp_path / "out4", family="managertower")


def test_a_converted_model_indexes_and_searches(converted, photos, tmp_path):
    db = tmp_path / "db"
    result = CliRunner().invoke(main, ["index", str(photos[0].parent), "--db", str(db), "--model", str(converted)])
    assert result.exit_code == 0, result.output
    hits = json.loads(CliRunner().invoke(main, ["search", CAPTIONS[0], "--db", str(db), "-k", "3", "--json"]).stdout)["hits"]
    assert len(hits) == 3 and all(h["itm_score"] is not None for h in hits[:3])
