"""`eval ... --report DIR`: one self-contained HTML page a researcher can read and send.

It holds the recall table beside the published figures, recall@K curves (ITC alone and
re-ranked, both directions; also written as `recall_curves.png`), what re-ranking fixed and
what it broke, the match probability's reliability diagram (inline SVG) with the thresholds
that keep a precision, and the worst text-to-image failures: the caption, its image, and the
top 5 retrieved with their scores. Pictures are embedded as data URIs, so the page needs no folder.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np

from ..media.images import load_rgb
from .calibration import shown_threshold

PUBLISHED = {  # Flickr30K / MSCOCO 5K test, fine-tuned, R@1/5/10 (see README)
    "flickr30k": [
        ("BridgeTower-base (4M)", "85.8 / 97.6 / 98.9", "94.7 / 99.6 / 100.0"),
        ("ManagerTower-base (4M)", "86.56 / - / -", "95.64 / - / -"),
        ("METER-CLIP-ViT-base (4M)", "82.2 / 96.3 / 98.4", "94.3 / 99.6 / 99.9"),
        ("ALBEF-base (14M)", "85.6 / 97.5 / 98.9", "95.9 / 99.8 / 100.0"),
        ("CLIP ViT-L/14@336 zero-shot", "68.7 / 90.6 / 95.2", "88.0 / 98.7 / 99.4"),
    ],
    "coco": [],
}
FAILURES = 10
THUMB = 160


def write_report(out_dir: str | Path, details: dict, result: dict, benchmark) -> Path:
    """Write `out_dir`/report.html (and recall_curves.png); returns the page's path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    curves = _curves_png(details)
    (out_dir / "recall_curves.png").write_bytes(curves)
    dataset = benchmark.name.split("-")[0]
    page = "\n".join(
        [
            "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
            f"<title>btsearch eval: {html.escape(benchmark.name)}</title>",
            "<style>body{font-family:system-ui,sans-serif;margin:2rem;color:#222} table{border-collapse:collapse;margin:1rem 0}"
            " td,th{border:1px solid #ccc;padding:.3rem .6rem;text-align:right} td:first-child,th:first-child{text-align:left}"
            " .row{display:flex;gap:.6rem;align-items:flex-start;margin:1rem 0} figure{margin:0;width:" + str(THUMB) + "px;font-size:.75rem}"
            " figure img{width:" + str(THUMB) + "px;height:" + str(THUMB) + "px;object-fit:cover} .target img{outline:4px solid #2a2}"
            " .caption{font-weight:600;margin-top:1.5rem}</style></head><body>",
            f"<h1>{html.escape(benchmark.name)}: {result['num_images']} images, {result['num_texts']} captions</h1>",
            f"<p>ITC top-{result['candidates']} re-ranked by ITM; {result['seconds']:.1f} s.</p>",
            _recall_table(result, PUBLISHED.get(dataset, [])),
            "<h2>Recall@K</h2>",
            f"<img alt='recall curves' src='data:image/png;base64,{base64.b64encode(curves).decode()}'>",
            _fixed_and_broken(details),
            _calibration(result.get("calibration")),
            f"<h2>Worst text-to-image failures after re-ranking (top {FAILURES})</h2>",
            _failures(details, benchmark),
            "</body></html>",
        ]
    )
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


def _recall_table(result: dict, published: list) -> str:
    rows = [("btsearch: ITC alone", result["itc"])]
    if result.get("rerank"):
        rows.append((f"btsearch: ITC top-{result['candidates']} + ITM", result["rerank"]))
    if result.get("rerank_by_match"):
        rows.append(("btsearch: + ITM, ordered by match probability (as search)", result["rerank_by_match"]))
    if result.get("rerank_union"):
        rows.append(("btsearch: + ITM, either direction (authors' code)", result["rerank_union"]))
    cells = ["<table><tr><th>model</th><th>text→image R@1 / 5 / 10</th><th>image→text R@1 / 5 / 10</th><th>RSUM</th></tr>"]
    for name, table in rows:
        t2i = " / ".join(f"{v:.1f}" for v in table["text_to_image"].values())
        i2t = " / ".join(f"{v:.1f}" for v in table["image_to_text"].values())
        cells.append(f"<tr><td>{html.escape(name)}</td><td>{t2i}</td><td>{i2t}</td><td>{table['rsum']:.1f}</td></tr>")
    for name, t2i, i2t in published:
        cells.append(f"<tr><td>published: {html.escape(name)}</td><td>{t2i}</td><td>{i2t}</td><td></td></tr>")
    return "\n".join(cells) + "</table>"


def _curves_png(details: dict) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for axis, direction, title in ((axes[0], "t2i", "text → image"), (axes[1], "i2t", "image → text")):
        itc_ranks, final_ranks = details[f"{direction}_rank_itc"], details[f"{direction}_rank"]
        ks = np.arange(1, min(50, int(max(itc_ranks.max(), final_ranks.max())) + 2) + 1)
        axis.plot(ks, [100 * np.mean(itc_ranks < k) for k in ks], label="ITC alone")
        axis.plot(ks, [100 * np.mean(final_ranks < k) for k in ks], label="re-ranked by ITM")
        axis.set(title=title, xlabel="K", ylabel="recall@K (%)", ylim=(0, 100.5))
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right")
    figure.tight_layout()
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=100)
    plt.close(figure)
    return out.getvalue()


def _fixed_and_broken(details: dict) -> str:
    before, after = details["t2i_rank_itc"], details["t2i_rank"]
    fixed = int(np.sum((before > 0) & (after == 0)))
    broken = int(np.sum((before == 0) & (after > 0)))
    return (
        "<h2>What re-ranking changed (text → image, R@1)</h2>"
        f"<p>Fixed: {fixed} captions whose image was not first by ITC and is first after re-ranking. "
        f"Broken: {broken} captions whose image was first by ITC and is not after re-ranking.</p>"
    )


def _calibration(calibration: dict | None) -> str:
    """The reliability diagram, ECE and threshold table of `result["calibration"]`."""
    if not calibration or not calibration["pairs"]:
        return "<h2>Calibration of the match probability</h2><p>No pairs were re-ranked, so there is nothing to calibrate.</p>"
    rows = ["<table><tr><th>target precision</th><th>--min-match</th><th>precision</th><th>recall</th><th>pairs kept</th></tr>"]
    for found in calibration["thresholds"]:
        if found["threshold"] is None:
            rows.append(f"<tr><td>{found['target']:g}</td><td colspan='4'>no threshold reaches it</td></tr>")
        else:
            rows.append(
                f"<tr><td>{found['target']:g}</td><td>{shown_threshold(found['threshold'])}</td><td>{found['precision']:.3f}</td>"
                f"<td>{found['recall']:.3f}</td><td>{found['kept']}</td></tr>"
            )
    return (
        "<h2>Calibration of the match probability</h2>"
        f"<p>Every (caption, image) pair scored by ITM, {calibration['pairs']} of them ({calibration['positives']} matching), "
        "in 10 bins of its match probability. Bars: the fraction of the bin's pairs that match; red dots: the bin's mean "
        "predicted probability, at the bar's height. For a calibrated head the dots lie on the diagonal. Expected "
        f"calibration error (ECE, the bins' gaps weighted by their pairs): {calibration['ece']:.4f}.</p>"
        + _reliability_svg(calibration["bins"])
        + "\n".join(rows) + "</table>"
        "<p>To choose <code>search --min-match P</code>: take the row of the precision you want and pass its threshold; "
        "on pairs like these, the re-ranked hits kept then match with that precision, and the recall column says what "
        "share of true matches survives. The pairs are each query's ITC top candidates on this benchmark, so the figures "
        "carry over to a collection as far as its queries and pictures resemble these.</p>"
    )


def _reliability_svg(bins: list[dict], size: int = 320, margin: int = 40) -> str:
    """Bars of the observed fraction of matches per bin, a dot at each bin's mean predicted
    probability, and the diagonal of perfect calibration."""
    side = size - 2 * margin

    def x(value: float) -> float:
        return margin + value * side

    def y(value: float) -> float:
        return size - margin - value * side

    parts = [
        f"<svg xmlns='http://www.w3.org/2000/svg' class='reliability' width='{size}' height='{size}' viewBox='0 0 {size} {size}' role='img'>",
        "<title>reliability diagram</title>",
        f"<rect x='{margin}' y='{margin}' width='{side}' height='{side}' fill='none' stroke='#888'/>",
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        parts.append(f"<text x='{x(tick):.1f}' y='{size - margin + 14}' font-size='10' text-anchor='middle'>{tick:g}</text>")
        parts.append(f"<text x='{margin - 4}' y='{y(tick) + 3:.1f}' font-size='10' text-anchor='end'>{tick:g}</text>")
    for b in bins:
        if not b["count"]:
            continue
        parts.append(
            f"<rect x='{x(b['lower']) + 1:.1f}' y='{y(b['observed']):.1f}' width='{x(b['upper']) - x(b['lower']) - 2:.1f}' "
            f"height='{b['observed'] * side:.1f}' fill='#4a7fc1' opacity='0.75'><title>{b['lower']:g}-{b['upper']:g}: "
            f"n = {b['count']} pairs, observed {b['observed']:.3f}, predicted {b['mean_probability']:.3f}</title></rect>"
        )
        parts.append(f"<circle cx='{x(b['mean_probability']):.1f}' cy='{y(b['observed']):.1f}' r='3' fill='#c14a4a'/>")
    parts += [
        f"<line x1='{x(0)}' y1='{y(0)}' x2='{x(1)}' y2='{y(1)}' stroke='#222' stroke-dasharray='4 3'/>",
        f"<text x='{size / 2}' y='{size - 6}' font-size='11' text-anchor='middle'>predicted match probability</text>",
        f"<text x='12' y='{size / 2}' font-size='11' text-anchor='middle' transform='rotate(-90 12 {size / 2})'>observed fraction of matches</text>",
        "</svg>",
    ]
    return "".join(parts)


def _thumbnail(path: Path) -> str:
    try:
        image = load_rgb(path)
    except Exception:  # noqa: BLE001 - a report must not fail on one unreadable picture
        return ""
    image.thumbnail((THUMB * 2, THUMB * 2))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()


def _failures(details: dict, benchmark) -> str:
    ranks = details["t2i_rank"]
    worst = np.argsort(-ranks, kind="stable")[:FAILURES]
    blocks = []
    for caption in worst:
        if ranks[caption] == 0:
            break
        target = int(benchmark.caption_image[caption])
        figures = [
            f"<figure class='target'><img alt='' src='{_thumbnail(benchmark.image_paths[target])}'>"
            f"<figcaption>its image, rank {int(ranks[caption]) + 1}</figcaption></figure>"
        ]
        for n, image in enumerate(details["t2i_top"][caption]):
            itm = details["t2i_top_itm"]
            score = "" if itm is None or np.isnan(itm[caption, n]) else f"itm {itm[caption, n]:.2f}, "
            figures.append(
                f"<figure><img alt='' src='{_thumbnail(benchmark.image_paths[int(image)])}'>"
                f"<figcaption>#{n + 1} {score}itc {details['t2i_top_itc'][caption, n]:.3f}<br>"
                f"{html.escape(Path(benchmark.image_paths[int(image)]).name)}</figcaption></figure>"
            )
        blocks.append(f"<p class='caption'>{html.escape(benchmark.captions[caption])}</p><div class='row'>{''.join(figures)}</div>")
    return "\n".join(blocks) or "<p>No failures: every caption's image is first.</p>"
