"""benchmarks/probe_set.py scores probes as transformers' BridgeTower classes do."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from . import reference

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "probe_set.py"


@pytest.fixture(scope="module")
def probe_set():
    spec = importlib.util.spec_from_file_location("probe_set", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["probe_set"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def probe_file(tmp_path, photos):
    """Two kinds, a sample photo by name and an image file by relative path."""
    (tmp_path / "mine.jpg").write_bytes(photos[3].read_bytes())  # rocket
    lines = [
        {"image": "chelsea", "caption": "a photo of a cat", "foil": "a photo with no cat", "kind": "negation"},
        {"image": "mine.jpg", "caption": "a rocket between two towers", "foil": "a tower between two rockets", "kind": "word order"},
        {"image": "coffee", "caption": "a cup on a saucer", "foil": "a saucer on a cup", "kind": "word order"},
    ]
    path = tmp_path / "probes.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    return path


def test_scores_and_accuracy_equal_transformers(probe_set, probe_file, random_checkpoint, tmp_path, capsys):
    probes = probe_set.read_probes(probe_file)
    assert [p.kind for p in probes] == ["negation", "word order", "word order"] and probes[1].image == str(probe_file.parent / "mine.jpg")
    files = probe_set.image_files(probes, tmp_path / "photos")
    expected = {key: [] for key in ("itc_caption", "itc_foil", "match_caption", "match_foil")}
    for probe in probes:
        image = files[probe.image]
        text_embeds, _ = reference.itc_embeddings(random_checkpoint, [probe.caption, probe.foil], [image, image])
        _, image_embeds = reference.itc_embeddings(random_checkpoint, ["x"], [image])
        expected["itc_caption"].append(float(text_embeds[0] @ image_embeds[0]))
        expected["itc_foil"].append(float(text_embeds[1] @ image_embeds[0]))
        expected["match_caption"].append(reference.match_probability(random_checkpoint, probe.caption, image))
        expected["match_foil"].append(reference.match_probability(random_checkpoint, probe.foil, image))

    from btsearch.model.encoder import Encoder

    encoder = Encoder.from_pretrained(str(random_checkpoint), device="cpu", precision="fp32")
    scores = probe_set.score_probes(encoder, probes, files)
    for key, values in expected.items():
        np.testing.assert_allclose(scores[key], values, atol=1e-5)

    # The table counts the probes whose caption outscores its foil in btsearch's scores (`main`
    # computes the ones above again). transformers' scores must rank each probe alike wherever
    # its caption and foil lie further apart than the two computations may differ; nearer, which
    # comes first is float rounding's choice (the closest here is 2.5e-4 apart).
    right = {name: scores[f"{name}_caption"] > scores[f"{name}_foil"] for name in ("itc", "match")}
    for name in right:
        caption, foil = np.array(expected[f"{name}_caption"]), np.array(expected[f"{name}_foil"])
        apart = np.abs(caption - foil) > 2e-5
        np.testing.assert_array_equal(right[name][apart], (caption > foil)[apart])
    assert probe_set.main(["--model", str(random_checkpoint), "--probes", str(probe_file), "--work", str(tmp_path), "--json"]) == 0
    table = json.loads(capsys.readouterr().out)["accuracy"]
    assert table["negation"] == {"probes": 1, "itc": 100.0 * right["itc"][0], "itm": 100.0 * right["match"][0]}
    assert table["word order"] == {"probes": 2, "itc": 50.0 * right["itc"][1:].sum(), "itm": 50.0 * right["match"][1:].sum()}
    assert table["all"]["probes"] == 3 and table["all"]["itm"] == pytest.approx(100.0 * right["match"].mean())


def test_builtin_probes_name_sample_photos_and_differ_from_their_foils(probe_set):
    from btsearch.demo.sample_photos import SAMPLE_PHOTOS

    probes = probe_set.builtin_probes()
    assert {p.kind for p in probes} == {"word order", "negation"} and len(probes) >= 20
    assert all(p.image in SAMPLE_PHOTOS and p.caption != p.foil for p in probes)
    # A word-order foil uses the caption's words (give or take an article's form), only elsewhere.
    def words(text):
        return sorted("a" if word == "an" else word.removesuffix("s") for word in text.split())

    for p in probes:
        if p.kind == "word order":
            assert words(p.caption) == words(p.foil), p


@pytest.mark.parametrize("content, message", [
    ('{"image": "chelsea", "caption": "a cat"}', "not a JSON object with image, caption, foil and kind"),
    ('{"image": "nowhere.jpg", "caption": "a", "foil": "b", "kind": "k"}', "neither a sample photo nor an image file"),
    ('{"image": "chelsea", "caption": "", "foil": "b", "kind": "k"}', "non-empty strings"),
    ("", "holds no probes"),
])
def test_a_bad_probe_file_is_one_line(probe_set, tmp_path, capsys, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    assert probe_set.main(["--probes", str(path), "--work", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
