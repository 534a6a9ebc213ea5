"""The `btsearch` command: a thin layer over `btsearch.Collection`.

Errors the user can act on print one line on stderr and exit 1; results go to stdout. Each
command imports what it needs when it runs, so `--help` answers without loading torch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from btsearch.defaults import DEFAULT_FRAMES_PER_SECOND, DEFAULT_MAX_PIXELS, DEFAULT_MODEL, DUPLICATE_THRESHOLD
from btsearch.errors import BtsearchError

from .admin import check, convert, export, info
from .eval_commands import eval_group
from .options import (
    ByteSize,
    db_option,
    device_option,
    invocation_seconds,
    json_option,
    model_option,
    parse_size,
    quiet_option,
    say,
    show_progress,
    start_invocation,
)
from .output import echo_index_line, index_summary, print_duplicates, print_search, say_skipped
from .serve_command import serve

if TYPE_CHECKING:
    from btsearch.collection import Collection

__all__ = ["main", "parse_size"]


class _Group(click.Group):
    """Turns btsearch's own errors into one line on stderr, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        start_invocation()
        try:
            return super().invoke(ctx)
        except BtsearchError as error:
            click.echo(f"btsearch: error: {error}", err=True)
            ctx.exit(1)
        except OSError as error:  # a file outside the collection's own (gone, not a folder, a full disk, read-only): one line too
            from btsearch.indexers.write_errors import error_code

            if error.filename is None and error_code(error) is None:
                raise
            click.echo(f"btsearch: error: {_os_error_line(error)}", err=True)
            ctx.exit(1)


def _os_error_line(error: OSError) -> str:
    """`path: reason` rather than Python's `[Errno 2] reason: 'path'`."""
    if error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error)


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
@click.option(
    "--rerank-cache-max", type=ByteSize(), default=None, metavar="SIZE",
    help="Keep re-rank cache states for at most SIZE bytes (e.g. 2GiB), kept by the collection: those of the images searches "
    "re-rank most; the rest re-rank from the pixel store. Turns the cache on.",
)
@click.option(
    "--no-pixels", is_flag=True,
    help="Make the collection without a pixel store (each image's model input, about 31 kB, kept so re-ranking needs no source file); "
    "applies when the collection is created.",
)
@click.option("--keep-missing", is_flag=True, help="Keep the entries of files gone from under PATHS (by default they are removed).")
@click.option(
    "--max-pixels", type=click.IntRange(min=1), default=DEFAULT_MAX_PIXELS, show_default=True,
    help="Skip images with more pixels than this (decompression bombs), before decoding them.",
)
@click.option(
    "--frames-per-second", type=click.FloatRange(min=0, min_open=True), default=DEFAULT_FRAMES_PER_SECOND, show_default=True, metavar="RATE",
    help="Frames of each video to index per second of video (0.5: one every two seconds), beside one at each scene cut.",
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
def index(
    paths, db, model, batch_size, rerank_cache, index_memory, rerank_cache_max, no_pixels, keep_missing, max_pixels, frames_per_second, engine,
    address, workers, with_captions, as_json, device, precision,
):
    """Sync the collection with the images and videos under PATHS: folders (recursively), image
    and video files, webdataset .tar shards, or parquet files with a path or image-bytes column
    (shards and parquet files inside a folder count too). A video is indexed as its frames
    (--frames-per-second, and one at each scene cut), found in search as moments.

    Creates the collection if needed. New and changed files are embedded (a file whose size or
    mtime changed but whose content did not is only noted; a moved file keeps its entry),
    entries of files gone from under PATHS are removed, unreadable files are skipped and
    listed by `info --skipped`. Safe to interrupt at any point: the next run resumes.
    """
    from btsearch.collection import Collection
    from btsearch.indexers.layout import MEDIA
    from btsearch.ingest.sync import MEDIA_SUFFIXES
    from btsearch.media.sources import expand_inputs

    if engine == "ray":  # before a collection is made for nothing
        from btsearch.ingest.ray_engine import require_ray

        require_ray()
    collection = Collection.create(db, model=model, device=device, precision=precision, pixels=not no_pixels)
    if no_pixels and collection.manifest.pixels:
        raise BtsearchError(f"{db} keeps a pixel store: --no-pixels applies when a collection is created")
    if index_memory is not None:
        collection.set_index_memory(index_memory)
    inputs = expand_inputs(list(paths), collection.path / MEDIA, keep_missing=keep_missing)
    for path, reason in inputs.missing:
        say(f"skipped {path}: {reason}")
    for _, container in inputs.gone:
        say(f"{container} is gone: its images are removed")
    report = collection.add_images(
        inputs.roots, batch_size=batch_size, progress=show_progress(), rerank_cache=rerank_cache,
        keep_missing=keep_missing, max_pixels=max_pixels, engine=engine, ray_address=address, workers=workers, rerank_cache_max=rerank_cache_max,
        frames_per_second=frames_per_second,
    )
    say_skipped(report)
    if not (report.added or report.updated or report.unchanged or report.kept_unlisted or report.skipped):
        say(f"no images found under {', '.join(map(str, paths))}: btsearch takes {' '.join(sorted(MEDIA_SUFFIXES))} files, "
            "webdataset .tar shards and .parquet tables")
    for media, _ in inputs.gone:  # its rows are removed: the emptied folder can go
        shutil.rmtree(media, ignore_errors=True)
    summary = index_summary(report, collection, invocation_seconds())
    if not as_json:
        echo_index_line(report, summary)
    if with_captions:
        added, already = _add_new_texts(collection, inputs.captions, inputs.caption_images)
        summary["captions"] = {"added": added, "already_there": already}
        if not as_json:
            click.echo(f"added {added} captions as texts ({already} already there)")
    if as_json:
        click.echo(json.dumps(summary))


@main.command("add-texts")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@db_option
@model_option
@click.option("--allow-duplicates", is_flag=True, help="Add every text of FILE, even those the collection holds already.")
@json_option("the summary")
@device_option
@quiet_option
def add_texts(file, db, model, allow_duplicates, as_json, device, precision):
    """Add the texts of FILE to the collection, for image-to-text search. Texts it holds already
    (the same words for the same image, or for none) are skipped, so a second run adds nothing.

    FILE is .txt (one text a line), .jsonl (an object a line), or .csv/.parquet. A record's text
    is its `text` (or `caption`) field; a `path` (or `image_path`) field names the image it is a
    caption of, relative to FILE's folder or absolute: such captions are what `eval captions`
    measures a collection against.
    """
    from btsearch.collection import Collection
    from btsearch.media.text_files import read_texts_file

    found = read_texts_file(file)
    collection = Collection.create(db, model=model, device=device, precision=precision)
    if allow_duplicates:
        added, already = len(collection.add_texts(found.texts, progress=show_progress(), image_paths=found.image_paths)), 0
    else:
        added, already = _add_new_texts(collection, found.texts, found.image_paths)
    total = collection.count("texts")
    if as_json:
        click.echo(json.dumps({"added": added, "already_there": already, "captions": found.captions, "texts": total, "db": str(collection.path)}))
    else:
        click.echo(f"added {added} texts ({already} already there); {total} texts in {collection.path}")


def _add_new_texts(collection: Collection, texts: list[str], image_paths: list[str | None]) -> tuple[int, int]:
    """Add the texts `collection` does not hold: a text is its words and the image it is a
    caption of (the same words under two photos are two captions). Returns (added, already there)."""
    from btsearch.indexers.stored_files import resolve_path

    known = {(row["text"], row.get("image_path")) for row in collection.texts()}
    pairs = [(text, None if image is None else resolve_path(image)) for text, image in zip(texts, image_paths)]
    new = [pair for pair in dict.fromkeys(pairs) if pair not in known]
    if new:
        collection.add_texts([text for text, _ in new], progress=show_progress(), image_paths=[image for _, image in new])
    return len(new), len(pairs) - len(new)


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
    help="Keep only re-ranked hits whose match probability is at least P, 0..1 (a prefix of the ranking); none, with a note, when none is.",
)
@click.option(
    "--where", "where", default=None, metavar="SQL",
    help="Search only the rows this SQL predicate selects, e.g. \"width >= 1000 AND taken >= '2024-01-01'\" "
    "(image columns: id, path, folder, taken, camera, width, height, size, mtime, content_hash, kind ('image' or 'video'), t (a video frame's seconds); "
    "text columns: id, text, image_path, the image a caption is of).",
)
@click.option("--not", "negatives", multiple=True, metavar="TEXT", help="Push away images that show TEXT (repeatable).")
@click.option("--like", "like", multiple=True, type=int, metavar="ID",
              help="More like this: images like the stored image ID (a hit's id in --json; repeatable); with TEXT, re-ranked by it. The liked are not shown.")
@click.option("--unlike", "unlike", multiple=True, type=int, metavar="ID", help="Push away images like the stored image ID (repeatable).")
@click.option("--collapse", is_flag=True, help="One hit per group of duplicates (the best-ranked), linked as `btsearch duplicates` links them.")
@json_option("the query and its hits")
@click.option("--paths", "bare", is_flag=True, help="Print only the hits' paths (or texts), one a line, for piping (| xargs).")
@click.option(
    "--target", type=click.Choice(["images", "texts"]), default=None,
    help="What to search [default: images for TEXT, texts for --image]; --image Q --target images finds similar images (by ITC).",
)
@click.option("--explain", "explain_dir", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              help="Write, for each (text, image) hit, a heat map of where the text's words look in the image, and the words that weigh most.")
@click.option("--no-server", is_flag=True, help="Load the model here even when `serve` runs for the collection (also: BTSEARCH_NO_SERVER=1).")
@model_option
@device_option
@quiet_option
def search(
    text, image, db, k, offset, candidates, no_rerank, min_match, where, negatives, like, unlike, collapse, as_json, bare, target, explain_dir, no_server,
    model, device, precision,
):
    """Find images matching TEXT, or texts matching --image; TEXT with --image finds images like
    the image that match TEXT; --like ID finds images like stored ones (with TEXT: that match it).
    When `btsearch serve` runs for the collection (same model, device and precision), the query
    is sent there: the same answer, without loading the model.

    FAISS recalls --candidates hits by ITC cosine (the itc column); the cross-modal encoder
    re-ranks them, and they are ordered by their match probability (the match column: the ITM
    head's softmax, times 1 - P for each --not text); the itm column is the ITM match logit.
    Hits not re-ranked follow in ITC order. (eval keeps the papers' protocol, which orders by the
    logit, and reports recall both ways.)"""
    from btsearch.search.query import CLI, Query

    query = Query(text, image, k, candidates, not no_rerank, target, min_match, offset, where, negatives, like=like, unlike=unlike, collapse=collapse)
    query.check(CLI)
    if as_json and bare:
        raise BtsearchError("--json and --paths are two output formats: choose one")
    if explain_dir is None and not no_server:
        from .warm import search_through_server

        warm = search_through_server(db, query, model, device, precision)
        if warm is not None:
            print_search(warm, as_json, bare)
            return
    from btsearch.collection import Collection
    from btsearch.search.pipeline import check_searchable

    collection = Collection.open(db, model=model, load_model=False, read_only=True)
    check_searchable(collection.store, query, CLI)  # an empty table or a bad --where answers before the model loads
    encoder = collection.load_model(device, precision)
    if explain_dir is not None:
        from btsearch.search.explain import prepare_explanations

        prepare_explanations(encoder, text, query.searched, explain_dir)  # before the search: a refusal costs none
    result = collection.answer(query, CLI)
    print_search(result, as_json, bare)
    if explain_dir is not None:
        from btsearch.search.explain import write_explanations

        for line in write_explanations(collection, result, text, explain_dir):
            say(line)


@main.command()
@db_option
@click.option(
    "--threshold", type=float, default=DUPLICATE_THRESHOLD, show_default=True, metavar="T",
    help="The ITC cosine of two images' embeddings at or above which they are near-duplicates, above 0 and at most 1.",
)
@json_option("the groups (kind, ids, paths)")
@quiet_option
def duplicates(db, threshold, as_json):
    """List the groups of images that are the same photo: exact (the same bytes) and near (re-encoded,
    resized or slightly cropped copies: ITC cosine of their embeddings at or above --threshold).
    Frames of one video are never duplicates of each other. No model loads: the stored embeddings
    are compared by FAISS range search, never pair by pair."""
    from btsearch.collection import Collection

    print_duplicates(Collection.open(db, load_model=False, read_only=True).duplicates(threshold), as_json)


@main.command()
@click.option("--db", default=Path("demo-collection"), show_default=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for the demo's photos and collection.")
@model_option
@device_option
def demo(db, model, device, precision):
    """Index sample photos shipped with scikit-image and search them both ways.

    Uses the hub model when it can be had; offline, a small local checkpoint, labelled as such.
    """
    from btsearch.collection import Collection
    from btsearch.demo.prepare import DEMO_QUERIES, DEMO_TEXTS, prepare_demo

    encoder, note = prepare_demo(db, model or DEFAULT_MODEL, device=device, precision=precision)
    if note:
        click.echo(f"NOTE: {note}\n")
    collection = Collection.create(db / "collection", encoder=encoder)
    click.echo(f"model: {collection.manifest.model}{' (small local fallback checkpoint)' if note else ''}")
    report = collection.add_images([db / "photos"], progress=show_progress())
    say_skipped(report)
    echo_index_line(report, index_summary(report, collection, invocation_seconds()))
    if collection.count("texts") == 0:
        collection.add_texts(DEMO_TEXTS)
    for text in DEMO_QUERIES[:4]:
        click.echo(f"\n$ btsearch search {text!r} --db {collection.path} -k 3")
        print_search(collection.search(text=text, k=3, candidates=8), as_json=False)
    photo = sorted((db / "photos").iterdir())[0]
    click.echo(f"\n$ btsearch search --image {photo} --db {collection.path} -k 3")
    print_search(collection.search(image=photo, k=3, candidates=8), as_json=False)


# Commands kept in modules of their own; registered here so `btsearch --help` lists them all.
main.add_command(eval_group)
main.add_command(convert)
main.add_command(serve)
main.add_command(export)
main.add_command(info)
main.add_command(check)


if __name__ == "__main__":
    main()
