"""`btsearch eval flickr30k` against a brute-force computation from the full score matrices."""

import csv
import html
import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from btsearch.cli.main import main
from btsearch.collection import Collection
from btsearch.evaluate.calibration import calibration
from btsearch.search.ranking import match_probability

from . import reference

CANDIDATES = 3


@pytest.fixture(scope="module")
def flickr(tmp_path_factory, photos, photo_captions):
    """A Flickr30K-shaped data set: Karpathy JSON and hub CSV over the sample photos."""
    root = tmp_path_factory.mktemp("flickr")
    names = {p.name: p for p in photos}
    images = []
    for n, (stem, captions) in enumerate(photo_captions.items()):
        split = "test" if n < 8 else "train"
        images.append({"filename": f"{stem}.jpg", "split": split, "sentences": [{"raw": c, "tokens": c.split()} for c in captions]})
    (root / "dataset_flickr30k.json").write_text(json.dumps({"images": images, "dataset": "flickr30k"}))
    with (root / "flickr_annotations_30k.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["raw", "sentids", "split", "filename", "img_id"])
        for n, image in enumerate(images):
            writer.writerow([json.dumps([s["raw"] for s in image["sentences"]]), "[]", image["split"], image["filename"], n])
    test = [image for image in images if image["split"] == "test"]
    return root, names[test[0]["filename"]].parent, test


def brute_force_recall(itc, itm, caption_image, k):
    """Ranks by sorting each query's full candidate list with explicit keys."""

    def rank_lists(scores_itc, scores_itm):
        orders = []
        for row_itc, row_itm in zip(scores_itc, scores_itm):
            by_itc = sorted(range(len(row_itc)), key=lambda j: (-row_itc[j], j))
            top = by_itc[:k] if row_itm is not None else []
            head = sorted(top, key=lambda j: (-row_itm[j], by_itc.index(j)))
            orders.append(head + [j for j in by_itc if j not in top])
        return orders

    def pct(ranks):
        return {f"R@{n}": 100.0 * np.mean(np.array(ranks) < n) for n in (1, 5, 10)}

    t2i = rank_lists(itc, itm if itm is not None else [None] * len(itc))
    i2t = rank_lists(itc.T, itm.T if itm is not None else [None] * itc.shape[1])
    t2i_ranks = [order.index(caption_image[t]) for t, order in enumerate(t2i)]
    i2t_ranks = [min(order.index(t) for t in np.flatnonzero(caption_image == i)) for i, order in enumerate(i2t)]
    return pct(t2i_ranks), pct(i2t_ranks)


def reference_itc(test, image_dir, checkpoint):
    """The test split's captions, each caption's image, the image paths, and the full ITC matrix
    (captions x images) from BridgeTowerForContrastiveLearning."""
    captions = [s["raw"] for image in test for s in image["sentences"]]
    caption_image = np.array([n for n, image in enumerate(test) for _ in image["sentences"]])
    paths = [image_dir / image["filename"] for image in test]
    text_emb, _ = reference.itc_embeddings(checkpoint, captions, [paths[0]] * len(captions))
    _, image_emb = reference.itc_embeddings(checkpoint, ["x"] * len(paths), paths)
    return captions, caption_image, paths, text_emb @ image_emb.T


def eval_scores(cache, captions, paths):
    """What the eval ranked by, read back from its cache: the ITC matrix (captions x images) as
    the eval computes it (the same embeddings, in the same order, the same product), and the ITM
    logits (2,) of every pair it scored, by (caption, image) index."""
    (manifest,) = cache.glob("*/manifest.json")
    collection = Collection.open(manifest.parent, load_model=False, read_only=True)
    image_ids = collection.image_ids(paths)
    by_text = {row["text"]: row["id"] for row in collection.texts()}
    text_ids = np.array([by_text[caption] for caption in captions])
    itc = collection.embeddings("texts", text_ids) @ collection.embeddings("images", image_ids).T
    caption_of = {int(t): n for n, t in enumerate(text_ids)}
    image_of = {int(i): n for n, i in enumerate(image_ids)}
    (scores,) = manifest.parent.glob("eval-itm-scores-*.npz")
    with np.load(scores) as saved:
        logits = {(caption_of[int(t)], image_of[int(i)]): row for t, i, row in zip(saved["text_id"], saved["image_id"], saved["logits"])}
    return itc, logits


def scored_pairs(itc, k):
    """The pairs either direction re-ranks: each caption's top k images, each image's top k captions."""
    pairs = {(t, int(i)) for t, row in enumerate(itc) for i in np.argsort(-row, kind="stable")[:k]}
    return pairs | {(int(t), i) for i, column in enumerate(itc.T) for t in np.argsort(-column, kind="stable")[:k]}


# Two code paths (btsearch's and transformers') agree on scores to float rounding, never on the
# order of two scores nearer than that: so each test below holds btsearch's scores to
# transformers' within a tolerance, and its rankings, recall and calibration to brute force
# over btsearch's own scores, exactly (the same numbers, the same order).
ITC_TOLERANCE, ITM_TOLERANCE = 1e-5, 1e-4


def test_eval_matches_brute_force_on_both_annotation_formats(flickr, trained_checkpoint, tmp_path):
    root, image_dir, test = flickr
    captions, caption_image, paths, reference_matrix = reference_itc(test, image_dir, trained_checkpoint)  # transformers' own classes
    for annotations in ("dataset_flickr30k.json", "flickr_annotations_30k.csv"):
        cache = tmp_path / annotations
        args = ["eval", "flickr30k", "--annotations", root / annotations, "--images", image_dir, "--model", trained_checkpoint,
                "--candidates", CANDIDATES, "--cache-dir", cache, "--precision", "fp32", "--json"]
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        out = json.loads(result.output)
        assert out["num_images"] == len(paths) and out["num_texts"] == len(captions) and out["candidates"] == CANDIDATES
        itc, logits = eval_scores(cache, captions, paths)
        np.testing.assert_allclose(itc, reference_matrix, atol=ITC_TOLERANCE)
        assert set(logits) == scored_pairs(itc, CANDIDATES)  # each pair either direction re-ranks, once; no other
        itm = np.full(itc.shape, np.nan)
        by_match = np.full(itc.shape, np.nan)
        for (t, i), (no, yes) in logits.items():
            itm[t, i], by_match[t, i] = yes, np.float64(yes) - no
        expected = {
            "itc": brute_force_recall(itc, None, caption_image, CANDIDATES),
            "rerank": brute_force_recall(itc, itm, caption_image, CANDIDATES),  # the papers' protocol: the match logit
            "rerank_by_match": brute_force_recall(itc, by_match, caption_image, CANDIDATES),  # as search orders hits
        }
        for protocol, (t2i, i2t) in expected.items():
            assert out[protocol]["text_to_image"] == pytest.approx(t2i)
            assert out[protocol]["image_to_text"] == pytest.approx(i2t)
            assert out[protocol]["rsum"] == pytest.approx(sum(t2i.values()) + sum(i2t.values()))
    # The logits it ranked by are transformers' (BridgeTowerForImageAndTextRetrieval's, pair by pair).
    for (t, i), (_, yes) in logits.items():
        assert float(yes) == pytest.approx(reference.itm_logit(trained_checkpoint, captions[t], paths[i]), abs=ITM_TOLERANCE)
    # The trained checkpoint knows these photos: re-ranking keeps recall high.
    assert out["rerank"]["text_to_image"]["R@5"] >= 80


def test_second_eval_with_other_k_scores_only_new_pairs(flickr, trained_checkpoint, tmp_path, monkeypatch):
    root, image_dir, _ = flickr
    from btsearch.model.bridgetower import BridgeTowerRetrievalModel

    scored = []
    original = BridgeTowerRetrievalModel.match_logits

    def counting(self, text_bridge, text_mask, image_bridge, both=False):
        scored.append(len(text_bridge))
        return original(self, text_bridge, text_mask, image_bridge, both=both)

    monkeypatch.setattr(BridgeTowerRetrievalModel, "match_logits", counting)
    image_towers = []
    original_image = BridgeTowerRetrievalModel.encode_image

    def counting_images(self, pixels, with_bridge=False):
        image_towers.append(len(pixels))
        return original_image(self, pixels, with_bridge)

    monkeypatch.setattr(BridgeTowerRetrievalModel, "encode_image", counting_images)
    base = ["eval", "flickr30k", "--annotations", root / "dataset_flickr30k.json", "--images", image_dir,
            "--model", trained_checkpoint, "--cache-dir", tmp_path, "--json", "--candidates"]
    CliRunner().invoke(main, [str(a) for a in base + [2]])
    first = sum(scored)
    CliRunner().invoke(main, [str(a) for a in base + [2]])
    assert sum(scored) == first  # everything cached
    towers_before = sum(image_towers)
    CliRunner().invoke(main, [str(a) for a in base + [3]])
    assert first < sum(scored) < 2 * first + 100  # only the pairs k=3 adds
    assert sum(image_towers) == towers_before  # the images' bridge inputs come from the eval cache


def test_bad_annotations_are_named(tmp_path, flickr, trained_checkpoint):
    root, image_dir, _ = flickr
    (tmp_path / "bad.json").write_text("{}")
    result = CliRunner().invoke(main, ["eval", "flickr30k", "--annotations", str(tmp_path / "bad.json"), "--images", str(image_dir)])
    assert result.exit_code == 1 and "Karpathy" in result.stderr
    result = CliRunner().invoke(main, ["eval", "flickr30k", "--annotations", str(root / "dataset_flickr30k.json"),
                                       "--images", str(image_dir), "--split", "val"])
    assert result.exit_code == 1 and "no images in split 'val'" in result.stderr


def test_union_protocol_equals_the_max_of_both_directions_matrices():
    """BridgeTower's and ManagerTower's eval code: ITM scores at each direction's top-k, -100
    elsewhere, element-wise max of the two matrices, then both directions rank by it."""
    from btsearch.evaluate.protocol import recall_table

    rng = np.random.default_rng(3)
    n_images, k = 12, 3
    caption_image = np.repeat(np.arange(n_images), 5)
    itc = rng.standard_normal((len(caption_image), n_images)).astype(np.float32)
    itm_all = rng.standard_normal(itc.shape).astype(np.float32)
    t2i_top = np.argsort(-itc, axis=1, kind="stable")[:, :k]
    i2t_top = np.argsort(-itc.T, axis=1, kind="stable")[:, :k]
    t2i_matrix = np.full(itc.shape, -100.0)
    i2t_matrix = np.full(itc.shape, -100.0)
    for t, cols in enumerate(t2i_top):
        t2i_matrix[t, cols] = itm_all[t, cols]
    for i, rows in enumerate(i2t_top):
        i2t_matrix[rows, i] = itm_all[rows, i]
    scores = np.maximum(t2i_matrix, i2t_matrix)
    itm = np.where(scores > -100, scores, np.nan).astype(np.float32)  # what PairScores.fill returns

    def ranked(score_rows, itc_rows):  # ties (the -100s) in ITC order, as btsearch breaks them
        return [sorted(range(len(row)), key=lambda j: (-row[j], -itc_row[j], j)) for row, itc_row in zip(score_rows, itc_rows)]

    t2i = [order.index(caption_image[t]) for t, order in enumerate(ranked(scores, itc))]
    i2t = [min(order.index(t) for t in np.flatnonzero(caption_image == i)) for i, order in enumerate(ranked(scores.T, itc.T))]
    result = recall_table(itc, caption_image, k, itm, union=True)
    assert result["text_to_image"] == pytest.approx({f"R@{n}": 100.0 * np.mean(np.array(t2i) < n) for n in (1, 5, 10)})
    assert result["image_to_text"] == pytest.approx({f"R@{n}": 100.0 * np.mean(np.array(i2t) < n) for n in (1, 5, 10)})
    assert result != recall_table(itc, caption_image, k, itm)  # the two protocols differ here


def test_each_candidates_setting_is_its_own_protocol():
    """Scores built so that ITC alone, top-2 and top-3 re-ranking rank the captions' images
    differently: each k gives its own recall, equal to the brute-force protocol. (The CLI tests
    compare against brute force on a real checkpoint, whose figures may coincide across k.)"""
    from btsearch.evaluate.protocol import recall_table

    caption_image = np.array([0, 1, 2])
    itc = np.array([[0.1, 0.3, 0.2], [0.3, 0.2, 0.1], [0.1, 0.2, 0.3]], dtype=np.float32)  # true images 3rd, 2nd, 1st by ITC
    itm = np.array([[5.0, 1.0, 0.0], [0.0, 4.0, 1.0], [0.0, 1.0, 3.0]], dtype=np.float32)  # ...and 1st by ITM
    t2i_at_1 = {}
    for k in (0, 2, 3):
        result = recall_table(itc, caption_image, k, itm if k else None)
        t2i, i2t = brute_force_recall(itc, itm if k else None, caption_image, k)
        assert result["text_to_image"] == pytest.approx(t2i) and result["image_to_text"] == pytest.approx(i2t)
        t2i_at_1[k] = result["text_to_image"]["R@1"]
    assert t2i_at_1 == pytest.approx({0: 100 / 3, 2: 200 / 3, 3: 100.0})


def test_coco_reads_karpathy_filepaths_and_equals_the_same_data_as_flickr(flickr, trained_checkpoint, tmp_path):
    root, image_dir, test = flickr
    coco_images = tmp_path / "coco" / "val2014"
    coco_images.mkdir(parents=True)
    images = []
    for image in test:
        (coco_images / image["filename"]).write_bytes((image_dir / image["filename"]).read_bytes())
        images.append({**image, "filepath": "val2014", "split": "test"})
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    common = ["--model", trained_checkpoint, "--candidates", 2, "--precision", "fp32", "--json", "--cache-dir", tmp_path / "cache"]
    coco = CliRunner().invoke(main, [str(a) for a in ["eval", "coco", "--annotations", tmp_path / "dataset_coco.json", "--images", tmp_path / "coco", *common]])
    assert coco.exit_code == 0, coco.output
    flickr_run = CliRunner().invoke(main, [str(a) for a in ["eval", "flickr30k", "--annotations", root / "dataset_flickr30k.json", "--images", image_dir, *common]])
    ours, theirs = json.loads(coco.stdout), json.loads(flickr_run.stdout)
    assert ours["num_images"] == len(test) and ours["itc"] == theirs["itc"]
    for direction in ("text_to_image", "image_to_text"):
        assert ours["rerank"][direction] == pytest.approx(theirs["rerank"][direction])
    assert ours["rerank_union"] is not None
    help_text = CliRunner().invoke(main, ["eval", "coco", "--help"]).output
    assert re.search(r"\[default:\s+256;", help_text)  # COCO's k by convention


def test_report_is_self_contained_html_with_curves_and_failures(flickr, trained_checkpoint, tmp_path):
    root, image_dir, test = flickr
    args = ["eval", "flickr30k", "--annotations", root / "dataset_flickr30k.json", "--images", image_dir, "--model", trained_checkpoint,
            "--candidates", 2, "--cache-dir", tmp_path / "cache", "--report", tmp_path / "report", "--json"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["report"] == str(tmp_path / "report" / "report.html") and "details" not in out
    page = (tmp_path / "report" / "report.html").read_text()
    assert "published: BridgeTower-base (4M)" in page and "85.8 / 97.6 / 98.9" in page
    assert "data:image/png;base64," in page and (tmp_path / "report" / "recall_curves.png").read_bytes()[:4] == b"\x89PNG"
    t2i = " / ".join(f"{v:.1f}" for v in out["rerank"]["text_to_image"].values())
    assert t2i in page  # the table shows this run's numbers
    assert "Fixed:" in page and "Broken:" in page
    # The reliability diagram (inline SVG: bars per non-empty bin against the diagonal) and the thresholds.
    assert "<svg" in page and "<title>reliability diagram</title>" in page and "stroke-dasharray" in page
    non_empty = sum(1 for b in out["calibration"]["bins"] if b["count"])
    assert page.count("pairs, observed") == non_empty
    assert "target precision" in page and "search --min-match P" in page
    assert f"{out['calibration']['ece']:.4f}" in page
    # Whether this checkpoint misses a caption here is its own affair; the page says what happened
    # (test_the_failure_gallery_shows_each_missed_caption covers a gallery with failures).
    every_first = out["rerank"]["text_to_image"]["R@1"] == pytest.approx(100)
    assert ("No failures: every caption's image is first." in page) == every_first


FIGURE = re.compile(r"<figure><img alt='' src='([^']*)'><figcaption>#(\d+) (itm -?[\d.]+, )?itc -?[\d.]+<br>([^<]*)</figcaption></figure>")


def test_the_failure_gallery_shows_each_missed_caption(flickr, trained_checkpoint, tmp_path):
    """Each photo annotated with the next one's captions: a caption's annotated image is rarely
    (if ever) first, so the gallery must show the worst misses, each with its annotated image
    and rank and the top 5 found instead, consistent with one another and with the recall."""
    from btsearch.evaluate import report

    root, image_dir, test = flickr
    shifted = [{**image, "sentences": test[(n + 1) % len(test)]["sentences"]} for n, image in enumerate(test)]
    (tmp_path / "shifted.json").write_text(json.dumps({"images": shifted, "dataset": "flickr30k"}))
    annotated = {html.escape(s["raw"], quote=False): image["filename"] for image in shifted for s in image["sentences"]}
    args = ["eval", "flickr30k", "--annotations", tmp_path / "shifted.json", "--images", image_dir, "--model", trained_checkpoint,
            "--candidates", 2, "--cache-dir", tmp_path / "cache", "--precision", "fp32", "--report", tmp_path / "report", "--json"]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    missed = round(len(annotated) * (1 - out["rerank"]["text_to_image"]["R@1"] / 100))
    assert missed >= len(annotated) // 2  # the captions describe other photos: most miss
    page = (tmp_path / "report" / "report.html").read_text()
    gallery = page.split("Worst text-to-image failures after re-ranking", 1)[1]
    assert "No failures" not in gallery
    blocks = re.findall(r"<p class='caption'>(.*?)</p><div class='row'>(.*?)</div>", gallery, re.S)
    assert len(blocks) == min(report.FAILURES, missed)
    assert len({caption for caption, _ in blocks}) == len(blocks)  # each caption once
    ranks = []
    for caption, figures in blocks:
        assert caption in annotated, caption
        target = re.fullmatch(r"<figure class='target'><img alt='' src='([^']*)'><figcaption>its image, rank (\d+)</figcaption></figure>.*", figures, re.S)
        assert target, figures[:300]
        assert target.group(1) == report._thumbnail(image_dir / annotated[caption])  # its annotated image is the one shown
        rank = int(target.group(2))
        found = FIGURE.findall(figures)
        assert [int(n) for _, n, _, _ in found] == [1, 2, 3, 4, 5]
        assert [bool(itm) for _, _, itm, _ in found] == [True, True, False, False, False]  # ITM for the 2 re-ranked
        names = [name for _, _, _, name in found]
        assert rank >= 2 and names[0] != annotated[caption]  # a miss
        if rank <= 5:  # then it sits at its rank among the top 5
            assert names[rank - 1] == annotated[caption]
        else:
            assert annotated[caption] not in names
        for src, _, _, name in found:
            assert src == report._thumbnail(image_dir / name)
        ranks.append(rank)
    assert ranks == sorted(ranks, reverse=True)  # the worst first


def _eval_args(root, image_dir, checkpoint, cache, *extra):
    return [str(a) for a in ["eval", "flickr30k", "--annotations", root / "dataset_flickr30k.json", "--images", image_dir,
                             "--model", checkpoint, "--candidates", CANDIDATES, "--cache-dir", cache, "--precision", "fp32", *extra]]


def test_calibration_is_over_every_scored_pair_with_transformers_probabilities(flickr, trained_checkpoint, tmp_path):
    root, image_dir, test = flickr
    captions, caption_image, paths, reference_matrix = reference_itc(test, image_dir, trained_checkpoint)
    result = CliRunner().invoke(main, _eval_args(root, image_dir, trained_checkpoint, tmp_path / "cache", "--json"))
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)["calibration"]

    itc, logits = eval_scores(tmp_path / "cache", captions, paths)
    np.testing.assert_allclose(itc, reference_matrix, atol=ITC_TOLERANCE)
    pairs = sorted(scored_pairs(itc, CANDIDATES))
    assert sorted(logits) == pairs
    probabilities = match_probability(np.stack([logits[pair] for pair in pairs]))
    # Each pair's probability is transformers' softmax for it (two code paths: within a tolerance).
    theirs = [reference.match_probability(trained_checkpoint, captions[t], paths[i]) for t, i in pairs]
    np.testing.assert_allclose(probabilities, theirs, atol=ITM_TOLERANCE)
    labels = np.array([caption_image[t] == i for t, i in pairs])
    expected = calibration(probabilities, labels)

    # Over exactly those pairs, labels and probabilities (floats to the order of their sums).
    assert got["pairs"] == len(pairs) == sum(b["count"] for b in got["bins"])
    assert got["positives"] == int(labels.sum())
    assert [(b["count"], b["observed"]) for b in got["bins"]] == [(b["count"], b["observed"]) for b in expected["bins"]]
    def same(value, wanted):  # None for an empty bin or an unreached target
        return value is None if wanted is None else value == pytest.approx(wanted, rel=1e-9)

    assert all(same(ours["mean_probability"], wanted["mean_probability"]) for ours, wanted in zip(got["bins"], expected["bins"]))
    assert same(got["ece"], expected["ece"])
    for ours, wanted in zip(got["thresholds"], expected["thresholds"], strict=True):
        # A threshold is one pair's probability; precision and recall, ratios of counts.
        assert (ours["target"], ours["kept"]) == (wanted["target"], wanted["kept"])
        assert all(same(ours[name], wanted[name]) for name in ("threshold", "precision", "recall")), (ours, wanted)
    assert any(t["threshold"] is not None for t in got["thresholds"])

    table = CliRunner().invoke(main, _eval_args(root, image_dir, trained_checkpoint, tmp_path / "cache"))
    assert table.exit_code == 0, table.output
    line = table.stdout.strip().splitlines()[-1]
    assert f"match probability on {got['pairs']} scored pairs ({got['positives']} matching): ECE {got['ece']:.3f}" in line
    at_90 = next(t for t in got["thresholds"] if t["target"] == 0.9)
    assert ("no threshold reaches precision 0.9" in line) if at_90["threshold"] is None else ("--min-match" in line)


def test_a_cache_of_one_logit_per_pair_is_scored_again_not_misread(flickr, trained_checkpoint, tmp_path, caplog):
    root, image_dir, _ = flickr
    args = _eval_args(root, image_dir, trained_checkpoint, tmp_path / "cache", "--json")
    fresh = CliRunner().invoke(main, args)
    assert fresh.exit_code == 0, fresh.output
    (scores_file,) = (tmp_path / "cache").glob("*/eval-itm-scores-*.npz")
    with np.load(scores_file) as saved:
        text_id, image_id, logits = saved["text_id"], saved["image_id"], saved["logits"]
    assert logits.shape == (len(text_id), 2)
    # The layout of an older btsearch: the match logit alone, here negated, so reading it would change recall.
    np.savez(scores_file, text_id=text_id, image_id=image_id, score=-logits[:, 1])
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    first, second = json.loads(fresh.stdout), json.loads(again.stdout)
    for key in ("rerank", "rerank_union", "calibration"):  # the same pairs scored in the same batches: equal
        assert second[key] == first[key]
    assert "one ITM logit per pair" in caplog.text
    with np.load(scores_file) as saved:  # rewritten in the current layout
        assert saved["logits"].shape == logits.shape
    scores_file.write_bytes(b"not a zip")  # and an unreadable file is scored again too
    assert json.loads(CliRunner().invoke(main, args).stdout)["calibration"] == first["calibration"]
    assert "cannot read the ITM score cache" in caplog.text
