"""The summary tables of ``spurgen evaluate``: built once as text, printed with rich and put in the HTML report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._runtime import console
from ..rate.stats import SCORES
from .results import Evaluation, SourceResult

__all__ = ["TableData", "summary_tables", "print_evaluation_tables"]


@dataclass
class TableData:
    """A summary table, rendered on the terminal with rich and in the HTML report.

    Attributes:
        title: Shown above the table.
        columns: Column names; a line break in a name separates classifier and source.
        rows: Cells as text.
        caption: Shown below the table.
        breaks: Row indices before which a separating line is drawn.
        summary_from: Index of the first row of means (shown bold), or ``None``.
    """

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    caption: str = ""
    breaks: list[int] = field(default_factory=list)
    summary_from: int | None = None

    def width(self) -> int:
        """Characters the table needs on a terminal (cells plus rich's borders and padding)."""
        widths = [max([len(line) for line in column.split("\n")] + [len(row[i]) for row in self.rows])
                  for i, column in enumerate(self.columns)]
        return sum(widths) + 3 * len(widths) + 1


def _percent(value: float | None) -> str:
    return f"{100 * value:.1f}" if value is not None else "–"


def _mean_over_classes(evaluation: Evaluation, source: str, value: Any) -> float | None:
    """Mean of ``value(result)`` over the classes that have the source."""
    values = [value(r) for r in evaluation.results if r.source.name == source]
    return float(np.mean(values)) if values else None


def _table1(evaluation: Evaluation, stacked: bool) -> TableData:
    """Table 1: spurious accuracy per class and classifier, each source beside the others.

    The paper's layout puts the sources side by side within each classifier's columns; ``stacked`` puts them
    one under the other within each class, for terminals too narrow for the former.
    """
    sources, names = evaluation.sources, evaluation.classifiers
    title = "Table 1: spurious accuracy (%) per class, classifier and source"
    caption = "top-1 prediction = the class; 'all': consistently spurious (every classifier at once)"
    if evaluation.blanked:
        caption += f"; {evaluation.blanked} image(s) blanked by the safety checker left out"

    def values(result: SourceResult | None) -> list[float | None]:
        accuracy = [float(a) for a in result.spurious_accuracy] if result else [None] * len(names)
        return [*accuracy, result.consistent_rate if result else None]

    def means(source: str) -> list[float | None]:
        return [*(_mean_over_classes(evaluation, source, lambda r, c=c: r.spurious_accuracy[c])
                  for c in range(len(names))),
                _mean_over_classes(evaluation, source, lambda r: r.consistent_rate)]

    several = len(evaluation.classes) > 1
    if stacked:
        table = TableData(title, ["class", "source", *names, "all"], caption=caption)
        for cls in evaluation.classes:
            table.breaks.append(len(table.rows))
            for n, source in enumerate(s for s in sources if evaluation.result(cls, s)):
                table.rows.append([str(cls) if n == 0 else "", source,
                                   *map(_percent, values(evaluation.result(cls, source)))])
        if several:
            table.summary_from = len(table.rows)
            table.breaks.append(len(table.rows))
            table.rows.extend(["mean" if n == 0 else "", source, *map(_percent, means(source))]
                              for n, source in enumerate(sources))
        return table
    table = TableData(title, ["class", *(f"{c}\n{s}" for c in [*names, "all"] for s in sources)], caption=caption)
    for cls in evaluation.classes:
        by_source = [values(evaluation.result(cls, s)) for s in sources]
        table.rows.append([str(cls), *(_percent(by_source[j][c])
                                       for c in range(len(names) + 1) for j in range(len(sources)))])
    if several:
        table.summary_from = len(table.rows)
        table.breaks.append(len(table.rows))
        by_source = [means(s) for s in sources]
        table.rows.append(["mean", *(_percent(by_source[j][c])
                                     for c in range(len(names) + 1) for j in range(len(sources)))])
    return table


def summary_tables(evaluation: Evaluation, stacked: bool = False) -> list[TableData]:
    """Table 1 (``stacked``: sources one under another), Table 2 when several runs exist, and the quality and
    spurious score tables when they were measured."""
    sources = evaluation.sources
    tables = [_table1(evaluation, stacked)]
    if len(evaluation.runs) > 1:
        table2 = TableData("Table 2: spurious accuracy (%), mean over classifiers",
                           ["source", *(str(c) for c in evaluation.classes), "mean"])
        for source in sources:
            per_class = [evaluation.result(cls, source) for cls in evaluation.classes]
            table2.rows.append([source, *(_percent(r.spurious_accuracy.mean() if r else None) for r in per_class),
                                _percent(_mean_over_classes(evaluation, source, lambda r: r.spurious_accuracy.mean()))])
        tables.append(table2)
    if evaluation.quality:
        direction = "lower is better" if evaluation.quality.lower_better else "higher is better"
        quality = TableData(f"Quality: {evaluation.quality.name}, mean ± std", ["class", *sources],
                            caption=f"{direction}; std over the images (population)")
        for cls in evaluation.classes:
            found = [evaluation.result(cls, s) for s in sources]
            quality.rows.append([str(cls), *(f"{r.quality.mean():.3f} ± {r.quality.std():.3f}"
                                             if r and r.quality is not None else "–" for r in found)])
        tables.append(quality)
    if any(r.roc_auc is not None for r in evaluation.results):
        tables.append(_score_table(evaluation))
    if evaluation.rated:
        tables.append(_ratings_table(evaluation))
    return tables


def _score_table(evaluation: Evaluation) -> TableData:
    """Spurious ImageNet's spurious score per source and classifier: ROC-AUC and average precision (means over
    classes) and the joint average precision (all classes pooled)."""
    protocol = ("Spurious ImageNet's preprocessing" if evaluation.protocol == "spurious-imagenet"
                else "each classifier's own preprocessing (--protocol spurious-imagenet reproduces their numbers)")
    score = TableData("Spurious score: ROC-AUC / average precision (means over classes) / joint average precision",
                      ["source", *evaluation.classifiers],
                      caption="class probability separating --val-images (positives) from the source's images; lower "
                              "means more spurious. Spurious ImageNet's paper calls its score AUC; its code computes "
                              f"average precision, per class and jointly over all classes. Protocol: {protocol}")
    for source in evaluation.sources:
        joint = evaluation.joint_average_precision(source)
        score.rows.append([source, *(
            f"{_mean_over_classes(evaluation, source, lambda r, c=c: r.roc_auc[c]):.3f} / "
            f"{_mean_over_classes(evaluation, source, lambda r, c=c: r.average_precision[c]):.3f} / "
            f"{'–' if joint is None else f'{joint[c]:.3f}'}"
            for c in range(len(evaluation.classifiers)))])
    return score


def _ratings_table(evaluation: Evaluation) -> TableData:
    """The human study per class and source: naturalness distribution and mean, agreement, object present."""
    table = TableData("Human ratings: naturalness (% of scores), agreement and object present",
                      ["class", "source", "images", "raters", *(f"{s}" for s in SCORES), "mean", "alpha", "object %"],
                      caption="naturalness 1 (very unnatural) to 5 (very natural), over all raters' scores; alpha: "
                              "Krippendorff's alpha, ordinal; object %: images most raters saw the class object in")
    for cls in evaluation.classes:
        table.breaks.append(len(table.rows))
        for r in evaluation.results:
            if r.cls.index != cls.index or (rating := r.rating) is None:
                continue
            table.rows.append([str(cls), r.source.name, str(rating.images_rated), str(rating.raters),
                               *(_percent(share) for share in rating.distribution),
                               f"{rating.mean:.2f}" if rating.mean is not None else "–",
                               f"{rating.alpha:.3f}" if rating.alpha is not None else "–",
                               _percent(rating.object_present_rate)])
    return table


def print_evaluation_tables(evaluation: Evaluation) -> None:
    """The summary tables on the terminal; Table 1 stacks its sources when side by side would not fit."""
    from rich.table import Table

    tables = summary_tables(evaluation)
    if tables[0].width() > console.width:
        tables[0] = _table1(evaluation, stacked=True)
    for data in tables:
        table = Table(title=data.title, caption=data.caption or None)
        for column in data.columns:
            table.add_column(column, justify="left" if column in ("class", "source") else "right")
        for i, row in enumerate(data.rows):
            if i in data.breaks and i > 0:
                table.add_section()
            summary = data.summary_from is not None and i >= data.summary_from
            table.add_row(*row, style="bold" if summary else None)
        console.print(table)
