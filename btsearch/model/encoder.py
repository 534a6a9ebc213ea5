"""A BridgeTower checkpoint ready for retrieval: its processor and model on one device.

Everything that turns pictures and strings into tensors (and tensors back into numpy) lives
here, so the collection and the CLI deal in paths, strings and arrays only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from transformers import AutoProcessor, BridgeTowerConfig

from ..defaults import DEFAULT_MODEL, resolve_model_id
from ..errors import ModelLoadError
from ..media.loader import default_workers
from .bridgetower import BridgeTowerRetrievalModel, TowerOutput
from .device import precision_name, resolve_device, resolve_dtype
from .pixels import ImagePreparer, normalize_pixels, pixel_table
from .tensors import to_numpy

ITC_HEADS = ("itc_text_head", "itc_image_head")
ITM_HEAD = "itm_score"
log = logging.getLogger(__name__)

# Keys of a config that say nothing about the weights' meaning and change with the library.
_VOLATILE_CONFIG_KEYS = {"transformers_version", "architectures", "dtype", "torch_dtype", "output_hidden_states"}


def config_hash(config) -> str:
    """A fingerprint of the architecture, stable across transformers versions' bookkeeping."""

    def clean(value):
        if isinstance(value, dict):
            return {str(k): clean(v) for k, v in value.items() if not str(k).startswith("_") and k not in _VOLATILE_CONFIG_KEYS}
        return value

    canonical = json.dumps(clean(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class Encoder:
    """Embeds texts and images with the uni-modal towers and scores pairs with the ITM head."""

    def __init__(self, model: BridgeTowerRetrievalModel, processor, model_id: str, device: torch.device, has_itm: bool):
        self.model = model
        self.processor = processor
        self.model_id = model_id
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.has_itm = has_itm
        self.config_hash = config_hash(model.config)
        # Images are prepared (resized, cropped: uint8) by loader workers and normalised where
        # the model runs, by a table lookup that equals the processor's arithmetic exactly.
        self.prepare_image = ImagePreparer(processor.image_processor)
        self.pixel_table = pixel_table(processor.image_processor)
        # Flat, in the model's dtype (rounding the table equals rounding what is looked up in
        # it): entry 256 c + v is channel c's value for byte v.
        self._device_pixel_table = torch.as_tensor(self.pixel_table).reshape(-1).to(device, self.dtype)
        self._channel_rows = torch.tensor([0, 256, 512], dtype=torch.int32, device=device).view(3, 1, 1)
        text_config = model.config.text_config
        # RoBERTa positions start after the padding index, hence the 2 reserved positions.
        limit = text_config.max_position_embeddings - text_config.pad_token_id - 1
        self.max_text_length = min(limit, processor.tokenizer.model_max_length)

    # -- loading ---------------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, source: str = DEFAULT_MODEL, device: str = "auto", precision: str = "auto") -> Encoder:
        """Load config, processor and weights from a hub id or a local folder.

        precision: fp32 (reproduces transformers exactly), bf16, fp16, or auto (bf16 where the
        hardware has it natively; see `device.default_dtype`)."""
        model_id = resolve_model_id(source)
        if Path(model_id).is_dir():
            _check_folder(Path(model_id))
        torch_device = resolve_device(device)
        dtype = resolve_dtype(precision, torch_device)
        previous = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # unused heads (MLM, ITC cross-modal) are expected
        transformers.logging.disable_progress_bar()
        try:
            model_class = model_class_for(BridgeTowerConfig.from_pretrained(model_id))
            model, info = model_class.from_pretrained(model_id, output_loading_info=True)
            processor = AutoProcessor.from_pretrained(model_id)
        except OSError as error:
            offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else ""
            raise ModelLoadError(f"cannot load model {source!r}{offline}: {_first_line(error)}") from error
        except (ValueError, RuntimeError) as error:
            raise ModelLoadError(f"checkpoint {source!r} does not fit its config: {_first_line(error)}") from error
        finally:
            transformers.logging.set_verbosity(previous)
        has_itm = _check_heads(source, info)
        model = model.to(device=torch_device, dtype=dtype).keep_heads_in_float32().eval()
        return cls(model, processor, model_id, torch_device, has_itm)

    # -- inputs ----------------------------------------------------------------------------

    @property
    def embed_dim(self) -> int:
        return self.model.embed_dim

    @property
    def precision(self) -> str:
        """The model's precision by its command-line name ("fp32", "bf16", "fp16")."""
        return precision_name(self.dtype)

    @property
    def crop_size(self) -> int:
        """Pixels a side of the image tower's input (the processor's crop)."""
        return int(self.model.config.vision_config.image_size)

    @property
    def loader_workers(self) -> int:
        """Threads that decode and prepare images ahead of this encoder."""
        return default_workers(model_on_gpu=self.device.type == "cuda")

    def preprocess_image(self, image: Image.Image) -> np.ndarray:
        """Pixels exactly as `BridgeTowerProcessor` makes them: (3, S, S) float32."""
        return normalize_pixels(self.prepare_image(image), self.pixel_table)

    def tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        # ManagerTower's managers see padding (they apply no mask): pad as in training, always.
        padding = "max_length" if getattr(self.model.config, "pads_text_to_max_length", False) else True
        tokens = self.processor.tokenizer(
            list(texts), padding=padding, truncation=True, max_length=self.max_text_length, return_tensors="pt"
        )
        return tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)

    def is_truncated(self, text: str) -> bool:
        return len(self.processor.tokenizer(text)["input_ids"]) > self.max_text_length

    def states_from_cache(self, bridges: np.ndarray) -> TowerOutput:
        """Cached bridge inputs (from a `BridgeCache`) as the image side of `match`."""
        return TowerOutput(embeds=None, bridge=self.to_model(bridges))

    def to_model(self, array: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Host data (pixels, cached bridge inputs) on the model's device, in its dtype."""
        return self._on_device(array).to(self.dtype)

    def _on_device(self, array: np.ndarray | torch.Tensor) -> torch.Tensor:
        """On the model's device as it is; through pinned memory on CUDA, so the copy overlaps
        with compute (pixels decoded on the GPU are there already)."""
        tensor = torch.as_tensor(array)
        if tensor.is_cuda:
            return tensor.to(self.device)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor

    # -- towers ----------------------------------------------------------------------------

    def text_states(self, texts: list[str], with_bridge: bool = False) -> TowerOutput:
        input_ids, attention_mask = self.tokenize(texts)
        return self.model.encode_text(input_ids, attention_mask, with_bridge=with_bridge)

    def image_states(self, pixels: np.ndarray | torch.Tensor, with_bridge: bool = False) -> TowerOutput:
        """Tower outputs of a batch of pixels: uint8 from `prepare_image`, or float32 from
        `preprocess_image`."""
        return self.model.encode_image(self.pixels_to_model(pixels), with_bridge=with_bridge)

    def pixels_to_model(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        tensor = torch.as_tensor(pixels)
        if tensor.dtype != torch.uint8:
            return self.to_model(tensor)
        index = self._on_device(tensor).to(torch.int32) + self._channel_rows  # int32: half of int64's memory
        return self._device_pixel_table.index_select(0, index.reshape(-1)).view(index.shape)

    def embed_texts(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        """(n, D) float32 normalised ITC text embeddings, in the order given."""
        out = np.empty((len(texts), self.embed_dim), dtype=np.float32)
        # Similar lengths together: less padding, same numbers (padding is masked).
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            out[chunk] = to_numpy(self.text_states([texts[i] for i in chunk]).embeds)
        return out

    def embed_pixels(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        return to_numpy(self.image_states(pixels).embeds)

    # -- ITM ------------------------------------------------------------------------------

    def match(self, text: TowerOutput, image: TowerOutput, both: bool = False) -> np.ndarray:
        """ITM match logits of pairs (n,); a batch of one on either side is paired with every
        item of the other side (the query's states are computed once and broadcast). `both=True`:
        both logits, (n, 2) (no match, match), from which `match_probability` follows."""
        assert text.bridge is not None and text.mask is not None and image.bridge is not None, "match needs bridge inputs"
        size = max(len(text.bridge), len(image.bridge))
        text_bridge = text.bridge.expand(size, *text.bridge.shape[1:])
        text_mask = text.mask.expand(size, *text.mask.shape[1:])
        image_bridge = image.bridge.expand(size, *image.bridge.shape[1:])
        return to_numpy(self.model.match_logits(text_bridge, text_mask, image_bridge, both=both))

    def text_attentions(self, text: TowerOutput, image: TowerOutput) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For one (text, image) pair, float32: the text side's self-attention (layers, heads,
        T, T) and cross-attention over the image tokens (layers, heads, T, P) in the cross-modal
        layers, and the ITM logits (2,) of the same pass."""
        assert text.bridge is not None and text.mask is not None and image.bridge is not None, "attentions need bridge inputs"
        found = self.model.text_attentions(text.bridge[:1], text.mask[:1], image.bridge[:1])
        return to_numpy(found.text_self)[0], to_numpy(found.text_to_image)[0], to_numpy(found.logits)[0]


def model_class_for(config) -> Any:
    """The retrieval model of the family a config names (`model_family`; BridgeTower by default)."""
    from .managertower import ManagerTowerRetrievalModel, is_managertower

    return ManagerTowerRetrievalModel if is_managertower(config) else BridgeTowerRetrievalModel


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _check_folder(folder: Path) -> None:
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"model folder {folder} has no config.json: it is not a saved BridgeTower checkpoint")
    weights = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")]
    if not weights:
        raise ModelLoadError(f"model folder {folder} has no weights (model.safetensors or pytorch_model.bin)")


def _check_heads(source: str, info: dict) -> bool:
    """Refuse a checkpoint without ITC heads; return whether it has the ITM head."""
    missing = list(info.get("missing_keys", []))
    absent_itc = [head for head in ITC_HEADS if any(key.startswith(head + ".") for key in missing)]
    if absent_itc:
        raise ModelLoadError(
            f"checkpoint {source!r} has no ITC heads ({', '.join(absent_itc)} missing): btsearch recalls "
            "candidates by the cosine of uni-modal ITC embeddings, which only a checkpoint trained with "
            "image-text contrastive learning provides (e.g. BridgeTower/bridgetower-large-itm-mlm-itc)"
        )
    body = [key for key in missing if not key.startswith((ITM_HEAD + ".",) + tuple(h + "." for h in ITC_HEADS))]
    if body:
        raise ModelLoadError(f"checkpoint {source!r} lacks {len(body)} weights of the model body, e.g. {body[0]}")
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        raise ModelLoadError(f"checkpoint {source!r} has weights of the wrong shape, e.g. {mismatched[0]}")
    has_itm = not any(key.startswith(ITM_HEAD + ".") for key in missing)
    if not has_itm:
        log.warning("checkpoint %r has no ITM head (itm_score): results are ranked by ITC alone, without re-ranking", source)
    return has_itm
