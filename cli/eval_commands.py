"""`btsearch eval ...`: retrieval recall on the published benchmarks and on the collection's own caption pairs."""

from __future__ import annotations

import json
from pathlib import Path

import click

from btsearch.defaults import DEFAULT_MODEL

from .options import device_option, json_option, model_option, quiet_option, say, show_progress
from .output import print_caption_recall, print_recall


@click.group("eval")
def eval_group():
    """Measure retrieval recall on a benchmark, or on a collection's own captions."""


def _eval_command(name: str, title: str, default_k: int, annotations_help: str):
    """`eval NAME`: the same options and output for each Karpathy-split benchmark."""

    @eval_group.command(name)
    @click.option("--annotations", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path), help=annotations_help)
    @click.option("--images", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path), help=f"Folder holding the {title} images.")
    @click.option("--split", default="test", show_default=True, help="Karpathy split to evaluate.")
    @model_option
    @click.option("--candidates", default=default_k, show_default=True, type=click.IntRange(min=0), help=f"ITC top-k re-ranked by ITM per query (the papers: {default_k}).")
    @click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help="Where embeddings and ITM scores are kept between runs [default: ~/.cache/btsearch/eval].")
    @json_option("the recall tables, counts and seconds")
    @click.option("--report", "report_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                  help="Also write a self-contained HTML report into this folder: the table beside published figures, recall@K curves, worst failures.")
    @device_option
    @quiet_option
    def command(annotations, images, split, model, candidates, cache_dir, as_json, report_dir, device, precision):
        from btsearch.evaluate.flickr30k import evaluate_flickr30k

        result = evaluate_flickr30k(
            annotations, images, split=split, model=model or DEFAULT_MODEL, candidates=candidates,
            cache_dir=cache_dir, device=device, precision=precision, progress=show_progress(), dataset=name, report_dir=report_dir,
        )
        if report_dir is not None:
            say(f"report: {result['report']}")
        if as_json:
            click.echo(json.dumps(result))
        else:
            print_recall(result, title, split, candidates)

    command.__doc__ = f"""R@1/5/10 both ways on {title} (ALBEF/BridgeTower protocol), ITC alone and re-ranked.

    Embeddings and ITM scores are cached: a second run with another --candidates computes only
    the pairs not scored yet, and an interrupted run resumes.
    """
    command.help = command.__doc__
    return command


eval_flickr30k = _eval_command("flickr30k", "Flickr30K", 128, "Karpathy's dataset_flickr30k.json, or the flickr30k hub CSV.")
eval_coco = _eval_command("coco", "MSCOCO", 256, "Karpathy's dataset_coco.json (images under --images/val2014/ as its filepath says, or directly).")


@eval_group.command("captions")
@click.option("--db", required=True, type=click.Path(path_type=Path), help="The collection folder.")
@click.option(
    "--candidates", "candidates", multiple=True, metavar="K[,K...]",
    help="ITC top-k values to re-rank by ITM, comma-separated or repeated; 0 is ITC alone "
    "[default: 0 and powers of two from 4 up to search's default, 16 on a CPU, 128 on a GPU].",
)
@click.option("--images", "max_images", type=click.IntRange(min=0), default=1000, show_default=True, metavar="N",
              help="Measure on at most N captioned images (spread over them) and their captions; 0: all. "
              "Recall falls as the images grow; the eval cache holds each one's bridge inputs (MBs each).")
@click.option("--latency-queries", type=click.IntRange(min=0), default=20, show_default=True, metavar="N",
              help="Captions timed as text searches of the whole collection at each k (0: no timing).")
@json_option("the recall tables, the curve over --candidates with latencies, counts and seconds")
@device_option
@quiet_option
def eval_captions(db, candidates, max_images, latency_queries, as_json, device, precision):
    """R@1/5/10 both ways on the caption pairs already in the collection, and a curve of
    recall and search latency against --candidates, to choose k for this hardware.

    A caption pair is a text that came with its image (`index --captions`) and that image. Each
    caption's image is ranked among the captioned images, each image's captions among the
    captions (ITC alone, and ITC top-k re-ranked by ITM); each k is also timed as a real search
    of the whole collection. ITM scores are kept in the collection folder: another k costs only
    the pairs not scored yet.
    """
    from btsearch.collection import Collection
    from btsearch.evaluate.captions import caption_pairs, default_candidates_curve, evaluate_captions, parse_candidates

    ks = parse_candidates(candidates) if candidates else None  # bad values fail before the model loads
    collection = Collection.open(db, load_model=False, read_only=True)
    caption_pairs(collection, max_images)  # ...and so does a collection without caption pairs
    collection.load_model(device, precision)
    result = evaluate_captions(collection, ks or default_candidates_curve(collection), latency_queries, show_progress(), max_images)
    if result["unmatched_texts"]:
        say(f"note: {result['unmatched_texts']} texts name images the collection does not hold; left out")
    if result["cache_bytes"]:
        from btsearch.indexers.layout import EVAL_CACHES
        from btsearch.indexers.write_errors import human_size

        say(f"note: the eval keeps {human_size(result['cache_bytes'])} in {db} (image bridge inputs, ITM scores) so the next eval "
            f"recomputes none of them; delete {Path(db) / EVAL_CACHES} to free the space")
    if as_json:
        click.echo(json.dumps(result))
    else:
        print_caption_recall(result)
