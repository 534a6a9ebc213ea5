"""`btsearch eval ...`: retrieval recall on the published benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import click

from btsearch.defaults import DEFAULT_MODEL

from .options import device_option, json_option, model_option, quiet_option, say, show_progress
from .output import print_recall


@click.group("eval")
def eval_group():
    """Measure retrieval recall on a benchmark."""


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
        from btsearch.flickr30k import evaluate_flickr30k

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
