"""The HTML report of ``spurgen evaluate``: one self-contained page.

Tables 1 and 2 (and quality and spurious score when measured), a bar chart of spurious accuracy per
classifier and source as inline SVG, the human study's naturalness distribution per source (the paper's
Figure 3) when ``spurgen rate`` answers exist, and per class a grid of images captioned with each classifier's top-1
label, as in the paper's Figure 4: a label that is the class itself is marked, and an image that every
classifier predicts as the class gets a green frame. Images are embedded as small JPEG thumbnails (so
the page works on its own, e-mailed or moved) and link to the full files by relative path.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Sequence

from .. import __version__
from ..images import UnreadableImage, load_rgb
from ..rate.stats import SCORES
from ..workspace import utc_now
from .results import Evaluation, SourceResult
from .tables import TableData

__all__ = ["render_report"]

THUMBNAIL_SIZE = 160
# Okabe-Ito: distinguishable with every common colour vision deficiency.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px 32px; color: #1d1d1f;
       background: #fff; line-height: 1.4; }
h1 { font-size: 24px; margin-bottom: 4px; } h2 { font-size: 20px; margin-top: 36px; border-bottom: 1px solid #ddd; }
h3 { font-size: 15px; margin: 20px 0 8px; }
.meta { color: #555; font-size: 13px; }
table { border-collapse: collapse; margin: 12px 0 4px; font-size: 13px; }
th, td { border: 1px solid #d0d0d0; padding: 4px 8px; text-align: right; white-space: nowrap; }
th { background: #f3f4f6; font-weight: 600; } th:first-child, td:first-child { text-align: left; }
tr.mean td { font-weight: 600; background: #fafafa; }
tr.break td { border-top: 2px solid #888; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: 4px; }
.note { color: #555; font-size: 12px; margin: 0 0 16px; }
.chart { margin: 8px 0 16px; }
.scroll { overflow-x: auto; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
figure { margin: 0; width: 172px; border: 3px solid #e5e7eb; border-radius: 6px; padding: 3px; background: #fff; }
figure.consistent { border-color: #16a34a; }
figure img { width: 100%; height: auto; display: block; border-radius: 3px; image-rendering: auto; }
figcaption { font-size: 11px; margin-top: 4px; }
figcaption .file { color: #666; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
figcaption ul { list-style: none; padding: 0; margin: 2px 0 0; }
figcaption li { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; color: #555; }
figcaption li.spurious { color: #15803d; font-weight: 600; }
.badge { display: inline-block; font-size: 10px; background: #16a34a; color: #fff; border-radius: 3px; padding: 0 4px; }
.missing { width: 160px; height: 160px; display: flex; align-items: center; justify-content: center; color: #999;
           background: #f3f4f6; }
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _table(data: TableData) -> str:
    # A column name's line break (classifier, then source) becomes <br>.
    head = "".join("<th>" + "<br>".join(_e(part) for part in column.split("\n")) + "</th>" for column in data.columns)
    rows = []
    for i, row in enumerate(data.rows):
        classes = [name for name, on in (("break", i in data.breaks and i > 0),
                                         ("mean", data.summary_from is not None and i >= data.summary_from)) if on]
        attribute = f' class="{" ".join(classes)}"' if classes else ""
        rows.append(f"<tr{attribute}>" + "".join(f"<td>{_e(cell)}</td>" for cell in row) + "</tr>")
    body = "".join(rows)
    note = f'<p class="note">{_e(data.caption)}</p>' if data.caption else ""
    return (f'<div class="scroll"><table><caption>{_e(data.title)}</caption><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table></div>{note}")


def _bar_chart(title: str, groups: Sequence[str], series: Sequence[str], values: dict[tuple[str, str], float]) -> str:
    """Grouped bars in inline SVG: one group per classifier, one bar per source, values in [0, 1]."""
    bar, gap, left, top, plot_height = 22, 26, 44, 30, 180
    group_width = len(series) * bar + gap
    legend_columns, legend_width = 4, 150
    plot_right = left + len(groups) * group_width
    # Wide enough for the bars, the legend's first row and the title (about 7 px per character at 13 px).
    width = max(plot_right + 20, left + min(len(series), legend_columns) * legend_width,
                left + 7 * len(title))
    legend_rows = (len(series) + legend_columns - 1) // legend_columns
    height = top + plot_height + 40 + 18 * legend_rows
    parts = [(f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{height}" '
              f'viewBox="0 0 {width} {height}" role="img" font-family="system-ui, sans-serif" font-size="11">'),
             f"<title>{_e(title)}</title>",
             f'<text x="{left}" y="16" font-size="13" font-weight="600">{_e(title)}</text>']
    for tick in range(0, 101, 25):
        y = top + plot_height * (1 - tick / 100)
        parts.append(f'<line x1="{left}" x2="{plot_right}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e7eb"/>'
                     f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#555">{tick}%</text>')
    for g, group in enumerate(groups):
        x0 = left + g * group_width + gap / 2
        for s, name in enumerate(series):
            value = values.get((group, name))
            if value is None:
                continue
            h = plot_height * value
            x, y = x0 + s * bar, top + plot_height - h
            parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar - 3}" height="{h:.1f}" '
                         f'fill="{PALETTE[s % len(PALETTE)]}">'
                         f"<title>{_e(group)} / {_e(name)}: {100 * value:.1f}%</title></rect>"
                         f'<text x="{x + (bar - 3) / 2:.1f}" y="{y - 3:.1f}" text-anchor="middle" font-size="9" '
                         f'fill="#333">{100 * value:.0f}</text>')
        parts.append(f'<text x="{x0 + len(series) * bar / 2:.1f}" y="{top + plot_height + 16}" text-anchor="middle">'
                     f"{_e(group)}</text>")
    parts.append(f'<line x1="{left}" x2="{plot_right}" y1="{top + plot_height}" y2="{top + plot_height}" '
                 'stroke="#888"/>')
    for s, name in enumerate(series):
        x, y = left + (s % legend_columns) * legend_width, top + plot_height + 34 + 18 * (s // legend_columns)
        parts.append(f'<rect x="{x}" y="{y - 9}" width="10" height="10" fill="{PALETTE[s % len(PALETTE)]}"/>'
                     f'<text x="{x + 14}" y="{y}">{_e(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _naturalness_chart(title: str, results: Sequence[SourceResult]) -> str:
    """The paper's Figure 3: per naturalness score, the share of each source's ratings that gave it.

    Results of one source (several classes) are pooled: their counts are added.
    """
    counts: dict[str, list[int]] = {}
    for r in results:
        if r.rating is not None:
            pooled = counts.setdefault(r.source.name, [0] * len(SCORES))
            pooled[:] = [a + b for a, b in zip(pooled, r.rating.counts)]
    values = {(str(score), source): n[s] / sum(n) for source, n in counts.items() if sum(n)
              for s, score in enumerate(SCORES)}
    return _bar_chart(title, [str(s) for s in SCORES], list(counts), values)


def _thumbnail(path: Path) -> str | None:
    """A data: URI of a small JPEG of the image, or None when the file cannot be read any more."""
    try:
        image = load_rgb(path)
    except (UnreadableImage, OSError):
        return None
    image.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _link(path: Path, reports: Path) -> str:
    try:
        return Path(os.path.relpath(path, reports)).as_posix()
    except ValueError:  # another drive on Windows: no relative path exists
        return path.resolve().as_uri()


def _grid(evaluation: Evaluation, result: SourceResult, limit: int) -> str:
    shown = range(len(result.files)) if limit == 0 else range(min(limit, len(result.files)))
    cards = []
    for i in shown:
        path = result.files[i]
        uri = _thumbnail(path)
        picture = (f'<img src="{uri}" alt="{_e(path.name)}" loading="lazy">' if uri
                   else '<div class="missing">not readable</div>')
        labels = []
        for c, name in enumerate(evaluation.classifiers):
            top1 = int(result.top1[c, i])
            spurious = top1 == result.cls.index
            labels.append(f'<li class="{"spurious" if spurious else ""}" '
                          f'title="{_e(name)}: {_e(evaluation.labels.label(top1))}">'
                          f'{"✓ " if spurious else ""}{_e(name)}: {_e(evaluation.labels.label(top1))}</li>')
        quality = (f"<div>{_e(evaluation.quality.name)} {result.quality[i]:.3f}</div>"  # type: ignore[union-attr, index]
                   if result.quality is not None else "")
        badge = '<span class="badge">consistently spurious</span>' if result.consistent[i] else ""
        cards.append(f'<figure class="{"consistent" if result.consistent[i] else ""}">'
                     f'<a href="{_e(_link(path, evaluation.reports))}">{picture}</a><figcaption>'
                     f'<div class="file" title="{_e(path)}">{_e(path.name)}</div>{badge}'
                     f'<ul>{"".join(labels)}</ul>{quality}'
                     "</figcaption></figure>")
    more = len(result.files) - len(shown)
    tail = f'<p class="note">{more} more image(s) in {_e(result.source.folder)}</p>' if more > 0 else ""
    return f'<div class="grid">{"".join(cards)}</div>{tail}'


def _class_section(evaluation: Evaluation, cls_index: int, limit: int) -> str:
    results = [r for r in evaluation.results if r.cls.index == cls_index]
    cls = results[0].cls
    chart = _bar_chart(f"{cls}: spurious accuracy", evaluation.classifiers, [r.source.name for r in results],
                       {(name, r.source.name): float(r.spurious_accuracy[c])
                        for r in results for c, name in enumerate(evaluation.classifiers)})
    rows = []
    for r in results:
        for c, name in enumerate(evaluation.classifiers):
            score = (f"{r.roc_auc[c]:.3f} / {r.average_precision[c]:.3f}"
                     if r.roc_auc is not None and r.average_precision is not None else "–")
            rows.append(f"<tr><td>{_e(r.source.name)}</td><td>{_e(name)}</td><td>{len(r.files)}</td>"
                        f"<td>{100 * r.spurious_accuracy[c]:.1f}</td><td>{100 * r.top5_rate[c]:.1f}</td>"
                        f"<td>{r.mean_probability[c]:.3f}</td><td>{100 * r.consistent_rate:.1f}</td>"
                        f"<td>{score}</td></tr>")
    details = ("<table><caption>Per source and classifier</caption><thead><tr><th>source</th><th>classifier</th>"
               "<th>images</th><th>spurious acc. %</th><th>top-5 %</th><th>mean p(class)</th>"
               "<th>consistent %</th><th>ROC-AUC / AP</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
    grids = "".join(
        f"<h3>{_e(r.source.name)} <span class=\"meta\">({r.source.kind}, {len(r.files)} images, "
        f"{100 * r.consistent_rate:.0f}% consistently spurious)</span></h3>{_grid(evaluation, r, limit)}"
        for r in results)
    if evaluation.rated:
        chart += _naturalness_chart(f"{cls}: naturalness ratings (share of scores 1-5)", results)
    feature = f" — spurious feature: {_e(cls.spurious_feature)}" if cls.spurious_feature else ""
    return f'<section><h2 id="class-{cls.index}">{_e(cls)}{feature}</h2>{chart}{details}{grids}</section>'


def render_report(evaluation: Evaluation, tables: Sequence[TableData], images_per_source: int) -> str:
    """The report page as one HTML string (no external resources)."""
    sources, names = evaluation.sources, evaluation.classifiers
    overall = {}
    for c, name in enumerate(names):
        for source in sources:
            values = [float(r.spurious_accuracy[c]) for r in evaluation.results if r.source.name == source]
            overall[(name, source)] = sum(values) / len(values)
    chart = _bar_chart("Spurious accuracy per classifier and source (mean over classes)", names, sources, overall)
    if evaluation.rated:
        chart += _naturalness_chart("Naturalness ratings per source, all classes (share of scores 1-5)",
                                    evaluation.results)
    contents = " · ".join(f'<a href="#class-{c.index}">{_e(c)}</a>' for c in evaluation.classes)
    meta = (f"spurgen {__version__} · {utc_now()} · classifiers: {_e(', '.join(names))} · "
            f"{sum(len(r.files) for r in evaluation.results)} images")
    body = "".join(_table(t) for t in tables) + chart + "".join(
        _class_section(evaluation, c.index, images_per_source) for c in evaluation.classes)
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>spurgen evaluation</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_STYLE}</style></head><body>'
            f'<h1>spurgen evaluation</h1><p class="meta">{meta}</p><p class="meta">{contents}</p>{body}'
            '</body></html>\n')
