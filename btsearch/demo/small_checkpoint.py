"""Small BridgeTower checkpoints built offline, for the tests and the demo's offline fallback.

The real checkpoints (e.g. `BridgeTower/bridgetower-large-itm-mlm-itc`) are gigabytes behind a
network. `build_small_checkpoint` writes a folder with the same on-disk layout, so every
loading path of the engine is exercised unchanged:

- `config.json` of a tiny `BridgeTowerConfig` (hidden size 64, a few layers);
- ONE `model.safetensors` with the body `bridgetower.*` and, as requested by `heads`, the ITC
  heads (`itc_text_head.fc.*`, `itc_image_head.fc.*`, `itc_cross_modal_head.fc.*`,
  `logit_scale`) and the ITM head (`itm_score.fc.*`);
- the processor files of `BridgeTowerProcessor.save_pretrained`, with a byte-level BPE
  tokenizer trained here (RoBERTa's special-token ids) and a BridgeTower image processor.

With `train_steps > 0` the model is briefly trained on the scikit-image sample photos
(`btsearch.demo.sample_photos`), so retrieval results are meaningful: each photo's own captions
rank it first, by ITC cosine and by ITM logit alike. A forward pass takes milliseconds on CPU.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import ByteLevelBPETokenizer
from transformers import (
    BridgeTowerConfig,
    BridgeTowerForContrastiveLearning,
    BridgeTowerForImageAndTextRetrieval,
    BridgeTowerProcessor,
    RobertaTokenizer,
)
from transformers.models.bridgetower.image_processing_pil_bridgetower import BridgeTowerImageProcessorPil

from .sample_photos import SAMPLE_PHOTOS, write_sample_photos

# RoBERTa's order, so <s>=0, <pad>=1, </s>=2 as the BridgeTower text config expects.
SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
VOCAB_SIZE = 600
ITC_PREFIXES = ("itc_text_head.", "itc_image_head.", "itc_cross_modal_head.", "logit_scale")
MAX_TEXT_LENGTH = 40  # in tokens, <s> and </s> included

# Generic sentences next to the captions, so that queries beyond the sample captions still
# split into sensible sub-words instead of single bytes.
_GENERIC_TEXT = """
a dog running on the beach near the sea
two children playing football in a green park
a man riding a bicycle down a busy city street
a woman reading a book in a quiet library
a bowl of fresh fruit with apples oranges and bananas
a white boat sailing on a blue lake under the clouds
a snowy mountain with pine trees in winter
a yellow taxi waiting at a traffic light
an old house with a wooden door and small windows
a bird sitting on the branch of a tree
a plate of pasta with tomato sauce and cheese
a train crossing a bridge over a river
people walking in the rain with umbrellas
a horse standing in a field of tall grass
a kitchen with a table chairs and a window
a computer keyboard and a mouse on a desk
a sunset over the ocean with orange and purple light
a little girl holding a red balloon
a group of friends sitting around a campfire at night
a street market selling vegetables and flowers
a black dog sleeping on a soft couch
an airplane flying high above the clouds
a glass of water and a sandwich on a tray
a bright green leaf covered in drops of water
a crowd watching a concert on a big stage
a close up of a flower with pink petals
the city skyline at dusk with lights in the buildings
a farmer driving a tractor across a wheat field
a painting of a village by the sea hanging on a wall
a small wooden bridge in a japanese garden
a police car parked beside the road
a baby smiling in the arms of her mother
a doctor looking at an x ray in a hospital
a sheep and a cow eating grass on a hill
a chocolate cake with candles on a birthday table
a bus full of passengers on a country road
a boy flying a kite on a windy day
the desert with sand dunes under a clear sky
an elephant walking with its baby in the savanna
a person skiing down a steep white slope
an empty road through a dark forest in autumn
a teacher writing on a blackboard in a classroom
a modern building made of glass and steel
a fisherman pulling a net onto a small boat
a cat playing with a ball of wool on the floor
a clock tower in the middle of an old square
a microscope on a laboratory bench next to test tubes
a map of the world with the continents in different colours
the night sky with the milky way and a bright planet
a chessboard with black and white pieces
"""


def _corpus() -> list[str]:
    captions = [caption for captions in SAMPLE_PHOTOS.values() for caption in captions]
    return captions + [line for line in _GENERIC_TEXT.splitlines() if line.strip()]


def build_tokenizer(work_dir: str | Path, vocab_size: int = VOCAB_SIZE) -> RobertaTokenizer:
    """Train a byte-level BPE on the captions and generic text; wrap it as a RoBERTa tokenizer.

    vocab.json and merges.txt are written to `work_dir`. The trainer is deterministic, so the
    same corpus always gives the same vocabulary.
    """
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        _corpus(), vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    vocab_path, merges_path = bpe.save_model(str(work_dir))
    tokenizer = RobertaTokenizer(vocab=vocab_path, merges=merges_path, model_max_length=MAX_TEXT_LENGTH)
    if len(tokenizer) != bpe.get_vocab_size():
        raise RuntimeError(f"RobertaTokenizer has {len(tokenizer)} tokens, the trained BPE {bpe.get_vocab_size()}")
    return tokenizer


def small_config(vocab_size: int, *, image_size: int = 64, **overrides) -> BridgeTowerConfig:
    """A tiny `BridgeTowerConfig`; keyword overrides replace its fields.

    `text_config` / `vision_config` overrides are dicts merged into the small defaults. The text
    width follows `hidden_size` (the cross-modal layers and the ITC text head require it); the
    vision width does too unless overridden, and must be a multiple of 64 (CLIP-style 64-wide
    attention heads). `image_size` is the vision tower's input size.
    """
    text_overrides = overrides.pop("text_config", {})
    vision_overrides = overrides.pop("vision_config", {})
    top = {
        "hidden_size": 64,
        "num_hidden_layers": 2,  # cross-modal layers
        "num_attention_heads": 2,
        "contrastive_hidden_size": 32,
        "logit_scale_init_value": 2.6592,
        **overrides,
    }
    text = {
        "vocab_size": vocab_size,
        "hidden_size": top["hidden_size"],
        "num_hidden_layers": 3,
        "num_attention_heads": top["num_attention_heads"],
        "intermediate_size": 2 * top["hidden_size"],
        # RoBERTa positions start after the padding id (1), hence the +2.
        "max_position_embeddings": MAX_TEXT_LENGTH + 2,
        # Dropout only slows the few hundred training steps down; inference never uses it.
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        **text_overrides,
    }
    vision = {
        "hidden_size": top["hidden_size"],
        "num_hidden_layers": 3,
        "patch_size": 16,
        "image_size": image_size,
        **vision_overrides,
    }
    return BridgeTowerConfig(**top, text_config=text, vision_config=vision)


def build_small_checkpoint(
    out_dir: str | Path,
    *,
    train_steps: int = 0,
    max_train_steps: int | None = None,
    seed: int = 0,
    heads=("itc", "itm"),
    image_size: int = 64,
    **config_overrides,
) -> Path:
    """Write a small BridgeTower checkpoint folder to `out_dir` and return its path.

    `heads` picks the head weights written: ("itc", "itm") like the hub's
    `bridgetower-large-itm-mlm-itc`, ("itm",) without any `itc_*` key or `logit_scale`,
    () the body alone like `bridgetower-base`. `train_steps` > 0 trains briefly on the sample
    photos: 150 steps (about 11 s on 2 idle CPU cores) usually rank each photo first for its
    own captions. With `max_train_steps`, training goes on in rounds of a third of
    `train_steps` until they do (by ITC and ITM, both ways) or that budget is spent: tests
    that assert rankings stay meaningful when a new torch or transformers version shifts the
    random initialisation. The result depends only on `seed` and the arguments (for a given
    torch thread count). `config_overrides` go to `small_config`.
    """
    unknown_heads = set(heads) - {"itc", "itm"}
    if unknown_heads:
        raise ValueError(f"Unknown head(s) {sorted(unknown_heads)}; choose from 'itc' and 'itm'")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(tmp)
    config = small_config(len(tokenizer), image_size=image_size, **config_overrides)
    side = config.vision_config.image_size
    image_processor = BridgeTowerImageProcessorPil(size={"shortest_edge": side}, crop_size={"shortest_edge": side})
    processor = BridgeTowerProcessor(image_processor, tokenizer)

    torch.manual_seed(seed)
    itc_model = BridgeTowerForContrastiveLearning(config)
    itm_model = BridgeTowerForImageAndTextRetrieval(config)
    # One body under both heads, as in the hub checkpoint that holds them side by side.
    itm_model.bridgetower = itc_model.bridgetower
    if train_steps > 0:
        batch = sample_batch(processor)
        train_on_sample_photos(itc_model, itm_model, batch, train_steps)
        trained, extra = train_steps, max(1, train_steps // 3)
        while max_train_steps is not None and trained + extra <= max_train_steps and sample_ranking_misses(itc_model, itm_model, batch):
            train_on_sample_photos(itc_model, itm_model, batch, extra)
            trained += extra

    state = {f"bridgetower.{key}": value for key, value in itc_model.bridgetower.state_dict().items()}
    if "itc" in heads:
        state.update({key: value for key, value in itc_model.state_dict().items() if key.startswith(ITC_PREFIXES)})
    if "itm" in heads:
        state.update({key: value for key, value in itm_model.state_dict().items() if key.startswith("itm_score.")})
    save_file(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def sample_batch(processor: BridgeTowerProcessor):
    """Preprocessed sample photos and captions: (pixel_values, text encodings, image index per caption).

    Photos are written to (and read back from) JPEG files first, as the engine would see them.
    """
    from PIL import Image

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_sample_photos(tmp)
        images = [Image.open(path).convert("RGB") for path in paths]
        pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
    captions = [caption for captions in SAMPLE_PHOTOS.values() for caption in captions]
    owners = torch.tensor([index for index, captions in enumerate(SAMPLE_PHOTOS.values()) for _ in captions])
    texts = processor.tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
    return pixel_values, texts, owners


@torch.no_grad()
def sample_ranking_misses(itc_model, itm_model, batch) -> int:
    """How many of the sample's rankings put a wrong item first.

    Counted over every caption (is its own photo first?) and every photo (is one of its own
    captions first?), by ITC cosine and by ITM logit alike: 0 means the checkpoint ranks the
    sample perfectly.
    """
    pixel_values, texts, owners = batch
    num_photos, num_captions = len(pixel_values), len(owners)
    itc = itc_model(input_ids=texts["input_ids"], attention_mask=texts["attention_mask"], pixel_values=pixel_values[owners])
    # Each photo's embedding from its first caption's row (the image tower ignores the text).
    first_rows = torch.stack([torch.nonzero(owners == photo)[0, 0] for photo in range(num_photos)])
    image_embeds = itc.image_embeds[first_rows]
    itc_scores = itc.text_embeds @ image_embeds.T
    captions = torch.arange(num_captions).repeat_interleave(num_photos)
    photos = torch.arange(num_photos).repeat(num_captions)
    itm_scores = itm_model(
        input_ids=texts["input_ids"][captions],
        attention_mask=texts["attention_mask"][captions],
        pixel_values=pixel_values[photos],
    ).logits[:, 1].view(num_captions, num_photos)
    misses = 0
    for scores in (itc_scores, itm_scores):
        misses += int((scores.argmax(dim=1) != owners).sum())
        misses += int((owners[scores.argmax(dim=0)] != torch.arange(num_photos)).sum())
    return misses


def train_on_sample_photos(itc_model, itm_model, batch, steps: int, lr: float = 1e-3) -> None:
    """Train the shared body and both heads with the ITC loss plus an ITM loss.

    Each step draws one caption per photo. ITC: the contrastive model's own loss over the
    photos of the batch. ITM: every photo with its caption (label 1), with another photo's
    caption and, for every caption, another photo (label 0): the second kind of negative is
    the one text-to-image ranking needs. Randomness comes from torch's global generator.
    """
    pixel_values, texts, owners = batch
    num_photos = len(pixel_values)
    photos = torch.arange(num_photos)
    captions_of = [torch.nonzero(owners == photo).flatten() for photo in photos]
    params = list({id(p): p for p in [*itc_model.parameters(), *itm_model.parameters()]}.values())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    # A short warm-up and gradient clipping keep the ITM head from stalling on some seeds.
    warmup = max(1, steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    itc_model.train()
    itm_model.train()
    for _ in range(steps):
        picks = torch.stack([ids[torch.randint(len(ids), ())] for ids in captions_of])
        # Shifting by a random non-zero offset pairs every photo with another photo's caption.
        other_captions = picks[(photos + torch.randint(1, num_photos, (num_photos,))) % num_photos]
        other_photos = (photos + torch.randint(1, num_photos, (num_photos,))) % num_photos
        itc_loss = itc_model(
            input_ids=texts["input_ids"][picks],
            attention_mask=texts["attention_mask"][picks],
            pixel_values=pixel_values,
            return_loss=True,
        ).loss
        pair_texts = torch.cat([picks, other_captions, picks])
        pair_photos = torch.cat([photos, photos, other_photos])
        itm_loss = itm_model(
            input_ids=texts["input_ids"][pair_texts],
            attention_mask=texts["attention_mask"][pair_texts],
            pixel_values=pixel_values[pair_photos],
            labels=torch.cat([torch.ones(num_photos), torch.zeros(2 * num_photos)]).long(),
        ).loss
        optimizer.zero_grad()
        (itc_loss + itm_loss).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
    itc_model.eval()
    itm_model.eval()
