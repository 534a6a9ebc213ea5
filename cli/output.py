"""How the commands print what the library returns: search hits as a table, paths or JSON, the
index summary as a line or JSON, and groups of duplicates as a list or JSON."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import click

from .options import say

if TYPE_CHECKING:
    from btsearch.collection import Collection
    from btsearch.ingest.pipeline import IndexReport
    from btsearch.search.duplicates import Duplicates
    from btsearch.search.results import Hit, SearchResult


def print_search(result: SearchResult, as_json: bool = False, bare: bool = False) -> None:
    """Notes on stderr; the hits on stdout, as a table, bare paths (or texts), or JSON."""
    from btsearch.search.results import result_json

    for note in result.notes:
        say(f"note: {note}")
    if bare:
        for hit in result.hits:
            click.echo(_named(hit, result.field, bare=True))
        return
    if as_json:
        click.echo(json.dumps(result_json(result), ensure_ascii=False))
        return
    click.echo(f"{'rank':>4}  {'match':>6}  {'itm':>8}  {'itc':>7}  {result.field}")
    for hit in result.hits:
        itm = "-" if hit.itm_score is None else f"{hit.itm_score:.3f}"
        match = "-" if hit.match is None else f"{hit.match:.3f}"
        click.echo(f"{hit.rank:>4}  {match:>6}  {itm:>8}  {hit.itc_score:>7.4f}  {_named(hit, result.field)}")


def _named(hit: Hit, field: str, bare: bool = False) -> str:
    """A hit's path (or text); a video's moment with its span: `holiday.mp4 00:01:23-00:01:31` in the
    table, `holiday.mp4#t=83,91` (a media fragment, as players take it) for --paths."""
    from btsearch.search.moments import clock, media_fragment

    name = getattr(hit, field)
    if hit.start is None or hit.end is None:
        return name
    return media_fragment(name, (hit.start, hit.end)) if bare else f"{name} {clock((hit.start, hit.end))}"


def print_duplicates(found: Duplicates, as_json: bool = False) -> None:
    """Each group's kind and its images (id and path), or the JSON of `duplicates_json`; the
    count and the time on stderr."""
    from btsearch.search.duplicates import duplicates_json

    if as_json:
        click.echo(json.dumps(duplicates_json(found), ensure_ascii=False))
    else:
        for number, group in enumerate(found.groups, start=1):
            click.echo(f"group {number}: {group.kind}, {len(group.ids)} images")
            for image_id, path in zip(group.ids, group.paths):
                click.echo(f"  {image_id:>8}  {path}")
    say(f"{len(found.groups)} groups of duplicates among {found.images} images (near: cosine >= {found.threshold:g}), in {found.seconds:.1f}s")


def index_summary(report: IndexReport, collection: Collection, seconds: float) -> dict[str, Any]:
    """What `index --json` prints (before captions, which the caller adds); `seconds`: what the
    user waited, the model's loading included."""
    return {
        "added": report.added, "updated": report.updated, "removed": report.removed, "unchanged": report.unchanged,
        "kept_unlisted": report.kept_unlisted, "skipped": [{"path": str(item.path), "reason": item.reason} for item in report.skipped],
        "seconds": round(seconds, 3), "images": collection.count("images"), "db": str(collection.path),
    }


def say_skipped(report: IndexReport) -> None:
    """The files skipped, and what the re-rank cache's catch-up did beyond this run's files."""
    for skipped in report.skipped:
        say(f"skipped {skipped.path}: {skipped.reason}")
    if report.kept_unlisted:
        say(f"kept the {report.kept_unlisted} entries under folders that could not be listed: they stay until a folder is really gone")
    if report.cache_filled:
        say(f"re-rank cache: computed the states of {report.cache_filled} stored images that lacked them")
    for unreadable in report.cache_unreadable:
        say(f"re-rank cache: no states for {unreadable.path}: {unreadable.reason}")
    if report.pixels_filled:
        say(f"pixel store: kept the crops of {report.pixels_filled} stored images that lacked them")
    for unreadable in report.pixels_unreadable:
        say(f"pixel store: no crop for {unreadable.path}: {unreadable.reason}")


def echo_index_line(report: IndexReport, summary: dict[str, Any]) -> None:
    click.echo(
        f"indexed {report.added} new, {report.updated} updated, {report.removed} removed, {report.unchanged} unchanged, "
        f"{len(report.skipped)} skipped in {summary['seconds']:.1f}s; {summary['images']} images in {summary['db']}"
    )


def print_recall(result: dict[str, Any], title: str, split: str, candidates: int) -> None:
    """The eval table: R@1/5/10 both ways and RSUM, ITC alone and re-ranked; then how well the
    match probability is calibrated on the scored pairs."""
    click.echo(f"{title} {split}: {result['num_images']} images, {result['num_texts']} captions, {result['seconds']:.1f}s")
    click.echo(f"{'':<22}{'text->image R@1/5/10':>24}{'image->text R@1/5/10':>24}{'RSUM':>8}")
    rows = [("ITC", result["itc"])]
    if result["rerank"] is not None:
        rows.append((f"ITC top-{candidates} + ITM", result["rerank"]))
    if result.get("rerank_by_match") is not None:  # how `search` orders: by the match probability
        rows.append(("  ...ordered by match", result["rerank_by_match"]))
    for row_name, table in rows:
        click.echo(_recall_row(row_name, table))
    if result.get("calibration"):
        click.echo(calibration_line(result["calibration"]))


def calibration_line(calibration: dict[str, Any], precision: float = 0.9) -> str:
    """ECE and the --min-match that keeps `precision` on the scored pairs, in one line."""
    if calibration["ece"] is None:
        return "match probability: no scored pairs to calibrate on"
    line = f"match probability on {calibration['pairs']} scored pairs ({calibration['positives']} matching): ECE {calibration['ece']:.3f}; "
    found = next((t for t in calibration["thresholds"] if t["target"] == precision), None)
    if found is None or found["threshold"] is None:
        return line + f"no threshold reaches precision {precision:g}"
    from btsearch.evaluate.calibration import shown_threshold  # rounded down; the JSON has it exactly

    return line + f"precision >= {precision:g} at --min-match {shown_threshold(found['threshold'])} (recall {found['recall']:.2f})"


def _recall_row(name: str, table: dict[str, Any]) -> str:
    t2i = "/".join(f"{v:.1f}" for v in table["text_to_image"].values())
    i2t = "/".join(f"{v:.1f}" for v in table["image_to_text"].values())
    return f"{name:<22}{t2i:>24}{i2t:>24}{table['rsum']:>8.1f}"


def print_caption_recall(result: dict[str, Any]) -> None:
    """`eval captions`: one row per k (ITC alone first) with its search latency, then calibration."""
    sample = f" (spread over {result['captioned_images']} captioned)" if result["captioned_images"] > result["num_images"] else ""
    click.echo(f"captions in {result['db']}: {result['num_images']} images{sample}, {result['num_texts']} captions, {result['seconds']:.1f}s")
    timed = result["latency_queries"]
    click.echo(f"{'':<22}{'text->image R@1/5/10':>24}{'image->text R@1/5/10':>24}{'RSUM':>8}{'search ms (p50/p90)':>22}")
    rows = {entry["candidates"]: entry for entry in result["curve"]}
    if 0 not in rows:
        click.echo(_recall_row("ITC", result["itc"]) + f"{'-':>22}")
    for k, entry in rows.items():
        latency = entry["latency_ms"]
        shown = "-" if latency is None else f"{latency['median']:.1f}/{latency['p90']:.1f}"
        click.echo(_recall_row("ITC" if k == 0 else f"ITC top-{k} + ITM", entry) + f"{shown:>22}")
    if timed:
        click.echo(f"search ms: {timed} captions as text queries over the whole collection, -k {result['search_k']}")
    if result.get("calibration"):
        click.echo(calibration_line(result["calibration"]))
