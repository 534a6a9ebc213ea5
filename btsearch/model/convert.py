"""Convert the papers' released PyTorch Lightning checkpoints into a folder that `--model` loads:
microsoft/BridgeTower's into transformers' BridgeTower layout (its own classes load them too),
LooperXX/ManagerTower's into `managertower.ManagerTowerRetrievalModel`'s.

The original `.ckpt` holds `state_dict` (keys without prefix: `text_transformer.*`,
`vit_model.visual.*`, `cross_modal_*`, heads) and `hyper_parameters["config"]` (the training
config: `vit`, `image_size`, `tokenizer`, `max_text_len`, ...). The architecture is read from
the tensor shapes, the config filling in what shapes cannot tell (attention heads). Every key
is mapped or named in an error: nothing is dropped silently but CLIP's unused text-tower
leftovers.

Two things differ. The original's cross-modal layers normalise with eps 1e-12, transformers'
with the config's one eps (1e-5, which the link towers and first layer norms use in both):
a relative difference of order 1e-5 in those layers' outputs. And the original applies the image ITC head to `ln_post` of the last
image layer's [CLS]; transformers applies it after `cross_modal_image_transform` and the image
token type. The converted config records `itc_image_head_input = "ln_post"`, which
`BridgeTowerRetrievalModel` honours.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer, BridgeTowerConfig, BridgeTowerProcessor
from transformers.models.bridgetower.image_processing_pil_bridgetower import BridgeTowerImageProcessorPil

from ..defaults import CHECKPOINT_FAMILIES as FAMILIES
from ..errors import BtsearchError

ITC_IMAGE_INPUT_KEY = "itc_image_head_input"  # config attribute: "ln_post" (original) or "transformed" (transformers)


def _clip_visual_keys(prefix: str) -> list[tuple[str, str]]:
    """The original CLIP ViT keys under `vit_model.visual`, renamed into transformers' vision model at `prefix`."""
    visual = prefix + "vision_model.visual."
    return [
        (r"vit_model\.visual\.conv1\.weight", visual + "embeddings.patch_embedding.weight"),
        (r"vit_model\.visual\.class_embedding", visual + "embeddings.class_embedding"),
        (r"vit_model\.visual\.positional_embedding", visual + "embeddings.position_embedding.weight"),
        (r"vit_model\.visual\.((?:ln_pre|ln_post|ln_separate|transformer)\..+)", visual + r"\1"),
    ]


# original key (regex) -> transformers key (template)
_BRIDGETOWER_KEYS = [
    (r"text_transformer\.(.+)", r"bridgetower.text_model.\1"),
    *_clip_visual_keys("bridgetower."),
    (r"(cross_modal_(?:text|image)_(?:transform|layers|pooler|layernorm|link_tower)\..+)", r"bridgetower.\1"),
    (r"token_type_embeddings\.weight", r"bridgetower.token_type_embeddings.weight"),
    (r"((?:itm_score|itc_text_head|itc_image_head|mlm_score)\..+)", r"\1"),
]
# LooperXX/ManagerTower: the same towers and cross-modal layers, managers instead of link towers.
_MANAGERTOWER_KEYS = [
    (r"text_transformer\.(.+)", r"text_model.\1"),
    *_clip_visual_keys(""),
    (r"(cross_modal_(?:text|image)_(?:transform|layers|pooler|manager_tower)\..+)", r"\1"),
    (r"((?:token_type_embeddings|layer_embeddings_text|layer_embeddings_image)\.weight)", r"\1"),
    (r"cross_modal_itc_(text|image)_head\.(.+)", r"itc_\1_head.\2"),
    (r"(itm_score\..+)", r"\1"),
]
# Heads a checkpoint may carry that retrieval does not use: dropped, and said so.
_MANAGERTOWER_UNUSED_HEADS = ("mlm_score.",)
# CLIP's text tower, loaded with the ViT by the original code and never used.
_UNUSED_KEYS = {"vit_model.positional_embedding", "vit_model.ln_final.weight", "vit_model.ln_final.bias"}


class ConversionError(BtsearchError):
    """The checkpoint is not one this converter understands; the message says what is off."""


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """`(state_dict, training config)` of a Lightning `.ckpt` (or of a bare state dict file)."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"no checkpoint file at {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many kinds for a file it cannot read
        raise ConversionError(f"cannot read {path} as a PyTorch checkpoint: {str(error).splitlines()[0]}") from error
    if not isinstance(checkpoint, dict):
        raise ConversionError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dictionary")
    state = checkpoint.get("state_dict", checkpoint)
    hyper = checkpoint.get("hyper_parameters") or {}
    config = hyper.get("config", hyper) if isinstance(hyper, dict) else {}
    tensors = {key: value for key, value in state.items() if isinstance(value, torch.Tensor)}
    if not tensors:
        raise ConversionError(f"{path} holds no tensors")
    return tensors, dict(config)


def detect_family(state: dict[str, torch.Tensor]) -> str:
    if any(key.startswith(("layer_embeddings", "cross_modal_itc_text_head")) or ".manager" in key for key in state):
        return "managertower"
    if any(key.startswith("cross_modal_text_layers.") for key in state):
        return "bridgetower"
    raise ConversionError("the checkpoint holds neither BridgeTower nor ManagerTower weights (no cross_modal_text_layers)")


def _count(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for key in state if (m := pattern.match(key))}
    return max(found) + 1 if found else 0


def _shape(state: dict[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in state:
        raise ConversionError(f"the checkpoint lacks {key!r}")
    return tuple(state[key].shape)


def config_from_bridgetower_state(state: dict[str, torch.Tensor], hparams: dict) -> BridgeTowerConfig:
    """The transformers config of an original BridgeTower state dict: sizes from the shapes."""
    vocab, text_hidden = _shape(state, "text_transformer.embeddings.word_embeddings.weight")
    text_layers = _count(state, "text_transformer.encoder.layer.")
    text_intermediate = _shape(state, "text_transformer.encoder.layer.0.intermediate.dense.weight")[0]
    positions = _shape(state, "text_transformer.embeddings.position_embeddings.weight")[0]
    token_types = _shape(state, "text_transformer.embeddings.token_type_embeddings.weight")[0]
    width, _, patch, _ = _shape(state, "vit_model.visual.conv1.weight")
    grid = math.isqrt(_shape(state, "vit_model.visual.positional_embedding")[0] - 1)
    image_layers = _count(state, "vit_model.visual.transformer.resblocks.")
    hidden = _shape(state, "cross_modal_text_transform.weight")[0]
    cross_layers = _count(state, "cross_modal_text_layers.")
    cross_intermediate = _shape(state, "cross_modal_text_layers.0.intermediate.dense.weight")[0]
    contrastive = _shape(state, "itc_text_head.fc.weight")[0] if "itc_text_head.fc.weight" in state else 512
    heads = int(hparams.get("num_heads") or hidden // 64)
    # transformers builds the cross-modal layers from the text tower's config (heads, widths).
    if hidden != text_hidden or cross_intermediate != text_intermediate:
        raise ConversionError(
            f"cross-modal layers of width {hidden}/{cross_intermediate} beside a text tower of {text_hidden}/{text_intermediate}: "
            "transformers' BridgeTower cannot hold that"
        )
    image_size = int(hparams.get("image_size") or grid * patch)
    if image_size != grid * patch:  # the original resizes positions at load time to the config's size
        raise ConversionError(
            f"image_size {image_size} in the checkpoint's config disagrees with its position embeddings ({grid}x{grid} patches of {patch})"
        )
    temperature = float(state["temperature"]) if "temperature" in state else 0.07
    config = BridgeTowerConfig(
        hidden_size=hidden,
        num_attention_heads=heads,
        num_hidden_layers=cross_layers,
        share_cross_modal_transformer_layers=True,  # one transform for all layers in the original
        share_link_tower_layers=False,
        link_tower_type="add",
        init_layernorm_from_vision_encoder=False,
        contrastive_hidden_size=contrastive,
        logit_scale_init_value=math.log(1 / temperature),
        text_config=dict(
            vocab_size=vocab,
            hidden_size=text_hidden,
            num_hidden_layers=text_layers,
            num_attention_heads=heads,
            intermediate_size=text_intermediate,
            max_position_embeddings=positions,
            type_vocab_size=token_types,
        ),
        vision_config=dict(
            hidden_size=width,
            num_hidden_layers=image_layers,
            patch_size=patch,
            image_size=image_size,
            share_layernorm=not any(key.startswith("vit_model.visual.ln_separate.") for key in state),
        ),
    )
    config.tie_word_embeddings = False  # the original MLM decoder has weights of its own
    setattr(config, ITC_IMAGE_INPUT_KEY, "ln_post")
    return config


def bridgetower_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict in transformers' layout; every original key is mapped or named in an error."""
    return _map_keys(state, _BRIDGETOWER_KEYS, "BridgeTower")


def managertower_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The state dict in `ManagerTowerRetrievalModel`'s layout, and the unused head keys dropped."""
    dropped = sorted(key for key in state if key.startswith(_MANAGERTOWER_UNUSED_HEADS))
    kept = {key: value for key, value in state.items() if key not in set(dropped)}
    return _map_keys(kept, _MANAGERTOWER_KEYS, "ManagerTower"), dropped


def config_from_managertower_state(state: dict[str, torch.Tensor], hparams: dict) -> BridgeTowerConfig:
    from .managertower import managertower_config as mark

    renamed = {key.replace("cross_modal_itc_", "itc_"): value for key, value in state.items()}
    config = config_from_bridgetower_state(renamed, hparams)
    scores = {side: _shape(state, f"cross_modal_{side}_manager_tower.0.manager_layer.layer_scores") for side in ("text", "image")}
    if scores["text"][1] != scores["image"][1]:
        raise ConversionError(f"the text and image managers manage {scores['text'][1]} and {scores['image'][1]} layers: btsearch needs the same number")
    adaptive = "cross_modal_text_manager_tower.1.manager_layer.linear_controller.weight" in state
    vector = scores["text"][-1] == config.hidden_size
    return mark(config, "AAUE" if adaptive else "SAUE", scores["text"][1], "vector" if vector else "scalar")


def _map_keys(state: dict[str, torch.Tensor], rule_list, family: str) -> dict[str, torch.Tensor]:
    rules = [(re.compile(pattern + r"\Z"), template) for pattern, template in rule_list]
    out, unmapped = {}, []
    for key, tensor in state.items():
        if key in _UNUSED_KEYS or key.endswith("embeddings.position_ids"):  # and a buffer transformers rebuilds
            continue
        if key == "temperature":  # learnable temperature -> transformers' logit scale
            out["logit_scale"] = torch.log(1 / tensor.float().clamp(0.001, 0.5)).reshape(())
            continue
        for pattern, template in rules:
            if pattern.match(key):
                out[pattern.sub(template, key)] = tensor.contiguous()
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise ConversionError(f"{len(unmapped)} keys have no place in {family}'s layout: {', '.join(sorted(unmapped)[:20])}")
    return out


def check_complete(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Refuse a conversion that would leave weights of the retrieval model at random."""
    expected = set(model.state_dict())
    missing = sorted(key for key in expected - set(state) if not key.endswith("position_ids"))
    if missing:
        raise ConversionError(f"{len(missing)} weights the model needs are not in the checkpoint: {', '.join(missing[:20])}")
    wrong = [key for key, value in model.state_dict().items() if key in state and tuple(state[key].shape) != tuple(value.shape)]
    if wrong:
        raise ConversionError(f"{len(wrong)} weights have another shape than the inferred architecture: {', '.join(wrong[:20])}")


@dataclass
class Conversion:
    folder: Path
    family: str
    config: BridgeTowerConfig
    dropped: list[str]  # checkpoint keys of heads retrieval does not use


def convert(source: str | os.PathLike, out_dir: str | os.PathLike, family: str = "auto", tokenizer: str | None = None) -> Conversion:
    """Write a `--model` folder (config, safetensors weights, processor, tokenizer) for `source`."""
    from safetensors.torch import save_file

    from .encoder import model_class_for

    if family not in FAMILIES:
        raise ConversionError(f"unknown family {family!r}: choose one of {', '.join(FAMILIES)}")
    state, hparams = load_checkpoint(source)
    found = detect_family(state)
    if family != "auto" and family != found:
        raise ConversionError(f"{source} holds a {found} checkpoint, not {family}")
    dropped: list[str] = []
    if found == "managertower":
        config = config_from_managertower_state(state, hparams)
        weights, dropped = managertower_state_dict(state)
    else:
        config = config_from_bridgetower_state(state, hparams)
        weights = bridgetower_state_dict(state)
    check_complete(model_class_for(config)(config), weights)
    tokenizer_source = tokenizer or hparams.get("tokenizer") or "roberta-base"
    try:
        text_tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source))
    except (OSError, ValueError) as error:
        raise ConversionError(
            f"cannot load tokenizer {tokenizer_source!r} ({str(error).splitlines()[0]}): pass --tokenizer with a hub id or a local folder"
        ) from error
    if len(text_tokenizer) > config.text_config.vocab_size:
        raise ConversionError(f"tokenizer {tokenizer_source!r} has {len(text_tokenizer)} tokens, the checkpoint's text tower {config.text_config.vocab_size}")
    if hparams.get("max_text_len"):  # captions are cut where training cut them
        text_tokenizer.model_max_length = int(hparams["max_text_len"])
    side = config.vision_config.image_size
    image_processor = BridgeTowerImageProcessorPil(size={"shortest_edge": side}, crop_size={"shortest_edge": side})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if found == "bridgetower":
        config.architectures = ["BridgeTowerForImageAndTextRetrieval"]
    config.save_pretrained(out_dir)
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    BridgeTowerProcessor(image_processor, text_tokenizer).save_pretrained(out_dir)
    return Conversion(out_dir, found, config, dropped)
