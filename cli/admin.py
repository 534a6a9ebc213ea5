"""Commands that look after a collection or a checkpoint: `info`, `check`, `export`, `convert`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from btsearch.defaults import CHECKPOINT_FAMILIES
from btsearch.errors import BtsearchError

from .options import db_option, json_option, model_option, quiet_option, say, show_progress


@click.command()
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
    from btsearch.model.convert import convert as convert_checkpoint

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


@click.command()
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


@click.command()
@db_option
@model_option
@click.option("--skipped", is_flag=True, help="List the files indexing skipped, with the reason, instead.")
@json_option("what the collection holds (counts, index plans, the re-rank cache)")
def info(db, model, skipped, as_json):
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
    if as_json:
        click.echo(json.dumps(collection.info(as_data=True)))
        return
    for key, value in collection.info().items():
        click.echo(f"{key:<12} {value}")


@click.command()
@db_option
@click.option("--repair", is_flag=True, help="Mend what can be mended (rebuild FAISS, fill and compact the re-rank cache, rewrite the manifest), and say what was done.")
@click.option("--model", default=None, metavar="M", help="With --repair: the checkpoint to write into a manifest that lost its model.")
@json_option("the problems found, what was repaired and what remains")
@quiet_option
def check(db, repair, model, as_json):
    """Verify that the collection's parts agree: the manifest, LanceDB's tables, each table's
    FAISS index (its ids against LanceDB's rows) and the re-rank cache (every image covered,
    every chunk readable, no half-written files). Names each thing that is off, one line each;
    exits 1 if anything is (after --repair: if anything is still), else 0."""
    from btsearch.health import check as check_collection

    report = check_collection(db, repair=repair, model=model, progress=show_progress())
    if as_json:
        click.echo(json.dumps(report.as_dict()))
    else:
        for problem in report.problems:
            click.echo(f"{problem.part}: {problem.message}" if problem.fault else f"note: {problem.part}: {problem.message}")
        mendable = [problem for problem in report.problems if problem.fault and problem.mend]
        if mendable and not repair:
            click.echo(f"`btsearch check --db {db} --repair` mends {'it' if len(mendable) == 1 else f'{len(mendable)} of them'}: "
                       + "; ".join(dict.fromkeys(problem.mend for problem in mendable)))
        for done in report.repaired:
            click.echo(f"repaired: {done}")
        if repair:
            for problem in report.remaining:
                if problem.fault:
                    click.echo(f"still {problem.part}: {problem.message}")
        if report.ok:
            click.echo(f"ok: {db} is consistent" + (" now" if any(problem.fault for problem in report.problems) else ""))
    if not report.ok:
        raise click.exceptions.Exit(1)
