"""BridgeTower split for retrieval.

transformers' `BridgeTowerForContrastiveLearning` and `BridgeTowerForImageAndTextRetrieval` run
both towers *and* the cross-modal encoder on every (text, image) pair. A search engine needs
three cheaper pieces, computed from the same weights:

- `encode_text` / `encode_image`: one tower alone, giving the normalised ITC embedding (for
  FAISS) and, on request, the tower's *bridge inputs*: the top `num_hidden_layers` uni-modal
  layers after their cross-modal transform and token-type embedding. Each depends on one
  modality only, so it is computed once per item and reused for every pair it joins.
- `match_logits`: the cross-modal layers and the ITM head on ready bridge inputs of pairs.
- `text_attentions` (to explain a hit, not to rank): the same layers computed in full, with
  the text side's self- and cross-attention probabilities (what `explain` draws).

Read it beside `modeling_bridgetower.py` (`BridgeTowerModel.forward`): the same submodules are
called in the same order with the same masks, so the numbers equal the reference's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import BridgeTowerConfig
from transformers.masking_utils import create_bidirectional_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bridgetower.modeling_bridgetower import (
    BridgeTowerContrastiveHead,
    BridgeTowerITMHead,
    BridgeTowerModel,
    BridgeTowerPreTrainedModel,
    eager_attention_forward,
)

TEXT_TOKEN_TYPE = 0
IMAGE_TOKEN_TYPE = 1
# The hub's ITC checkpoint projects to 512; a config without the field has no ITC heads anyway.
DEFAULT_CONTRASTIVE_SIZE = 512


@dataclass
class TowerOutput:
    """What one tower gives for a batch of items of its modality."""

    embeds: torch.Tensor | None  # (B, D) L2-normalised ITC embeddings (None for cached bridge inputs)
    bridge: torch.Tensor | None = None  # (B, num_hidden_layers, S, H) bridge inputs, or None
    mask: torch.Tensor | None = None  # (B, S) text attention mask; None for images (never padded)


class RetrievalHeads:
    """What every retrieval model family shares about its heads (`itc_text_head`,
    `itc_image_head`, `itm_score`): the ITC width, and keeping them in float32."""

    config: Any  # the model's BridgeTowerConfig (the class this is mixed into sets it)

    @property
    def embed_dim(self) -> int:
        return self.config.contrastive_hidden_size

    def keep_heads_in_float32(self):
        """After a cast to half precision: the ITC and ITM heads (a few linear layers, no cost)
        go back to float32, so scores are not rounded to half precision's 8 or 11 bits."""
        for head in (self.itc_text_head, self.itc_image_head, self.itm_score):
            head.float()
        return self


class BridgeTowerRetrievalModel(RetrievalHeads, BridgeTowerPreTrainedModel):
    """The BridgeTower body with the ITC heads and the ITM head, loaded from one state dict.

    Parameter names equal those of transformers' task models (`bridgetower.*`, `itc_text_head`,
    `itc_image_head`, `itm_score`), so `from_pretrained` reads the hub checkpoints as they are.
    """

    def __init__(self, config: BridgeTowerConfig):
        if not hasattr(config, "contrastive_hidden_size"):
            config.contrastive_hidden_size = DEFAULT_CONTRASTIVE_SIZE
        super().__init__(config)
        self.bridgetower = BridgeTowerModel(config)
        self.itc_text_head = BridgeTowerContrastiveHead(config.hidden_size, config.contrastive_hidden_size)
        self.itc_image_head = BridgeTowerContrastiveHead(config.hidden_size, config.contrastive_hidden_size)
        self.itm_score = BridgeTowerITMHead(config.hidden_size * 2)
        # Where the image ITC head reads: "transformed" (transformers' convention) or "ln_post"
        # (microsoft/BridgeTower's, recorded by `btsearch convert`).
        self.itc_image_head_input = getattr(config, "itc_image_head_input", "transformed")
        if self.itc_image_head_input not in ("transformed", "ln_post"):
            raise ValueError(f"unknown itc_image_head_input {self.itc_image_head_input!r} in the config")
        self.post_init()

    # -- shapes -------------------------------------------------------------------------------

    @property
    def num_bridge_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def first_bridge_layer(self) -> int:
        """Index of the uni-modal layer whose output feeds cross-modal layer 0.

        The reference runs `split_index = L - num_hidden_layers + 1` layers before the first
        cross-modal layer, so that layer is `split_index - 1`; the next ones follow one by one.
        Both towers are indexed with the *text* tower's depth, as the reference does.
        """
        return len(self.bridgetower.text_model.encoder.layer) - self.num_bridge_layers

    # -- towers -------------------------------------------------------------------------------

    def _token_type(self, index: int, like: torch.Tensor) -> torch.Tensor:
        return token_type_embedding(self.bridgetower.token_type_embeddings, index, like)

    def _text_mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        # The reference builds its text mask from a one-token query slice; do the same.
        return create_bidirectional_mask(
            config=self.bridgetower.config, inputs_embeds=hidden[:, 0:1, :], attention_mask=attention_mask
        )

    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_bridge: bool = False) -> TowerOutput:
        bt = self.bridgetower
        hidden = bt.text_model.embeddings(input_ids=input_ids)
        mask = self._text_mask(hidden, attention_mask)
        token_type = self._token_type(TEXT_TOKEN_TYPE, hidden)
        bridge = []
        last = len(bt.text_model.encoder.layer) - 1
        for index, layer in enumerate(bt.text_model.encoder.layer):
            if index == last and not with_bridge:
                hidden = _text_layer_first_token(layer, hidden, mask)  # the ITC head reads [CLS] alone
                break
            hidden = layer(hidden, mask)
            bridge_index = index - self.first_bridge_layer
            if with_bridge and bridge_index >= 0:
                state = bt._apply_text_transform(hidden, bridge_index) + token_type
                if bridge_index == 0:
                    state = bt.cross_modal_text_layernorm(state)
                bridge.append(state)
        embeds = nn.functional.normalize(_run_head(self.itc_text_head, hidden[:, 0, :]), dim=-1, p=2)
        return TowerOutput(
            embeds=embeds,
            bridge=torch.stack(bridge, dim=1) if with_bridge else None,
            mask=attention_mask if with_bridge else None,
        )

    @torch.inference_mode()
    def encode_image(self, pixel_values: torch.Tensor, with_bridge: bool = False) -> TowerOutput:
        bt = self.bridgetower
        visual = bt.vision_model.visual
        hidden = visual.forward_pre(pixel_values.type(bt.vision_model.dtype))  # (S, B, H)
        token_type = self._token_type(IMAGE_TOKEN_TYPE, hidden)
        last = len(bt.text_model.encoder.layer)  # the reference stops the image tower here too
        bridge = []
        for index, block in enumerate(visual.transformer.resblocks[:last]):
            if index == last - 1 and not with_bridge:
                # Only [CLS] leaves the tower for the ITC head: the last block computes just it.
                hidden = _residual_block_first_token(block, hidden)
                break
            hidden = block(hidden)
            bridge_index = index - self.first_bridge_layer
            if with_bridge and bridge_index >= 0:
                state = bt._apply_image_transform(visual.forward_post(hidden), bridge_index) + token_type
                if bridge_index == 0:
                    state = bt.cross_modal_image_layernorm(state)
                bridge.append(state)
        cls = visual.forward_post(hidden[0:1])[:, 0, :]
        if self.itc_image_head_input != "ln_post":
            # BridgeTowerForContrastiveLearning: the (shared) image transform and the image token
            # type come *before* the ITC image head. microsoft/BridgeTower's own checkpoints
            # (converted by `btsearch convert`) apply the head to ln_post's output directly.
            cls = self._itc_image_transform(cls[:, None, :])[:, 0, :] + token_type
        embeds = nn.functional.normalize(_run_head(self.itc_image_head, cls), dim=-1, p=2)
        return TowerOutput(embeds=embeds, bridge=torch.stack(bridge, dim=1) if with_bridge else None)

    def _itc_image_transform(self, hidden: torch.Tensor) -> torch.Tensor:
        # With per-layer transforms the reference has no single choice; the last layer's is ours.
        return self.bridgetower._apply_image_transform(hidden, self.num_bridge_layers - 1)

    # -- cross-modal encoder + ITM --------------------------------------------------------------

    def _link_tower(self, towers, index: int):
        return towers if self.config.share_link_tower_layers else towers[index]

    @torch.inference_mode()
    def match_logits(self, text_bridge: torch.Tensor, text_mask: torch.Tensor, image_bridge: torch.Tensor, both: bool = False) -> torch.Tensor:
        """ITM match logit (`logits[:, 1]` of the reference) of pair b = (text b, image b);
        `both=True`: both logits, (B, 2), as the reference's `logits`.

        text_bridge: (B, N, T, H), text_mask: (B, T), image_bridge: (B, N, P, H).
        """
        logits = self._itm_logits(*self._cross_modal_encoder(text_bridge, text_mask, image_bridge))
        return logits if both else logits[:, 1]

    @torch.inference_mode()
    def text_attentions(self, text_bridge: torch.Tensor, text_mask: torch.Tensor, image_bridge: torch.Tensor) -> PairAttentions:
        """The text side's attention probabilities in every cross-modal layer, all heads, with
        the pairs' ITM logits from the same pass. Every text position is computed (not just
        [CLS]): what `BridgeTowerModel.forward` computes, and what its text
        `BridgeTowerCrossAttention` modules return (transformers returns the self-attentions
        as `attentions[layer][0]`, and drops the cross-attentions)."""
        recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
        text_out, image_out = self._cross_modal_encoder(text_bridge, text_mask, image_bridge, recorded)
        return PairAttentions.stacked(recorded, self._itm_logits(text_out, image_out))

    def _itm_logits(self, text_out: torch.Tensor, image_out: torch.Tensor) -> torch.Tensor:
        return _run_head(self.itm_score, self.bridgetower.get_cls_features(text_out, image_out))

    def _cross_modal_encoder(
        self, text_bridge: torch.Tensor, text_mask: torch.Tensor, image_bridge: torch.Tensor, recorded: list | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The cross-modal layers on bridge inputs: the last layer's text and image states.
        Those are [CLS] alone (all the ITM head reads), unless `recorded` is a list: then every
        text position is computed and each layer's text (self, cross) attentions appended to it."""
        bt = self.bridgetower
        mask = self._text_mask(text_bridge[:, 0], text_mask)
        last = self.num_bridge_layers - 1
        text_in, image_in = text_bridge[:, 0], image_bridge[:, 0]
        text_out, image_out = text_in, image_in  # each layer's outputs, read by the next layer's link towers
        for layer in range(self.num_bridge_layers):
            if layer > 0:
                text_in = self._link_tower(bt.cross_modal_text_link_tower, layer - 1)(text_bridge[:, layer], text_out, mask)
                image_in = self._link_tower(bt.cross_modal_image_link_tower, layer - 1)(image_bridge[:, layer], image_out, None)
            text_layer, image_layer = bt.cross_modal_text_layers[layer], bt.cross_modal_image_layers[layer]
            text_out, image_out = _cross_layer_pair(text_layer, image_layer, text_in, image_in, mask, layer == last, recorded)
        return text_out, image_out


@dataclass
class PairAttentions:
    """The text side's attention probabilities in the cross-modal layers, for a batch of pairs."""

    text_self: torch.Tensor  # (B, layers, heads, T, T): text tokens over text tokens
    text_to_image: torch.Tensor  # (B, layers, heads, T, P): text tokens over image tokens ([CLS] first)
    logits: torch.Tensor  # (B, 2) ITM logits (no match, match) of the same pass

    @classmethod
    def stacked(cls, recorded: list[tuple[torch.Tensor, torch.Tensor]], logits: torch.Tensor) -> PairAttentions:
        return cls(torch.stack([r[0] for r in recorded], dim=1), torch.stack([r[1] for r in recorded], dim=1), logits)


def token_type_embedding(embeddings: nn.Embedding, index: int, like: torch.Tensor) -> torch.Tensor:
    """Row `index` of a token-type table, on `like`'s device and in its dtype, shape (1, H)."""
    ids = torch.full((1,), index, dtype=torch.long, device=like.device)
    return embeddings(ids).to(like.dtype)


def _run_head(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    return head(features.to(next(head.parameters()).dtype))


def _residual_block_first_token(block, hidden: torch.Tensor) -> torch.Tensor:
    """`BridgeTowerResidualAttention(hidden)[0:1]` (sequence first), computing only that position:
    its query attends to every position, and the rest of the block is per position."""
    normed = block.ln_1(hidden)
    residual = hidden[0:1] + block.attn(normed[0:1], normed, normed, need_weights=False)[0]
    out = block.ln_2(residual)
    for layer in block.mlp.values():
        out = layer(out)
    return residual + out


def _self_attention_first_token(layer, hidden: torch.Tensor, mask) -> torch.Tensor:
    """`layer.attention(hidden, mask)[0][:, :1]` of a BERT-style layer, computing only that
    position: its query comes from the first token, keys and values from all of `hidden`."""
    attention = layer.attention.self
    batch, length, _ = hidden.shape
    first = hidden[:, :1]
    query = attention.query(first).view(batch, 1, -1, attention.attention_head_size).transpose(1, 2)
    key = attention.key(hidden).view(batch, length, -1, attention.attention_head_size).transpose(1, 2)
    value = attention.value(hidden).view(batch, length, -1, attention.attention_head_size).transpose(1, 2)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation, eager_attention_forward)
    attended, _ = attend(attention, query, key, value, mask, dropout=0.0, scaling=attention.scaling)
    return layer.attention.output(attended.reshape(batch, 1, -1), first)


def _text_layer_first_token(layer, hidden: torch.Tensor, mask) -> torch.Tensor:
    """`BridgeTowerTextLayer(hidden, mask)[:, :1]`: the feed-forward is per position."""
    return layer.feed_forward_chunk(_self_attention_first_token(layer, hidden, mask))


def _cross_layer_first_token(layer, hidden: torch.Tensor, other: torch.Tensor, self_mask, cross_mask) -> torch.Tensor:
    """`BridgeTowerBertCrossLayer(hidden, other)[0][:, :1]`, computing only that position:
    cross-attention, the residuals and the feed-forward are per position."""
    attended = _self_attention_first_token(layer, hidden, self_mask)
    crossed, _ = layer.crossattention(attended, encoder_hidden_states=other, encoder_attention_mask=cross_mask)
    return layer.feed_forward_chunk(crossed)


def _cross_layer_pair(text_layer, image_layer, text_in, image_in, mask, is_last: bool, recorded: list | None):
    """One cross-modal layer on both sides, as `BridgeTowerModel.forward` calls it (the image side
    reads the layer's text *input*). In the last layer only [CLS] is computed, unless the text
    side's attentions are being `recorded`: then all of the text side is."""
    if recorded is not None:
        text_out, self_weights, cross_weights = _cross_layer_with_attentions(text_layer, text_in, image_in, mask)
        recorded.append((self_weights, cross_weights))
    elif is_last:
        text_out = _cross_layer_first_token(text_layer, text_in, image_in, self_mask=mask, cross_mask=None)
    else:
        text_out = text_layer(text_in, image_in, attention_mask=mask)[0]
    if is_last:  # nothing reads the image side's other positions after the last layer
        image_out = _cross_layer_first_token(image_layer, image_in, text_in, self_mask=None, cross_mask=mask)
    else:
        image_out = image_layer(image_in, text_in, encoder_attention_mask=mask)[0]
    return text_out, image_out


def _attention_with_probabilities(attention, hidden: torch.Tensor, other: torch.Tensor, mask) -> tuple[torch.Tensor, torch.Tensor]:
    """`BridgeTower{Self,Cross}Attention(hidden, other)` through the eager attention function,
    which returns the probabilities (SDPA would not): (attended (B, T, H), (B, heads, T, S))."""
    batch, length, _ = hidden.shape
    query = attention.query(hidden).view(batch, length, -1, attention.attention_head_size).transpose(1, 2)
    key = attention.key(other).view(batch, other.shape[1], -1, attention.attention_head_size).transpose(1, 2)
    value = attention.value(other).view(batch, other.shape[1], -1, attention.attention_head_size).transpose(1, 2)
    if mask is not None and mask.dtype == torch.bool:  # a mask made for SDPA: True = attend
        mask = torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(~mask, torch.finfo(query.dtype).min)
    attended, probabilities = eager_attention_forward(attention, query, key, value, mask, dropout=0.0, scaling=attention.scaling)
    return attended.reshape(batch, length, -1), probabilities


def _cross_layer_with_attentions(layer, hidden: torch.Tensor, other: torch.Tensor, self_mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`BridgeTowerBertCrossLayer(hidden, other, attention_mask=self_mask)` of the text side (its
    cross-attention has no mask: images are never padded), with both attentions' probabilities:
    (output, self-attention (B, heads, T, T), cross-attention (B, heads, T, P))."""
    attended, self_weights = _attention_with_probabilities(layer.attention.self, hidden, hidden, self_mask)
    attended = layer.attention.output(attended, hidden)
    crossed, cross_weights = _attention_with_probabilities(layer.crossattention.self, attended, other, None)
    crossed = layer.crossattention.output(crossed, attended)
    return layer.feed_forward_chunk(crossed), self_weights, cross_weights
