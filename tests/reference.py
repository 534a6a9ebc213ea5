"""The transformers reference: its own BridgeTower task classes on the same checkpoint folder."""

from functools import lru_cache

import torch
from PIL import Image
from transformers import (
    BridgeTowerForContrastiveLearning,
    BridgeTowerForImageAndTextRetrieval,
    BridgeTowerProcessor,
)

from btsearch.media.images import load_rgb


@lru_cache(maxsize=8)
def _models(checkpoint: str, device: str = "cpu"):
    processor = BridgeTowerProcessor.from_pretrained(checkpoint)
    itc = BridgeTowerForContrastiveLearning.from_pretrained(checkpoint).eval().to(device)
    itm = BridgeTowerForImageAndTextRetrieval.from_pretrained(checkpoint).eval().to(device)
    return processor, itc, itm


def _inputs(checkpoint, texts, images, device="cpu"):
    processor, _, _ = _models(str(checkpoint))
    pictures = [image if isinstance(image, Image.Image) else load_rgb(image) for image in images]
    inputs = processor(images=pictures, text=list(texts), padding=True, truncation=True, max_length=40, return_tensors="pt")
    return inputs.to(device)


@torch.no_grad()
def itc_embeddings(checkpoint, texts, images, device="cpu"):
    """(text_embeds, image_embeds) of BridgeTowerForContrastiveLearning; texts[i] pairs images[i]."""
    _, itc, _ = _models(str(checkpoint), device)
    out = itc(**_inputs(checkpoint, texts, images, device))
    return out.text_embeds.cpu().numpy(), out.image_embeds.cpu().numpy()


@torch.no_grad()
def itm_logit(checkpoint, text, image, device="cpu") -> float:
    """logits[:, 1] of BridgeTowerForImageAndTextRetrieval for one (text, image) pair."""
    _, _, itm = _models(str(checkpoint), device)
    return float(itm(**_inputs(checkpoint, [text], [image], device)).logits[0, 1])


@torch.no_grad()
def match_log_odds(checkpoint, text, image, device="cpu") -> float:
    """logits[:, 1] - logits[:, 0] of BridgeTowerForImageAndTextRetrieval for one pair: what
    search ranks re-ranked hits by (the match probability is its sigmoid; in float32 that rounds
    clear matches to 1.0, this does not)."""
    _, _, itm = _models(str(checkpoint), device)
    logits = itm(**_inputs(checkpoint, [text], [image], device)).logits[0]
    return float(logits[1]) - float(logits[0])


def pixel_values(checkpoint, images):
    processor, _, _ = _models(str(checkpoint))
    pictures = [image if isinstance(image, Image.Image) else load_rgb(image) for image in images]
    return processor(images=pictures, text=["x"] * len(images), return_tensors="pt")["pixel_values"]


@torch.no_grad()
def match_probability(checkpoint, text, image, device="cpu") -> float:
    """softmax(logits)[:, 1] of BridgeTowerForImageAndTextRetrieval: the probability of a match."""
    _, _, itm = _models(str(checkpoint), device)
    return float(itm(**_inputs(checkpoint, [text], [image], device)).logits.softmax(dim=-1)[0, 1])
