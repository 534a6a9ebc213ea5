"""The `btsearch` command: a thin layer over `btsearch.Collection`.

Errors the user can act on print one line on stderr and exit 1; results go to stdout.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from btsearch.collection import MEDIA_DIR, Collection, IndexReport, SearchResult
from btsearch.convert import FAMILIES
from btsearch.convert import convert as convert_checkpoint
from btsearch.demo import DEMO_QUERIES, DEMO_TEXTS, prepare_demo
from btsearch.device import DEVICE_CHOICES, PRECISION_CHOICES
from btsearch.encoder import DEFAULT_MODEL
from btsearch.errors import BtsearchError
from btsearch.export import export_collection
from btsearch.sources import expand_inputs
from btsearch.flickr30k import evaluate_flickr30k
from btsearch.images import DEFAULT_MAX_PIXELS
from btsearch.text_files import read_texts_file


class _Group(click.Group):
    """Turns btsearch's own errors into one line on stderr, never a traceback."""

    def invoke(self, ctx):
        global _QUIET
        _QUIET = False  # each invocation starts loud; a subcommand's --quiet sets it while parsing
        try:
            return super().invoke(ctx)
        except (BtsearchError, FileNotFoundError) as error:
            click.echo(f"btsearch: error: {error}", err=True)
            ctx.exit(1)


_QUIET = False


def _set_quiet(ctx, param, value):
    global _QUIET
    _QUIET = bool(value)


quiet_option = click.option(
    "--quiet", "-q", is_flag=True, expose_value=False, is_eager=True, callback=_set_quiet,
    help="No progress bars, notes or skipped-file lines on stderr (errors still print; `info --skipped` lists skips).",
)


def _progress() -> bool:
    return sys.stderr.isatty() and not _QUIET


def _say(message: str) -> None:
    """A note for the person at the terminal, on stderr; silent with --quiet."""
    if not _QUIET:
        click.echo(message, err=True)


def json_option(what: str):
    return click.option("--json", "as_json", is_flag=True, help=f"Print {what} as one JSON object on stdout, for scripts.")


model_option = click.option(
    "--model",
    default=None,
    metavar="M",
    help=f"Hub id or local folder of a BridgeTower checkpoint with ITC heads [default: the collection's own, else {DEFAULT_MODEL}].",
)


def device_option(command):
    """--device and --precision: where the model runs, and in which number format."""
    command = click.option(
        "--precision", type=click.Choice(PRECISION_CHOICES), default="auto", show_default=True,
        help="Model precision. auto: bf16 where the CPU or GPU computes it natively (several times faster), "
        "else fp16 on GPUs and fp32 on CPUs. fp32 reproduces transformers' scores exactly.",
    )(command)
    return click.option(
        "--device", type=click.Choice(DEVICE_CHOICES), default="auto", show_default=True,
        help="Where the model runs (auto: CUDA when present).",
    )(command)


_SIZE_UNITS = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(value: str | int) -> int:
    """Bytes from a size such as 512MiB, 2GiB, 1.5G or 1000000; ValueError if it is none."""
    if isinstance(value, int):
        return value
    text = str(value).strip().lower().removesuffix("b").removesuffix("i")
    number, unit = (text[:-1], text[-1]) if text and text[-1] in _SIZE_UNITS else (text, "")
    try:
        size = int(float(number) * _SIZE_UNITS[unit])
    except ValueError:
        raise ValueError(f"{value!r} is not a size such as 512MiB or 2GiB") from None
    if size <= 0:
        raise ValueError(f"{value!r} is not a positive size")
    return size


class ByteSize(click.ParamType):
    """A size in bytes: 512MiB, 2GiB, 1.5G, 1000000."""

    name = "size"

    def convert(self, value, param, ctx):
        try:
            return parse_size(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


db_option = click.option("--db", required=True, type=click.Path(file_okay=False, path_type=Path), help="The collection folder.")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="btsearch")
def main():
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
@click.option("--captions", "with_captions", is_flag=True, help="Also add the captions that come with the images (webdataset .txt/.json members, a parquet caption column) as texts.")
@json_option("the summary (counts, skipped files with reasons, seconds)")
@device_option
@quiet_option
def index(paths, db, model, batch_size, rerank_cache, index_memory, keep_missing, max_pixels, with_captions, as_json, device, precision):
    """Sync the collection with the images under PATHS: folders (recursively), image files,
    webdataset .tar shards, or parquet files with a path or image-bytes column.

    Creates the collection if needed. New and changed files are embedded (a file whose size or
    mtime changed but whose content did not is only noted; a moved file keeps its entry),
    entries of files gone from under PATHS are removed, unreadable files are skipped and
    listed by `info --skipped`. Safe to interrupt at any point: the next run resumes.
    """
    collection = Collection.create(db, model=model, device=device, precision=precision)
    if index_memory is not None:
        collection.set_index_memory(index_memory)
    inputs = expand_inputs(list(paths), collection.path / MEDIA_DIR)
    for path, reason in inputs.missing:
        _say(f"skipped {path}: {reason}")
    report = collection.add_images(
        inputs.roots, batch_size=batch_size, progress=_progress(), rerank_cache=rerank_cache,
        keep_missing=keep_missing, max_pixels=max_pixels,
    )
    _say_skipped(report)
    summary = _index_summary(report, collection)
    if not as_json:
        _echo_index_line(report, summary)
    if with_captions:
        known = {row["text"] for row in collection.store.get_texts(collection.store.ids("texts"))}
        new_captions = list(dict.fromkeys(c for c in inputs.captions if c not in known))
        if new_captions:
            collection.add_texts(new_captions, progress=_progress())
        summary["captions"] = {"added": len(new_captions), "already_there": len(inputs.captions) - len(new_captions)}
        if not as_json:
            click.echo(f"added {len(new_captions)} captions as texts ({len(inputs.captions) - len(new_captions)} already there)")
    if as_json:
        click.echo(json.dumps(summary))


def _index_summary(report: IndexReport, collection: Collection) -> dict:
    """What `index --json` prints (before captions, which the caller adds)."""
    return {
        "added": report.added, "updated": report.updated, "removed": report.removed, "unchanged": report.unchanged,
        "skipped": [{"path": str(item.path), "reason": item.reason} for item in report.skipped],
        "seconds": round(report.seconds, 3), "images": collection.store.count_images(), "db": str(collection.path),
    }


def _say_skipped(report: IndexReport) -> None:
    for skipped in report.skipped:
        _say(f"skipped {skipped.path}: {skipped.reason}")


def _echo_index_line(report: IndexReport, summary: dict) -> None:
    click.echo(
        f"indexed {report.added} new, {report.updated} updated, {report.removed} removed, {report.unchanged} unchanged, "
        f"{len(report.skipped)} skipped in {report.seconds:.1f}s; {summary['images']} images in {summary['db']}"
    )


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
    texts = read_texts_file(file)
    collection = Collection.create(db, model=model, device=device, precision=precision)
    ids = collection.add_texts(texts, progress=_progress())
    total = collection.store.count_texts()
    if as_json:
        click.echo(json.dumps({"added": len(ids), "texts": total, "db": str(collection.path)}))
    else:
        click.echo(f"added {len(ids)} texts; {total} texts in {collection.path}")


@main.command()
@click.argument("text", required=False)
@click.option("--image", type=click.Path(dir_okay=False, path_type=Path), help="Search the collection's texts with this image instead.")
@db_option
@click.option("-k", "k", default=10, show_default=True, type=int, help="Number of hits to show.")
@click.option("--candidates", default=None, type=int,
              help="FAISS candidates re-ranked by ITM [default: 128 on a GPU as in the papers; 16 on a CPU, which keeps a query within seconds].")
@click.option("--no-rerank", is_flag=True, help="Rank by ITC alone (no cross-modal encoder).")
@json_option("the query and its hits")
@click.option("--paths", "bare", is_flag=True, help="Print only the hits' paths (or texts), one a line, for piping (| xargs).")
@click.option(
    "--target", type=click.Choice(["images", "texts"]), default=None,
    help="What to search [default: images for TEXT, texts for --image]; --image Q --target images finds similar images (by ITC).",
)
@model_option
@device_option
@quiet_option
def search(text, image, db, k, candidates, no_rerank, as_json, bare, target, model, device, precision):
    """Find images matching TEXT, or texts matching --image."""
    if (text is None) == (image is None):
        raise BtsearchError("give either a TEXT query or --image PATH")
    if k < 1:
        raise BtsearchError("-k must be at least 1")
    if candidates is not None and candidates < 1:
        raise BtsearchError("--candidates must be at least 1 (--no-rerank ranks by ITC alone)")
    collection = Collection.open(db, model=model, device=device, precision=precision, read_only=True)
    if as_json and bare:
        raise BtsearchError("--json and --paths are two output formats: choose one")
    result = collection.search(text=text, image=image, k=k, candidates=candidates, rerank=not no_rerank, target=target)
    _print_search(result, as_json, bare)


def _print_search(result: SearchResult, as_json: bool, bare: bool = False) -> None:
    for note in result.notes:
        _say(f"note: {note}")
    field = "path" if result.target == "images" else "text"
    if bare:
        for hit in result.hits:
            click.echo(getattr(hit, field))
        return
    if as_json:
        hits = [
            {"rank": hit.rank, field: getattr(hit, field), "itc_score": hit.itc_score, "itm_score": hit.itm_score}
            for hit in result.hits
        ]
        click.echo(json.dumps({"query": result.query, "hits": hits}, ensure_ascii=False))
        return
    click.echo(f"{'rank':>4}  {'itm':>8}  {'itc':>7}  {field}")
    for hit in result.hits:
        itm = "-" if hit.itm_score is None else f"{hit.itm_score:.3f}"
        click.echo(f"{hit.rank:>4}  {itm:>8}  {hit.itc_score:>7.4f}  {getattr(hit, field)}")


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
        result = evaluate_flickr30k(
            annotations, images, split=split, model=model or DEFAULT_MODEL, candidates=candidates,
            cache_dir=cache_dir, device=device, precision=precision, progress=_progress(), dataset=name, report_dir=report_dir,
        )
        if report_dir is not None:
            _say(f"report: {result['report']}")
        if as_json:
            click.echo(json.dumps(result))
            return
        click.echo(f"{title} {split}: {result['num_images']} images, {result['num_texts']} captions, {result['seconds']:.1f}s")
        click.echo(f"{'':<22}{'text->image R@1/5/10':>24}{'image->text R@1/5/10':>24}{'RSUM':>8}")
        rows = [("ITC", result["itc"])]
        if result["rerank"] is not None:
            rows.append((f"ITC top-{candidates} + ITM", result["rerank"]))
        for row_name, table in rows:
            t2i = "/".join(f"{v:.1f}" for v in table["text_to_image"].values())
            i2t = "/".join(f"{v:.1f}" for v in table["image_to_text"].values())
            click.echo(f"{row_name:<22}{t2i:>24}{i2t:>24}{table['rsum']:>8.1f}")

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
@click.option("--family", type=click.Choice(FAMILIES), default="auto", show_default=True, help="Which model the checkpoint holds (auto: read from its keys).")
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
    if out_dir.exists() and any(out_dir.iterdir()):
        raise BtsearchError(f"{out_dir} is not empty: convert into a new folder")
    done = convert_checkpoint(source, out_dir, family=family, tokenizer=tokenizer)
    config = done.config
    if done.dropped:
        _say(f"note: dropped {len(done.dropped)} weights of heads retrieval does not use: {', '.join(done.dropped[:6])}")
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
    collection = Collection.open(db, load_model=False, read_only=True)
    written = export_collection(collection.store, out_dir, progress=_progress())
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
    encoder, note = prepare_demo(db, model or DEFAULT_MODEL, device=device, precision=precision)
    if note:
        click.echo(f"NOTE: {note}\n")
    collection = Collection.create(db / "collection", encoder=encoder)
    click.echo(f"model: {collection.manifest.model}{' (small local fallback checkpoint)' if note else ''}")
    report = collection.add_images([db / "photos"], progress=_progress())
    _say_skipped(report)
    _echo_index_line(report, _index_summary(report, collection))
    if collection.store.count_texts() == 0:
        collection.add_texts(DEMO_TEXTS)
    for text in DEMO_QUERIES[:4]:
        click.echo(f"\n$ btsearch search {text!r} --db {collection.path} -k 3")
        _print_search(collection.search(text=text, k=3, candidates=8), as_json=False)
    photo = sorted((db / "photos").iterdir())[0]
    click.echo(f"\n$ btsearch search --image {photo} --db {collection.path} -k 3")
    _print_search(collection.search(image=photo, k=3, candidates=8), as_json=False)


if __name__ == "__main__":
    main()
