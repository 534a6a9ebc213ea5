"""Probe set: can the model tell a true caption from a foil that differs only by word order or
by negation? ("a camera on a tripod" against "a tripod on a camera"; "a photo of a cat" against
"a photo with no cat".)

    python benchmarks/probe_set.py [--model M] [--probes FILE] [--device auto] [--precision fp32]

For each probe the model is right when the caption scores above the foil (a tie is wrong):
by ITC alone (the cosine of the two ITC embeddings, what FAISS recall ranks by) and by ITM (the
match probability, softmax of the ITM head's two logits, what re-ranking ranks by). Prints
accuracy per kind of foil for both.

The probes below are over scikit-image's sample photos (written by `btsearch.demo.sample_photos`,
no download); each caption was written looking at the photo, each foil is false of it.
--probes FILE brings your own: JSONL, one probe a line,
    {"image": "chelsea", "caption": "a cat with green eyes", "foil": "a cat with no eyes", "kind": "negation"}
where "image" is a sample photo's name (astronaut, camera, chelsea, coffee, coins,
hubble_deep_field, ihc, moon, motorcycle_left, retina, rocket) or an image file's path
(relative paths from FILE's folder), and "kind" any label to group the accuracy by.

--model defaults to the small checkpoint the demo falls back to (`btsearch.demo.small_checkpoint`,
trained for seconds on these photos' own captions; built once into --work): its figures show
the benchmark running, not BridgeTower's quality. On a real checkpoint:
`--model BridgeTower/bridgetower-large-itm-mlm-itc`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from btsearch.demo.prepare import FALLBACK_TRAIN_STEPS  # noqa: E402
from btsearch.demo.sample_photos import SAMPLE_PHOTOS, write_sample_photos  # noqa: E402
from btsearch.demo.small_checkpoint import build_small_checkpoint  # noqa: E402
from btsearch.media.images import load_rgb  # noqa: E402
from btsearch.model.bridgetower import TowerOutput  # noqa: E402
from btsearch.model.device import PRECISION_CHOICES  # noqa: E402
from btsearch.model.encoder import Encoder  # noqa: E402
from btsearch.search.ranking import match_probability  # noqa: E402

WORD_ORDER, NEGATION = "word order", "negation"

# (photo, kind, caption true of it, foil false of it)
PROBES: list[tuple[str, str, str, str]] = [
    ("astronaut", WORD_ORDER, "an astronaut holding a helmet", "a helmet holding an astronaut"),
    ("astronaut", WORD_ORDER, "a flag on the left and a space shuttle on the right", "a space shuttle on the left and a flag on the right"),
    ("astronaut", WORD_ORDER, "a woman in an orange suit with a black helmet", "a woman in a black suit with an orange helmet"),
    ("camera", WORD_ORDER, "a man looking through a camera", "a camera looking through a man"),
    ("camera", WORD_ORDER, "a camera on a tripod", "a tripod on a camera"),
    ("coffee", WORD_ORDER, "a cup on a saucer", "a saucer on a cup"),
    ("coffee", WORD_ORDER, "a white cup on a red saucer", "a red cup on a white saucer"),
    ("coffee", WORD_ORDER, "a spoon on the saucer", "a saucer on the spoon"),
    ("chelsea", WORD_ORDER, "a cat with green eyes and a pink nose", "a cat with pink eyes and a green nose"),
    ("motorcycle_left", WORD_ORDER, "a red motorcycle with a black seat", "a black motorcycle with a red seat"),
    ("motorcycle_left", WORD_ORDER, "a motorcycle in front of shelves", "shelves in front of a motorcycle"),
    ("rocket", WORD_ORDER, "a rocket between two towers", "a tower between two rockets"),
    ("rocket", WORD_ORDER, "the lights below the rocket", "the rocket below the lights"),
    ("retina", WORD_ORDER, "blood vessels spreading from a bright disc", "a bright disc spreading from blood vessels"),
    ("astronaut", NEGATION, "a woman who is smiling", "a woman who is not smiling"),
    ("camera", NEGATION, "a man with a camera", "a man without a camera"),
    ("camera", NEGATION, "a photo that is not in colour", "a photo that is not black and white"),
    ("chelsea", NEGATION, "a photo of a cat", "a photo with no cat"),
    ("chelsea", NEGATION, "a cat and no dog", "a dog and no cat"),
    ("coffee", NEGATION, "a cup of coffee", "a photo with no cup"),
    ("motorcycle_left", NEGATION, "a motorcycle with no rider", "a motorcycle with a rider"),
    ("rocket", NEGATION, "a launch pad with a rocket", "a launch pad with no rocket"),
    ("hubble_deep_field", NEGATION, "a sky full of galaxies", "a sky with no galaxies"),
    ("moon", NEGATION, "a grey surface with craters", "a grey surface with no craters"),
    ("coins", NEGATION, "a photo of coins", "a photo with no coins"),
    ("retina", NEGATION, "an eye with blood vessels", "an eye without blood vessels"),
    ("ihc", NEGATION, "a microscope image, not a landscape", "a landscape, not a microscope image"),
]


@dataclass(frozen=True)
class Probe:
    image: str  # a sample photo's name, or an image file's path
    caption: str
    foil: str
    kind: str


def builtin_probes() -> list[Probe]:
    return [Probe(image, caption, foil, kind) for image, kind, caption, foil in PROBES]


def read_probes(path: Path) -> list[Probe]:
    """Probes from a JSONL file; ValueError naming the line of a bad one."""
    probes = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            fields = {key: item[key] for key in ("image", "caption", "foil", "kind")}
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{path}:{number}: not a JSON object with image, caption, foil and kind") from None
        if not all(isinstance(value, str) and value.strip() for value in fields.values()):
            raise ValueError(f"{path}:{number}: image, caption, foil and kind must be non-empty strings")
        image = fields["image"]
        if image not in SAMPLE_PHOTOS:
            image = str(Path(image) if Path(image).is_absolute() else Path(path).parent / image)
            if not Path(image).is_file():
                raise ValueError(f"{path}:{number}: {fields['image']!r} is neither a sample photo nor an image file")
        probes.append(Probe(image, fields["caption"], fields["foil"], fields["kind"]))
    if not probes:
        raise ValueError(f"{path} holds no probes")
    return probes


def image_files(probes: list[Probe], photo_dir: Path) -> dict[str, Path]:
    """Each probe image's file: sample photos written into `photo_dir` (once), paths as they are."""
    names = sorted({probe.image for probe in probes if probe.image in SAMPLE_PHOTOS})
    missing = [name for name in names if not (photo_dir / f"{name}.png").exists()]
    if missing:
        write_sample_photos(photo_dir, missing, fmt="png")  # lossless: the photo as scikit-image ships it
    files = {name: photo_dir / f"{name}.png" for name in names}
    return files | {probe.image: Path(probe.image) for probe in probes if probe.image not in SAMPLE_PHOTOS}


def score_probes(encoder: Encoder, probes: list[Probe], files: dict[str, Path]) -> dict[str, np.ndarray]:
    """Per probe: the ITC cosine and the ITM match probability of its caption and of its foil
    with its image (arrays `itc_caption`, `itc_foil`, `match_caption`, `match_foil`)."""
    names = sorted({probe.image for probe in probes})
    pixels = np.stack([encoder.preprocess_image(load_rgb(files[name])) for name in names])
    images = encoder.image_states(pixels, with_bridge=True)
    assert images.embeds is not None and images.bridge is not None
    image_embeds = images.embeds.float().cpu().numpy()
    out: dict[str, list[float]] = {key: [] for key in ("itc_caption", "itc_foil", "match_caption", "match_foil")}
    for probe in probes:
        at = names.index(probe.image)
        texts = encoder.text_states([probe.caption, probe.foil], with_bridge=True)
        assert texts.embeds is not None
        cosine = texts.embeds.float().cpu().numpy() @ image_embeds[at]
        image = TowerOutput(embeds=None, bridge=images.bridge[at : at + 1])
        match = match_probability(encoder.match(texts, image, both=True).reshape(-1, 2))
        out["itc_caption"].append(float(cosine[0]))
        out["itc_foil"].append(float(cosine[1]))
        out["match_caption"].append(float(match[0]))
        out["match_foil"].append(float(match[1]))
    return {key: np.array(values) for key, values in out.items()}


def accuracy(probes: list[Probe], scores: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per kind (and "all"): probes, and the percentage whose caption outscores the foil by ITC and by ITM."""
    kinds = list(dict.fromkeys(probe.kind for probe in probes))
    itc_right = scores["itc_caption"] > scores["itc_foil"]
    itm_right = scores["match_caption"] > scores["match_foil"]
    table = {}
    for kind in [*kinds, "all"]:
        chosen = np.array([kind in ("all", probe.kind) for probe in probes])
        table[kind] = {"probes": int(chosen.sum()), "itc": float(100 * itc_right[chosen].mean()), "itm": float(100 * itm_right[chosen].mean())}
    return table


def print_table(model: str, table: dict[str, dict[str, float]]) -> None:
    print(f"probe set, {model}: caption scored above its foil (%)")
    print(f"{'kind':<14}{'probes':>7}{'ITC cosine':>12}{'ITM match':>11}")
    for kind, row in table.items():
        print(f"{kind:<14}{row['probes']:>7}{row['itc']:>12.1f}{row['itm']:>11.1f}")


def small_checkpoint(work: Path) -> Path:
    """The demo's fallback checkpoint, built once into `work`."""
    folder = work / "small-checkpoint"
    if not (folder / "model.safetensors").exists():
        print(f"building the small checkpoint in {folder} (once)", file=sys.stderr)
        build_small_checkpoint(folder, train_steps=FALLBACK_TRAIN_STEPS, max_train_steps=2 * FALLBACK_TRAIN_STEPS)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="hub id or folder [default: the small checkpoint, built into --work]")
    parser.add_argument("--probes", type=Path, default=None, help="JSONL probe file [default: the built-in probes]")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "btsearch-probe-set",
                        help="where the sample photos and the small checkpoint are kept [default: %(default)s]")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="fp32")
    parser.add_argument("--json", action="store_true", help="print the table as one JSON object")
    args = parser.parse_args(argv)
    try:
        probes = read_probes(args.probes) if args.probes else builtin_probes()
    except (OSError, ValueError) as error:
        print(f"probe_set: error: {error}", file=sys.stderr)
        return 1
    model = args.model or str(small_checkpoint(args.work))
    encoder = Encoder.from_pretrained(model, device=args.device, precision=args.precision)
    if not encoder.has_itm:
        print(f"probe_set: error: {model} has no ITM head", file=sys.stderr)
        return 1
    scores = score_probes(encoder, probes, image_files(probes, args.work / "photos"))
    table = accuracy(probes, scores)
    if args.json:
        print(json.dumps({"model": model, "precision": args.precision, "accuracy": table}))
    else:
        print_table(model if args.model else "small checkpoint (btsearch.demo.small_checkpoint, demo fallback)", table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
