"""ManagerTower (Xu et al., ACL 2023), split for retrieval like `model.BridgeTowerRetrievalModel`.

ManagerTower keeps BridgeTower's towers (RoBERTa, CLIP ViT) and cross-modal layers, but instead
of feeding cross-modal layer k the k-th top uni-modal layer, a *manager* before each
cross-modal layer aggregates all R managed uni-modal layers (the top R of each tower):

- SAUE (static): a learned softmax over the R layers, per channel, the same for every input;
- AAUE (adaptive): the weights come from each token of the previous cross-modal output,
  attending over the other modality's previous output (`linear_controller`), plus a learned
  weight on the previous cross-modal output itself.

Layer 0 always uses SAUE; with `manager_type="AAUE"` (the paper's model) layers 1.. use AAUE.
The retrieval split is the same as BridgeTower's: each item's *bridge inputs* (its R managed
layers after the cross-modal transform, token-type and layer embeddings) depend on one modality
and are computed once; `match_logits` runs the managers, cross-modal layers and ITM head.
Written from LooperXX/ManagerTower (`src/modules/mt_module.py`, `heads.py`). Its managers apply
no padding mask, so texts are padded to the training length (`pads_text_to_max_length`), which
makes a pair's score independent of the batch it is scored in, as in the original's eval.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import BridgeTowerConfig
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.bridgetower.modeling_bridgetower import (
    BridgeTowerBertCrossLayer,
    BridgeTowerContrastiveHead,
    BridgeTowerITMHead,
    BridgeTowerPooler,
    BridgeTowerPreTrainedModel,
    BridgeTowerTextModel,
    BridgeTowerVisionModel,
)

from .bridgetower import (
    DEFAULT_CONTRASTIVE_SIZE,
    IMAGE_TOKEN_TYPE,
    TEXT_TOKEN_TYPE,
    PairAttentions,
    RetrievalHeads,
    TowerOutput,
    _cross_layer_pair,
    _run_head,
    token_type_embedding,
)

FAMILY = "managertower"
MANAGER_TYPES = ("SAUE", "AAUE")


def is_managertower(config) -> bool:
    return getattr(config, "model_family", "bridgetower") == FAMILY


class StaticManager(nn.Module):
    """SAUE: softmax(layer_scores / T) over the R managed layers (per channel with "vector"
    weights), plus, after layer 0, a raw learned weight on the previous cross-modal output."""

    def __init__(self, hidden: int, managed: int, previous: int, vector: bool):
        super().__init__()
        width = hidden if vector else 1
        self.managed = managed
        self.layer_scores = nn.Parameter(torch.full((1, managed + previous, 1, width), 1.0 / managed))
        self.LayerNorm = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(managed + previous))
        self.softmax_temperature = nn.Parameter(torch.ones(1))
        self.softmax_temperature_cross = nn.Parameter(torch.ones(1))  # in the original, unused

    def forward(self, layers: torch.Tensor, previous: torch.Tensor | None = None, other: torch.Tensor | None = None) -> torch.Tensor:
        normed = torch.stack([norm(layers[:, r]) for r, norm in enumerate(self.LayerNorm[: self.managed])], dim=1)
        weights = torch.softmax(self.layer_scores[:, : self.managed] / self.softmax_temperature, dim=1)
        out = (weights * normed).sum(dim=1)
        if previous is not None and len(self.LayerNorm) > self.managed:
            out = out + self.layer_scores[:, self.managed] * self.LayerNorm[self.managed](previous)
        return out


class LayerAttention(nn.Module):
    """Single-head attention scores q_proj(query) . k_proj(key) / sqrt(D), no softmax, no values."""

    def __init__(self, hidden: int):
        super().__init__()
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        return self.q_proj(query) @ self.k_proj(key).transpose(-1, -2) / math.sqrt(self.q_proj.out_features)


class AdaptiveManager(nn.Module):
    """AAUE: per-token weights over the R managed layers, from the previous cross-modal output
    attending over the other modality's previous output."""

    def __init__(self, hidden: int, managed: int, vector: bool):
        super().__init__()
        self.managed, self.vector = managed, vector
        self.layer_scores_cross = nn.Parameter(torch.ones(1, 1, 1, hidden if vector else 1))
        self.linear_controller = nn.Linear(2 * hidden, managed)
        self.fusion_attention = LayerAttention(hidden)
        self.LayerNorm = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(managed + 1))
        self.extra_query_LayerNorm = nn.LayerNorm(hidden)
        self.softmax_temperature = nn.Parameter(torch.ones(1))
        self.softmax_temperature_cross = nn.Parameter(torch.ones(1))  # in the original, unused

    def forward(self, layers: torch.Tensor, previous: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        normed = torch.stack([norm(layers[:, r]) for r, norm in enumerate(self.LayerNorm[: self.managed])], dim=1)
        query = self.extra_query_LayerNorm(other)  # (B, L', D)
        current = self.LayerNorm[self.managed](previous)  # (B, L, D)
        attention = torch.softmax(self.fusion_attention(current, query), dim=-1)  # (B, L, L'), no mask
        scores = self.linear_controller(torch.cat([attention @ query, current], dim=-1))  # (B, L, R)
        weights = torch.softmax(scores.transpose(1, 2).unsqueeze(-1) / self.softmax_temperature, dim=1)  # (B, R, L, 1)
        return (weights * normed).sum(dim=1) + self.layer_scores_cross[:, 0] * current


class Manager(nn.Module):
    def __init__(self, config, index: int):
        super().__init__()
        hidden, managed = config.hidden_size, config.managed_layers
        vector = config.manager_weight_type == "vector"
        self.manager_layer: nn.Module
        if index > 0 and config.manager_type == "AAUE":
            self.manager_layer = AdaptiveManager(hidden, managed, vector)
        else:
            self.manager_layer = StaticManager(hidden, managed, 0 if index == 0 else 1, vector)

    def forward(self, layers, previous=None, other=None):
        return self.manager_layer(layers, previous, other)


def managertower_config(base: BridgeTowerConfig, manager_type: str = "AAUE", managed_layers: int = 6, manager_weight_type: str = "vector"):
    """`base` (a BridgeTowerConfig) marked as a ManagerTower with these managers."""
    if manager_type not in MANAGER_TYPES:
        raise ValueError(f"unknown manager_type {manager_type!r}")
    base.model_family = FAMILY
    base.manager_type = manager_type
    base.managed_layers = managed_layers
    base.manager_weight_type = manager_weight_type
    base.itc_image_head_input = "ln_post"  # ManagerTower's ITC heads read the pre-transform [CLS] states
    base.pads_text_to_max_length = True
    return base


class ManagerTowerRetrievalModel(RetrievalHeads, BridgeTowerPreTrainedModel):
    """ManagerTower's towers, managers, cross-modal layers, ITC heads and ITM head."""

    base_model_prefix = "managertower"

    def __init__(self, config: BridgeTowerConfig):
        if not hasattr(config, "contrastive_hidden_size"):
            config.contrastive_hidden_size = DEFAULT_CONTRASTIVE_SIZE
        super().__init__(config)
        hidden = config.hidden_size
        self.text_model = BridgeTowerTextModel(config.text_config)
        self.vision_model = BridgeTowerVisionModel(config.vision_config)
        self.cross_modal_text_transform = nn.Linear(config.text_config.hidden_size, hidden)
        self.cross_modal_image_transform = nn.Linear(config.vision_config.hidden_size, hidden)
        self.token_type_embeddings = nn.Embedding(2, hidden)
        self.layer_embeddings_text = nn.Embedding(config.text_config.num_hidden_layers, hidden)
        self.layer_embeddings_image = nn.Embedding(config.vision_config.num_hidden_layers, hidden)
        self.cross_modal_text_layers = nn.ModuleList(BridgeTowerBertCrossLayer(config.text_config) for _ in range(config.num_hidden_layers))
        self.cross_modal_image_layers = nn.ModuleList(BridgeTowerBertCrossLayer(config.text_config) for _ in range(config.num_hidden_layers))
        self.cross_modal_text_manager_tower = nn.ModuleList(Manager(config, i) for i in range(config.num_hidden_layers))
        self.cross_modal_image_manager_tower = nn.ModuleList(Manager(config, i) for i in range(config.num_hidden_layers))
        self.cross_modal_text_pooler = BridgeTowerPooler(config)
        self.cross_modal_image_pooler = BridgeTowerPooler(config)
        self.itc_text_head = BridgeTowerContrastiveHead(hidden, config.contrastive_hidden_size)
        self.itc_image_head = BridgeTowerContrastiveHead(hidden, config.contrastive_hidden_size)
        self.itm_score = BridgeTowerITMHead(hidden * 2)
        self.logit_scale = nn.Parameter(torch.tensor(getattr(config, "logit_scale_init_value", 2.6592)))
        self.post_init()

    # -- shapes (the engine reads these) --------------------------------------------------------

    @property
    def num_bridge_layers(self) -> int:
        return self.config.managed_layers

    # -- towers ---------------------------------------------------------------------------------

    def _text_mask(self, hidden: torch.Tensor, attention_mask: torch.Tensor):
        return create_bidirectional_mask(config=self.config.text_config, inputs_embeds=hidden[:, 0:1, :], attention_mask=attention_mask)

    def _bridge(self, layers: list[torch.Tensor], transform: nn.Linear, token_type: int, layer_embeddings: nn.Embedding) -> torch.Tensor:
        """(B, R, S, H): each managed layer transformed, plus token-type and its layer embedding."""
        first = layer_embeddings.num_embeddings - len(layers)
        rows = layer_embeddings.weight[first:].to(layers[0].dtype)
        return torch.stack(
            [transform(layer) + token_type_embedding(self.token_type_embeddings, token_type, layer) + rows[r] for r, layer in enumerate(layers)], dim=1
        )

    @torch.inference_mode()
    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, with_bridge: bool = False) -> TowerOutput:
        text = self.text_model
        hidden = text.embeddings(input_ids=input_ids)
        mask = self._text_mask(hidden, attention_mask)
        managed = []
        layers = text.encoder.layer
        for index, layer in enumerate(layers):
            hidden = layer(hidden, mask)
            if index >= len(layers) - self.num_bridge_layers:
                managed.append(hidden)
        embeds = nn.functional.normalize(_run_head(self.itc_text_head, hidden[:, 0, :]), dim=-1, p=2)
        if not with_bridge:
            return TowerOutput(embeds=embeds)
        bridge = self._bridge(managed, self.cross_modal_text_transform, TEXT_TOKEN_TYPE, self.layer_embeddings_text)
        return TowerOutput(embeds=embeds, bridge=bridge, mask=attention_mask)

    @torch.inference_mode()
    def encode_image(self, pixel_values: torch.Tensor, with_bridge: bool = False) -> TowerOutput:
        visual = self.vision_model.visual
        hidden = visual.forward_pre(pixel_values.type(self.vision_model.dtype))  # (S, B, H)
        blocks = visual.transformer.resblocks
        managed = []
        for index, block in enumerate(blocks):
            hidden = block(hidden)
            if with_bridge and index >= len(blocks) - self.num_bridge_layers:
                managed.append(visual.forward_post(hidden))
        last = visual.forward_post(hidden[0:1])[:, 0, :]  # ln_post of the last block's [CLS]
        embeds = nn.functional.normalize(_run_head(self.itc_image_head, last), dim=-1, p=2)
        if not with_bridge:
            return TowerOutput(embeds=embeds)
        bridge = self._bridge(managed, self.cross_modal_image_transform, IMAGE_TOKEN_TYPE, self.layer_embeddings_image)
        return TowerOutput(embeds=embeds, bridge=bridge)

    # -- managers + cross-modal layers + ITM ----------------------------------------------------

    @torch.inference_mode()
    def match_logits(self, text_bridge: torch.Tensor, text_mask: torch.Tensor, image_bridge: torch.Tensor, both: bool = False) -> torch.Tensor:
        """ITM match logit of pair b = (text b, image b), from (B, R, T, H) and (B, R, P, H);
        `both=True`: both logits, (B, 2)."""
        logits = self._itm_logits(*self._cross_modal_encoder(text_bridge, text_mask, image_bridge))
        return logits if both else logits[:, 1]

    @torch.inference_mode()
    def text_attentions(self, text_bridge: torch.Tensor, text_mask: torch.Tensor, image_bridge: torch.Tensor) -> PairAttentions:
        """The text side's self- and cross-attention probabilities in every cross-modal layer
        (every text position computed), with the ITM logits of the same pass."""
        recorded: list[tuple[torch.Tensor, torch.Tensor]] = []
        text_out, image_out = self._cross_modal_encoder(text_bridge, text_mask, image_bridge, recorded)
        return PairAttentions.stacked(recorded, self._itm_logits(text_out, image_out))

    def _itm_logits(self, text_out: torch.Tensor, image_out: torch.Tensor) -> torch.Tensor:
        pooled = torch.cat([self.cross_modal_text_pooler(text_out), self.cross_modal_image_pooler(image_out)], dim=-1)
        return _run_head(self.itm_score, pooled)

    def _cross_modal_encoder(
        self, text_bridge: torch.Tensor, text_mask: torch.Tensor, image_bridge: torch.Tensor, recorded: list | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Managers and cross-modal layers: the last layer's states ([CLS] alone unless the text
        side's attentions are `recorded`, as in `model.BridgeTowerRetrievalModel`)."""
        mask = self._text_mask(text_bridge[:, 0], text_mask)
        last = self.config.num_hidden_layers - 1
        text_out = image_out = None
        for layer in range(self.config.num_hidden_layers):
            text_in = self.cross_modal_text_manager_tower[layer](text_bridge, text_out, image_out)
            image_in = self.cross_modal_image_manager_tower[layer](image_bridge, image_out, text_out)
            text_layer, image_layer = self.cross_modal_text_layers[layer], self.cross_modal_image_layers[layer]
            text_out, image_out = _cross_layer_pair(text_layer, image_layer, text_in, image_in, mask, layer == last, recorded)
        assert text_out is not None and image_out is not None
        return text_out, image_out
