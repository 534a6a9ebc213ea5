"""The `btsearch` command: a thin layer over `btsearch.Collection`.

Errors the user can act on print one line on stderr and exit 1; results go to stdout. Each
command imports what it needs when it runs, so `--help` answers without loading torch.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from btsearch.defaults import CHECKPOINT_FAMILIES, DEFAULT_MAX_PIXELS, DEFAULT_MODEL
from btsearch.errors import BtsearchError

from .options import (
    ByteSize,
    db_option,
    device_option,
    json_option,
    model_option,
    parse_size,
    quiet_option,
    say,
    show_progress,
    start_invocation,
)
from .output import echo_index_line, index_summary, print_recall, print_search, say_skipped

__all__ = ["main", "parse_size"]


class _Group(click.Group):
    """Turns btsearch's own errors into one line on stderr, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        start_invocation()
        try:
            return super().invoke(ctx)
        except (BtsearchError, FileNotFoundError) as error:
            click.echo(f"btsearch: error: {error}", err=True)
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="btsearch")
def main() -> None:
    """Search images with text and texts with images, using BridgeTower.

    FAISS recalls candidates by the uni-modal ITC embeddings; BridgeTower's cross-modal
    encoder re-ranks the top ones with its ITM head.
    """


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@db_option
@model_option
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(min=1), help="Images per model batch.")
@click.option(
    "--rerank-cache", is_flag=True,
    help="Keep each image's bridge inputs on disk (float16, memory-mapped) so re-ranking skips the image tower; "
    "about 3 MB per image for base, 5.4 MB for large. Stays on once set.",
)
@click.option(
    "--index-memory", type=ByteSize(), default=None, metavar="SIZE",
    help="Memory the FAISS indexes may take, e.g. 2GiB; kept by the collection [default: a quarter of RAM]. "
    "Search is exact up to ~256K vectors, then IVF, with PQ codes when vectors would not fit.",
)
@click.option("--keep-missing", is_flag=True, help="Keep the entries of files gone from under PATHS (by default they are removed).")
@click.option(
    "--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
    help="Skip images with more pixels than this (decompression bombs), before decoding them.",
)
@click.option(
    "--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
    help="Where embedding runs: this process, or a Ray cluster (pip install 'btsearch[ray]'); the same collection either way.",
)
@click.option("--address", default=None, metavar="ADDR", help="With --engine ray: the cluster to join [default: RAY_ADDRESS, else a local Ray on this machine's cores].")
@click.option("--workers", type=click.IntRange(min=1), default=None, metavar="N", help="With --engine ray: embedding actors [default: one per GPU, else a few CPU actors].")
@click.option("--captions", "with_captions", is_flag=True, help="Also add the captions that come with the images (webdataset .txt/.json members, a parquet caption column) as texts.")
@json_option("the summary (counts, skipped files with reasons, seconds)")
@device_option
@quiet_option
def index(paths, db, model, batch_size, rerank_cache, index_memory, keep_missing, max_pixels, engine, address, workers, with_captions, as_json, device, precision):
    """Sync the collection with the images under PATHS: folders (recursively), image files,
    webdataset .tar shards, or parquet files with a path or image-bytes column.

    Creates the collection if needed. New and changed files are embedded (a file whose size or
    mtime changed but whose content did not is only noted; a moved file keeps its entry),
    entries of files gone from under PATHS are removed, unreadable files are skipped and
    listed by `info --skipped`. Safe to interrupt at any point: the next run resumes.
    """
    from btsearch.collection import Collection
    from btsearch.indexers.layout import MEDIA
    from btsearch.sources import expand_inputs

    if engine == "ray":  # before a collection is made for nothing
        from btsearch.ray_engine import require_ray

        require_ray()
    collection = Collection.create(db, model=model, device=device, precision=precision)
    if index_memory is not None:
        collection.set_index_memory(index_memory)
    inputs = expand_inputs(list(paths), collection.path / MEDIA)
    for path, reason in inputs.missing:
        say(f"skipped {path}: {reason}")
    report = collection.add_images(
        inputs.roots, batch_size=batch_size, progress=show_progress(), rerank_cache=rerank_cache,
        keep_missing=keep_missing, max_pixels=max_pixels, engine=engine, ray_address=address, workers=workers,
    )
    say_skipped(report)
    summary = index_summary(report, collection)
    if not as_json:
        echo_index_line(report, summary)
    if with_captions:
        from btsearch.indexers.stored_files import resolve_path

        # A caption is its text and the image it came with: the same words under two photos are two captions.
        known = {(row["text"], row.get("image_path")) for row in collection.texts()}
        pairs = [(text, None if image is None else resolve_path(image)) for text, image in zip(inputs.captions, inputs.caption_images)]
        new = list(dict.fromkeys(pair for pair in pairs if pair not in known))
        new_captions = [text for text, _ in new]
        if new:
            collection.add_texts(new_captions, progress=show_progress(), image_paths=[image for _, image in new])
        summary["captions"] = {"added": len(new_captions), "already_there": len(inputs.captions) - len(new_captions)}
        if not as_json:
            click.echo(f"added {len(new_captions)} captions as texts ({len(inputs.captions) - len(new_captions)} already there)")
    if as_json:
        click.echo(json.dumps(summary))


@main.command("add-texts")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@db_option
@model_option
@json_option("the summary")
@device_option
@quiet_option
def add_texts(file, db, model, as_json, device, precision):
    """Add the texts of FILE to the collection, for image-to-text search.

    FILE is .txt (one text a line), .jsonl ({"text": ...} a line), or .csv/.parquet with a
    `text` column.
    """
    from btsearch.collection import Collection
    from btsearch.text_files import read_texts_file

    texts = read_texts_file(file)
    collection = Collection.create(db, model=model, device=device, precision=precision)
    ids = collection.add_texts(texts, progress=show_progress())
    total = collection.count("texts")
    if as_json:
        click.echo(json.dumps({"added": len(ids), "texts": total, "db": str(collection.path)}))
    else:
        click.echo(f"added {len(ids)} texts; {total} texts in {collection.path}")


@main.command()
@click.argument("text", required=False)
@click.option("--image", type=click.Path(dir_okay=False, path_type=Path),
              help="Search the collection's texts with this image; with TEXT, find images like it that match TEXT.")
@db_option
@click.option("-k", "k", default=10, show_default=True, type=int, help="Number of hits to show.")
@click.option("--offset", default=0, show_default=True, type=int, metavar="N",
              help="Skip the first N hits: -k 3 --offset 3 shows ranks 4..6 of the same ranking.")
@click.option("--candidates", default=None, type=int,
              help="FAISS candidates re-ranked by ITM [default: 128 on a GPU as in the papers; 16 on a CPU, which keeps a query within seconds].")
@click.option("--no-rerank", is_flag=True, help="Rank by ITC alone (no cross-modal encoder).")
@click.option(
    "--min-match", type=float, default=None, metavar="P",
    help="Keep only re-ranked hits whose match probability (the ITM head's softmax) is at least P, 0..1; none, with a note, when none is.",
)
@click.option(
    "--where", "where", default=None, metavar="SQL",
    help="Search only the rows this SQL predicate selects, e.g. \"width >= 1000 AND taken >= '2024-01-01'\" "
    "(image columns: path, folder, taken, camera, width, height, size, mtime; text columns: text).",
)
@click.option("--not", "negatives", multiple=True, metavar="TEXT", help="Push away images that show TEXT (repeatable).")
@json_option("the query and its hits")
@click.option("--paths", "bare", is_flag=True, help="Print only the hits' paths (or texts), one a line, for piping (| xargs).")
@click.option(
    "--target", type=click.Choice(["images", "texts"]), default=None,
    help="What to search [default: images for TEXT, texts for --image]; --image Q --target images finds similar images (by ITC).",
)
@click.option("--explain", "explain_dir", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              help="Write, for each (text, image) hit, a heat map of where the text's words look in the image, and the words that weigh most.")
@model_option
@device_option
@quiet_option
def search(text, image, db, k, offset, candidates, no_rerank, min_match, where, negatives, as_json, bare, target, explain_dir, model, device, precision):
    """Find images matching TEXT, or texts matching --image; TEXT with --image finds images like
    the image that match TEXT."""
    from btsearch.collection import Collection
    from btsearch.search import CLI, check_query

    check_query(
        text, image, k, candidates, target, spelling=CLI, min_match=min_match, rerank=not no_rerank,
        offset=offset, where=where, negatives=negatives,
    )
    if as_json and bare:
        raise BtsearchError("--json and --paths are two output formats: choose one")
    collection = Collection.open(db, model=model, device=device, precision=precision, read_only=True)
    result = collection.search(
        text=text, image=image, k=k, candidates=candidates, rerank=not no_rerank, target=target, min_match=min_match,
        offset=offset, where=where, negatives=negatives, spelling=CLI,
    )
    print_search(result, as_json, bare)
    if explain_dir is not None:
        from btsearch.explain import write_explanations

        for line in write_explanations(collection, result, text, explain_dir):
            say(line)


@main.group("eval")
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


@main.command()
@click.argument("source", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--family", type=click.Choice(CHECKPOINT_FAMILIES), default="auto", show_default=True, help="Which model the checkpoint holds (auto: read from its keys).")
@click.option("--tokenizer", default=None, metavar="ID|DIR", help="Tokenizer to ship with it [default: the checkpoint config's, e.g. roberta-base].")
@quiet_option
def convert(source, out_dir, family, tokenizer):
    """Convert an original checkpoint (a Lightning .ckpt of microsoft/BridgeTower or
    LooperXX/ManagerTower) into a folder that --model loads: config, safetensors weights,
    processor and tokenizer.

    The architecture (sizes, layers, image size such as 384 px after fine-tuning) is read from
    the tensor shapes; a key with no place in the layout, or a missing one, is an error that
    names it.
    """
    from btsearch.convert import convert as convert_checkpoint

    if out_dir.exists() and any(out_dir.iterdir()):
        raise BtsearchError(f"{out_dir} is not empty: convert into a new folder")
    done = convert_checkpoint(source, out_dir, family=family, tokenizer=tokenizer)
    config = done.config
    if done.dropped:
        say(f"note: dropped {len(done.dropped)} weights of heads retrieval does not use: {', '.join(done.dropped[:6])}")
    family_name = "ManagerTower" if done.family == "managertower" else "BridgeTower"
    click.echo(
        f"wrote {done.folder}: {family_name}, hidden {config.hidden_size}, {config.text_config.num_hidden_layers}+"
        f"{config.vision_config.num_hidden_layers} uni-modal and {config.num_hidden_layers} cross-modal layers, "
        f"{config.vision_config.image_size} px images; search with --model {done.folder}"
    )


@main.command()
@db_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on (0.0.0.0: every one).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
@model_option
@device_option
def serve(db, host, port, model, device, precision):
    """Serve the collection: a web page at / and an HTTP API under /api (OpenAPI schema at
    /openapi.json, interactive docs at /docs): search by text, uploaded image or image id,
    thumbnails, health and metrics. The model is loaded once; searches queue.
    """
    import uvicorn

    from btsearch.collection import Collection
    from btsearch.server import create_app

    app = create_app(Collection.open(db, model=model, load_model=False).path, device=device, precision=precision)
    click.echo(f"btsearch serving {db} at http://{host}:{port}/", err=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


@main.command()
@db_option
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write into (created).")
@json_option("the rows written per table")
@quiet_option
def export(db, out_dir, as_json):
    """Write the collection's embeddings as .npy and metadata as parquet, in clip-retrieval's
    layout (img_emb/, metadata/, text_emb/, text_metadata/), which autofaiss reads.

    The LanceDB tables are readable as they are, too: pyarrow, pandas and DuckDB open
    DIR/images.lance and DIR/texts.lance (e.g. `lancedb.connect(DIR).open_table("images").to_pandas()`).
    """
    from btsearch.collection import Collection

    written = Collection.open(db, load_model=False, read_only=True).export(out_dir, progress=show_progress())
    if as_json:
        click.echo(json.dumps({**written, "out": str(out_dir)}))
    else:
        click.echo(f"exported {written['images']} images and {written['texts']} texts to {out_dir}")


@main.command()
@db_option
@model_option
@click.option("--skipped", is_flag=True, help="List the files indexing skipped, with the reason, instead.")
def info(db, model, skipped):
    """Show what a collection holds and which model built it."""
    from btsearch.collection import Collection

    collection = Collection.open(db, model=model, load_model=False, read_only=True)
    if skipped:
        entries = collection.skipped()
        for path, reason, when in entries:
            # A name that is not UTF-8 goes out as its own bytes, as ls and find print it.
            click.echo(os.fsencode(f"{path}\t{reason}\t{when}"))
        click.echo(f"{len(entries)} skipped files", err=True)
        return
    for key, value in collection.info().items():
        click.echo(f"{key:<12} {value}")


@main.command()
@click.option("--db", default=Path("demo-collection"), show_default=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for the demo's photos and collection.")
@model_option
@device_option
def demo(db, model, device, precision):
    """Index sample photos shipped with scikit-image and search them both ways.

    Uses the hub model when it can be had; offline, a small local checkpoint, labelled as such.
    """
    from btsearch.collection import Collection
    from btsearch.demo import DEMO_QUERIES, DEMO_TEXTS, prepare_demo

    encoder, note = prepare_demo(db, model or DEFAULT_MODEL, device=device, precision=precision)
    if note:
        click.echo(f"NOTE: {note}\n")
    collection = Collection.create(db / "collection", encoder=encoder)
    click.echo(f"model: {collection.manifest.model}{' (small local fallback checkpoint)' if note else ''}")
    report = collection.add_images([db / "photos"], progress=show_progress())
    say_skipped(report)
    echo_index_line(report, index_summary(report, collection))
    if collection.count("texts") == 0:
        collection.add_texts(DEMO_TEXTS)
    for text in DEMO_QUERIES[:4]:
        click.echo(f"\n$ btsearch search {text!r} --db {collection.path} -k 3")
        print_search(collection.search(text=text, k=3, candidates=8), as_json=False)
    photo = sorted((db / "photos").iterdir())[0]
    click.echo(f"\n$ btsearch search --image {photo} --db {collection.path} -k 3")
    print_search(collection.search(image=photo, k=3, candidates=8), as_json=False)


if __name__ == "__main__":
    main()
