"""ManagerTower: conversion of a checkpoint in LooperXX/ManagerTower's layout, its ITC embeddings
and ITM scores against a plain one-pair-at-a-time forward written here from the paper's code
(src/modules/mt_module.py, heads.py), and the engine running on it."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from transformers import BridgeTowerProcessor

from btsearch.cli.main import main
from btsearch.demo.small_checkpoint import small_config
from btsearch.model.bridgetower import TowerOutput
from btsearch.model.encoder import Encoder
from btsearch.model.managertower import ManagerTowerRetrievalModel, managertower_config

from . import reference
from .helpers import to_original_layout

CAPTIONS = ["a close up of a tabby cat", "a cup of coffee on a red saucer on a wooden table"]


@pytest.fixture(scope="module", params=["AAUE", "SAUE"])
def converted(request, random_checkpoint, tmp_path_factory):
    """A random small ManagerTower (managers randomised too), saved in the original layout and
    converted: (converted folder, manager type, the source model, the original checkpoint)."""
    processor = BridgeTowerProcessor.from_pretrained(random_checkpoint)
    config = managertower_config(small_config(len(processor.tokenizer), num_hidden_layers=3), request.param, managed_layers=2)
    torch.manual_seed(7)
    model = ManagerTowerRetrievalModel(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "manager_tower" in name and ("scores" in name or "temperature" in name or name.endswith("LayerNorm.weight")):
                parameter.copy_(0.5 + torch.rand_like(parameter))  # non-uniform weights, so managers matter
            elif "manager_tower" in name and "LayerNorm" in name:
                parameter.copy_(0.1 * torch.randn_like(parameter))
    ckpt = tmp_path_factory.mktemp("mt") / "managertower.ckpt"
    state = {key: value for key, value in model.state_dict().items() if not key.endswith("position_ids")}
    hparams = {"config": {"image_size": config.vision_config.image_size, "num_heads": 2, "max_text_len": 24, "model_type": "MT"}}
    original = to_original_layout(state, itc_prefix="cross_modal_")
    original["mlm_score.decoder.weight"] = torch.zeros(8, 4)  # a pre-training head retrieval does not use
    torch.save({"state_dict": original, "hyper_parameters": hparams}, ckpt)
    out = tmp_path_factory.mktemp("mt-converted") / "model"
    result = CliRunner().invoke(main, ["convert", str(ckpt), str(out), "--tokenizer", str(random_checkpoint)])
    assert result.exit_code == 0, result.output
    assert "ManagerTower" in result.stdout and "dropped 1 weights of heads retrieval does not use: mlm_score" in result.stderr
    return out, request.param, model, ckpt


def plain_forward(model: ManagerTowerRetrievalModel, ids, mask, pixels):
    """ITC embeddings and the ITM logit of ONE pair, step by step as mt_module.py computes them,
    through transformers' own towers and cross-modal layers."""
    config = model.config
    R = config.managed_layers
    text_states = model.text_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1:]
    image_states = model.vision_model(pixels)  # every block's output after ln_post: (layers, 1, P, H)
    text_itc = torch.nn.functional.normalize(model.itc_text_head(text_states[-1][:, 0]), dim=-1)
    image_itc = torch.nn.functional.normalize(model.itc_image_head(image_states[-1][:, 0]), dim=-1)

    def managed(states, transform, token_type, embeddings):
        first = len(states) - R
        return [transform(states[first + r]) + model.token_type_embeddings.weight[token_type] + embeddings.weight[first + r] for r in range(R)]

    T = managed(text_states, model.cross_modal_text_transform, 0, model.layer_embeddings_text)
    I = managed(list(image_states), model.cross_modal_image_transform, 1, model.layer_embeddings_image)  # noqa: E741 (the paper's name)
    extended = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min

    def manage(manager, layers, previous, other):
        m = manager.manager_layer
        h = [m.LayerNorm[r](layers[r]) for r in range(R)]
        if hasattr(m, "linear_controller"):  # AAUE
            q = m.extra_query_LayerNorm(other)
            c = m.LayerNorm[R](previous)
            scores = m.fusion_attention.q_proj(c) @ m.fusion_attention.k_proj(q).transpose(-1, -2) / np.sqrt(c.shape[-1])
            fused = torch.cat([torch.softmax(scores, dim=-1) @ q, c], dim=-1)
            s = m.linear_controller(fused).transpose(1, 2).unsqueeze(-1)  # (1, R, L, 1)
            w = torch.softmax(s / m.softmax_temperature, dim=1)
            return sum(w[:, r] * h[r] for r in range(R)) + m.layer_scores_cross[:, 0] * c
        w = torch.softmax(m.layer_scores[:, :R] / m.softmax_temperature, dim=1)
        out = sum(w[:, r] * h[r] for r in range(R))
        if previous is not None:  # SAUE after layer 0
            out = out + m.layer_scores[:, R] * m.LayerNorm[R](previous)
        return out

    x = y = None
    for k in range(config.num_hidden_layers):
        x_ = manage(model.cross_modal_text_manager_tower[k], T, x, y)
        y_ = manage(model.cross_modal_image_manager_tower[k], I, y, x)
        x = model.cross_modal_text_layers[k](x_, y_, attention_mask=extended)[0]
        y = model.cross_modal_image_layers[k](y_, x_, encoder_attention_mask=extended)[0]
    pooled = torch.cat([model.cross_modal_text_pooler(x), model.cross_modal_image_pooler(y)], dim=-1)
    return text_itc, image_itc, model.itm_score(pooled)[0, 1]


def test_every_original_tensor_lands_under_its_documented_name(converted):
    """Name by name through the authors' layout (helpers.to_original_layout): a swap of two
    same-shaped weights in the converter (text and image managers or layers) fails here."""
    folder, _, _, ckpt = converted
    source = {key: value for key, value in torch.load(ckpt, weights_only=True)["state_dict"].items() if not key.startswith("mlm_score.")}
    back = to_original_layout(load_file(folder / "model.safetensors"), itc_prefix="cross_modal_")
    assert sorted(back) == sorted(source)
    assert float(back.pop("temperature")) == pytest.approx(float(source["temperature"]), rel=1e-5)
    differ = [key for key, tensor in back.items() if not torch.equal(tensor, source[key])]
    assert not differ, f"{len(differ)} converted tensors are not the source's of that name: {differ[:10]}"


def test_batched_rerank_equals_the_plain_one_pair_forward_of_the_source(converted, photos):
    """The converted model's batched scores against the plain forward run on the SOURCE model's
    weights (the model the original checkpoint was saved from), not on the converted ones."""
    folder, manager_type, source, _ = converted
    encoder = Encoder.from_pretrained(str(folder), device="cpu", precision="fp32")
    assert isinstance(encoder.model, ManagerTowerRetrievalModel) and encoder.model.config.manager_type == manager_type
    pixels = np.stack([encoder.preprocess_image(reference.load_rgb(p)) for p in photos[:3]])
    texts = encoder.text_states(CAPTIONS, with_bridge=True)
    images = encoder.image_states(pixels, with_bridge=True)
    # All six pairs in one batch, as re-ranking and eval score them.
    t_index, i_index = np.repeat(np.arange(2), 3), np.tile(np.arange(3), 2)
    batched = encoder.model.match_logits(texts.bridge[t_index], texts.mask[t_index], images.bridge[i_index]).numpy()
    ids, mask = encoder.tokenize(CAPTIONS)
    with torch.no_grad():
        for n, (t, i) in enumerate(zip(t_index, i_index)):
            text_itc, image_itc, logit = plain_forward(source, ids[t : t + 1], mask[t : t + 1], torch.as_tensor(pixels[i : i + 1]))
            assert batched[n] == pytest.approx(float(logit), abs=1e-4)
            np.testing.assert_allclose(texts.embeds[t].numpy(), text_itc[0].numpy(), atol=1e-5)
            np.testing.assert_allclose(images.embeds[i].numpy(), image_itc[0].numpy(), atol=1e-5)
    # One query against candidates, through the engine's own pairing.
    one = encoder.match(TowerOutput(embeds=None, bridge=texts.bridge[1:2], mask=texts.mask[1:2]), images)
    np.testing.assert_allclose(one, batched[3:], atol=1e-5)


def test_texts_pad_to_the_training_length_so_scores_ignore_the_batch(converted):
    folder = converted[0]
    encoder = Encoder.from_pretrained(str(folder), device="cpu", precision="fp32")
    ids, _ = encoder.tokenize(["a cat"])
    assert ids.shape[1] == encoder.max_text_length == 24  # max_text_len of the checkpoint's config


def test_converted_managertower_round_trips_and_searches(converted, photos, tmp_path):
    folder = converted[0]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_family"] == "managertower" and config["managed_layers"] == 2
    first = Encoder.from_pretrained(str(folder), device="cpu", precision="fp32")
    first.model.save_pretrained(tmp_path / "again")
    first.processor.save_pretrained(tmp_path / "again")
    second = Encoder.from_pretrained(str(tmp_path / "again"), device="cpu", precision="fp32")
    pixels = np.stack([first.preprocess_image(reference.load_rgb(photos[0]))])
    a, b = first.image_states(pixels, with_bridge=True), second.image_states(pixels, with_bridge=True)
    np.testing.assert_array_equal(a.embeds.numpy(), b.embeds.numpy())
    t = first.text_states(CAPTIONS[:1], with_bridge=True)
    assert first.match(t, a) == pytest.approx(second.match(second.text_states(CAPTIONS[:1], with_bridge=True), b))
    db = tmp_path / "db"
    result = CliRunner().invoke(main, ["index", str(photos[0].parent), "--db", str(db), "--model", str(folder), "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    out = CliRunner().invoke(main, ["search", CAPTIONS[0], "--db", str(db), "-k", "3", "--candidates", "3", "--json", "--precision", "fp32"])
    hits = json.loads(out.stdout)["hits"]
    assert len(hits) == 3 and all(h["itm_score"] is not None for h in hits)
