"""Stage 4, ``spurgen evaluate``: how spurious each source's images are for each classifier, and their quality.

The sources of a class are the images of each generated run (``generated/<class>/<run>/``; the untouched
base model's run is ``base``), the selected references (``refs``), Spurious ImageNet's images of the class
(``--dataset``, source ``spurious-imagenet``) and any ``--images [NAME=]DIR``. For each class, source and
classifier:

- *spurious accuracy*: the fraction of images whose top-1 prediction is the class (the paper's measure);
- *top-5 rate*: the fraction with the class among the classifier's five highest logits;
- *mean class probability*: the mean softmax probability of the class;

and for each class and source the *consistently spurious rate*, the fraction of images that every
classifier predicts as the class. ``--val-images`` adds Spurious ImageNet's spurious score, ``--quality``
a no-reference quality score per image, ``--export`` writes the consistently spurious generated images
as a new spurious test set.

Predictions come from :func:`~spurgen.predict.predict_files` with the same content-addressed cache as
select-refs: each image is classified once per classifier, whichever source, command or run it belongs to.

Outputs, in ``reports/``: ``evaluation.csv`` (one row per class x source x classifier),
``evaluation-images.csv`` (one row per image x classifier), ``report.html``, and ``evaluation.json``,
written last.
"""

from __future__ import annotations

import csv
import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .._runtime import console, is_main_process, warn
from ..classifiers import classifier_records, load_classifiers
from ..config import EvaluateConfig
from ..errors import SpurgenError
from ..images import class_image_files, list_images
from ..labels import ClassInfo, LabelSet, get_label_set
from ..predict import PredictionCache, Predictions, consistency, predict_files
from ..quality import QualityMetric, load_quality_metric, score_files
from ..rate import load_ratings
from ..rate.stats import SCORES, RatingSummary, summarize_ratings
from ..workspace import (BASE_RUN, EVALUATION_FILE, EXPORT_MANIFEST, GENERATION_FILE, IMAGES_CSV, REPORT_FILE, SELECTION_FILE,
                        SUMMARY_CSV, Workspace, atomic_directory, atomic_write_json, atomic_write_text,
                        environment_versions, read_json, utc_now, workspace_classes)

__all__ = ["Source", "SourceResult", "Evaluation", "TableData", "evaluate", "summary_tables", "print_evaluation_tables",
           "roc_auc", "average_precision"]

DATASET_SOURCE = "spurious-imagenet"
REFS_SOURCE = "refs"


@dataclass(frozen=True)
class Source:
    """A set of images of one class: a generated run, the references, the data set, or a user folder."""

    name: str
    kind: str  # "generated", "refs", "dataset" or "images"
    folder: Path
    files: tuple[Path, ...]


@dataclass
class SourceResult:
    """One class and source: every classifier's predictions on its readable images, and what follows.

    Arrays over classifiers follow :attr:`Evaluation.classifiers`; arrays over images follow :attr:`files`.
    """

    cls: ClassInfo
    source: Source
    files: list[Path]
    hashes: list[str]
    top1: np.ndarray  # [classifiers, images] predicted class index
    probability: np.ndarray  # [classifiers, images] softmax probability of the class
    in_top5: np.ndarray  # [classifiers, images]
    consistent: np.ndarray  # [images] every classifier predicts the class
    quality: np.ndarray | None = None  # [images]
    roc_auc: np.ndarray | None = None  # [classifiers] spurious score against --val-images
    average_precision: np.ndarray | None = None  # [classifiers]
    rating: RatingSummary | None = None  # what the human study (ratings/) says about these images
    unreadable: int = 0

    @property
    def spurious(self) -> np.ndarray:
        """[classifiers, images]: the classifier's top-1 prediction is the class."""
        return self.top1 == self.cls.index

    @property
    def spurious_accuracy(self) -> np.ndarray:
        return self.spurious.mean(axis=1)

    @property
    def top5_rate(self) -> np.ndarray:
        return self.in_top5.mean(axis=1)

    @property
    def mean_probability(self) -> np.ndarray:
        return self.probability.mean(axis=1)

    @property
    def consistent_rate(self) -> float:
        return float(self.consistent.mean())


@dataclass
class Evaluation:
    """Everything ``evaluate`` measured, and where it wrote it."""

    labels: LabelSet
    classifiers: list[str]
    results: list[SourceResult]
    quality: QualityMetric | None
    reports: Path
    export: Path | None = None
    exported: int = 0

    @property
    def classes(self) -> list[ClassInfo]:
        return list({r.cls.index: r.cls for r in self.results}.values())

    @property
    def sources(self) -> list[str]:
        """Source names in the order they were found (data set, references, folders, base, runs)."""
        return list(dict.fromkeys(r.source.name for r in self.results))

    @property
    def runs(self) -> list[str]:
        return list(dict.fromkeys(r.source.name for r in self.results if r.source.kind == "generated"))

    @property
    def rated(self) -> bool:
        """Whether the human study rated any evaluated image."""
        return any(r.rating is not None for r in self.results)

    def result(self, cls: ClassInfo, source: str) -> SourceResult | None:
        return next((r for r in self.results if r.cls.index == cls.index and r.source.name == source), None)


# --- metrics -----------------------------------------------------------------------------------------------------


def roc_auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """ROC-AUC: the probability that a random positive scores above a random negative, ties counting half."""
    pos = np.asarray(positives, dtype=np.float64)[:, None]
    neg = np.asarray(negatives, dtype=np.float64)[None, :]
    return float(((pos > neg) + 0.5 * (pos == neg)).mean())


def average_precision(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """Average precision of ranking positives above negatives, as scikit-learn's ``average_precision_score``.

    The sum over score thresholds of (recall gained) x precision, without interpolation; equal scores form
    one threshold.
    """
    scores = np.concatenate([np.asarray(positives, np.float64), np.asarray(negatives, np.float64)])
    labels = np.concatenate([np.ones(len(positives)), np.zeros(len(negatives))])
    order = np.argsort(-scores, kind="stable")
    scores, labels = scores[order], labels[order]
    last_of_each_score = np.concatenate([np.flatnonzero(np.diff(scores)), [len(scores) - 1]])
    true_positives = np.cumsum(labels)[last_of_each_score]
    precision = true_positives / (last_of_each_score + 1)
    recall = true_positives / labels.sum()
    return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def _in_top5(logits: np.ndarray, class_index: int) -> np.ndarray:
    # Rank = how many classes score strictly higher; a tie with the class does not push it out.
    return (logits > logits[:, class_index:class_index + 1]).sum(axis=1) < 5


# --- sources -----------------------------------------------------------------------------------------------------


def _generated_sources(workspace: Workspace, cls: ClassInfo, runs: Sequence[str]) -> list[Source]:
    """The class's finished generated runs; a run named explicitly must be finished and non-empty.

    Raises:
        SpurgenError: a named run has no images, or its generation is incomplete.
    """
    every = "all" in runs
    folder = workspace.class_generated_dir(cls)
    if every:
        found = [p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")] if folder.is_dir() else []
        names = sorted(found, key=lambda name: (name != BASE_RUN, name))  # the baseline first
    else:
        names = list(runs)
    sources = []
    for run in names:
        run_dir = workspace.generated_dir(cls, run)
        manifest = read_json(run_dir / GENERATION_FILE) if (run_dir / GENERATION_FILE).is_file() else None
        files = tuple(run_dir / entry["file"] for entry in (manifest or {}).get("images", []))
        if manifest is None or not files:
            problem = (f"{run_dir} has no generated images; run 'spurgen generate --classes {cls.index}"
                       f"{' --base' if run == BASE_RUN else f' --runs {run}'}' first")
        elif manifest.get("status") != "complete":
            problem = (f"{run_dir}: generation is incomplete ({len(files)} of {manifest.get('num_images')} images); "
                       "run the same 'spurgen generate' command again to finish it")
        else:
            sources.append(Source(run, "generated", run_dir, files))
            continue
        if not every:
            raise SpurgenError(problem)
        warn(f"{problem}; skipped")
    return sources


def _refs_source(workspace: Workspace, cls: ClassInfo) -> Source | None:
    folder = workspace.refs_dir(cls)
    if not (folder / SELECTION_FILE).is_file():
        return None
    selected = read_json(folder / SELECTION_FILE).get("selected", [])
    return Source(REFS_SOURCE, "refs", folder, tuple(folder / name for name in selected)) if selected else None


def _folder_sources(spec: str, classes: Sequence[ClassInfo]) -> dict[int, Source]:
    """``[NAME=]DIR``: a plain folder of one class's images, or a folder in Spurious ImageNet's layout."""
    name, sep, path = spec.partition("=")
    if not sep or "/" in name or not name:
        name, path = "", spec
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise SpurgenError(f"--images {spec}: {folder} is not a folder; give [NAME=]DIR")
    plain = bool(list_images(folder))
    files = class_image_files(classes, None if plain else str(folder), str(folder) if plain else None)
    name = name or folder.name
    return {c.index: Source(name, "images", folder, tuple(files[c.index])) for c in classes}


def _collect_sources(config: EvaluateConfig, workspace: Workspace, classes: Sequence[ClassInfo]) -> dict[int, list[Source]]:
    """Every source of every class, checked before any model loads.

    Raises:
        SpurgenError: a missing folder, a name used twice, or a class with nothing to evaluate.
    """
    dataset = class_image_files(classes, config.dataset, None) if config.dataset else {}
    folders = [_folder_sources(spec, classes) for spec in config.images]
    found: dict[int, list[Source]] = {}
    for cls in classes:
        sources = []
        if config.dataset:
            sources.append(Source(DATASET_SOURCE, "dataset", Path(config.dataset).expanduser(), tuple(dataset[cls.index])))
        refs = _refs_source(workspace, cls) if config.refs else None
        if refs:
            sources.append(refs)
        sources.extend(folder[cls.index] for folder in folders)
        sources.extend(_generated_sources(workspace, cls, config.runs))
        names = [s.name for s in sources]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise SpurgenError(f"source name '{twice[0]}' is used twice for {cls}; name --images sources with NAME=DIR")
        if not sources:
            raise SpurgenError(f"nothing to evaluate for {cls}: no finished generated images in "
                               f"{workspace.class_generated_dir(cls)}, no references; run 'spurgen generate' first "
                               "or pass --dataset / --images")
        found[cls.index] = sources
    return found


def _val_files(spec: str, classes: Sequence[ClassInfo]) -> dict[int, list[Path]]:
    """Real images of each class for the spurious score: per-class sub-folders, or one plain folder.

    Raises:
        SpurgenError: the folder or a class's sub-folder is missing or holds no images.
    """
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise SpurgenError(f"--val-images {root} is not a folder; give a folder of real class images")
    if len(classes) == 1 and list_images(root):
        return {classes[0].index: list_images(root)}
    found = {}
    for cls in classes:
        names = [n for n in (cls.synset, cls.dirname, str(cls.index)) if n]
        folder = next((root / n for n in names if (root / n).is_dir()), None)
        if folder is None:
            raise SpurgenError(f"--val-images {root} has no folder for {cls}; expected a sub-folder named "
                               f"{' or '.join(names)}")
        found[cls.index] = list_images(folder)
        if not found[cls.index]:
            raise SpurgenError(f"{folder} holds no images; put the class's real images there (.png/.jpg)")
    return found


def _resolve_classes(config: EvaluateConfig, workspace: Workspace, labels: LabelSet) -> list[ClassInfo]:
    if config.classes:
        return labels.resolve_many(config.classes)
    found = {c.index: c for folder in ("generated", "refs") for c in workspace_classes(workspace.root / folder, labels)}
    if not found:
        raise SpurgenError(f"no generated images or references in {workspace.root}; pass --classes NAME with "
                           "--dataset or --images, or run 'spurgen generate' first")
    return [found[i] for i in sorted(found)]


# --- export ------------------------------------------------------------------------------------------------------


def _check_export_target(folder: Path) -> None:
    """An export replaces its folder whole, so only an empty folder or an earlier export may be there."""
    if not folder.exists():
        return
    earlier = folder / EXPORT_MANIFEST
    if folder.is_dir() and (not any(folder.iterdir()) or (earlier.is_file() and read_json(earlier).get("stage") == "export")):
        return
    raise SpurgenError(f"--export {folder} already holds other files; choose a new or empty folder "
                       "(an earlier spurgen export there is replaced)")


def _export(evaluation: Evaluation, folder: Path, min_quality: float | None, drop_object_present: bool,
            manifest_base: dict[str, Any]) -> int:
    """Writes the consistently spurious generated images in Spurious ImageNet's layout; returns their count.

    With ``drop_object_present``, images that most raters said show the class object are left out.

    ``images/<prefix>_<index>_<name>_<component>/<run>_<file>``, ``images/timestamp.txt``,
    ``spurious_imagenet_classes.tsv`` and ``manifest.json`` (per image: source, predictions, quality).
    """
    entries = []
    with atomic_directory(folder) as staging:
        images = staging / "images"
        images.mkdir()
        (images / "timestamp.txt").write_text(f"{utc_now()} spurgen export\n", encoding="utf-8")
        rows = ["imagenet_index\tclass_name\tspurious_feature\tspurious_npca_components"]
        for cls in evaluation.classes:
            component = cls.npca_components[0] if cls.npca_components else 0
            class_folder = images / f"spurgen_generated_{cls.index}_{cls.slug}_{component}"
            count = 0
            for result in (r for r in evaluation.results if r.cls.index == cls.index and r.source.kind == "generated"):
                for i, path in enumerate(result.files):
                    keep = bool(result.consistent[i]) and (
                        min_quality is None or evaluation.quality.passes(float(result.quality[i]), min_quality)) and (  # type: ignore[union-attr, index]
                        not drop_object_present or result.rating is None or result.hashes[i] not in result.rating.object_seen)
                    if not keep:
                        continue
                    class_folder.mkdir(exist_ok=True)
                    name = f"{result.source.name}_{path.name}"
                    shutil.copyfile(path, class_folder / name)
                    count += 1
                    entries.append({
                        "file": f"images/{class_folder.name}/{name}", "class": cls.index, "run": result.source.name,
                        "source_file": str(path), "sha256": result.hashes[i],
                        "quality": None if result.quality is None else float(result.quality[i]),
                        "predictions": {name_c: {"top1": int(result.top1[c, i]),
                                                 "probability": float(result.probability[c, i])}
                                        for c, name_c in enumerate(evaluation.classifiers)}})
            if count:
                rows.append(f"{cls.index}\t{cls.name.replace(' ', '_')}\t{cls.spurious_feature or ''}\t"
                            f"{list(cls.npca_components)}")
            else:
                warn(f"{cls}: no generated image is consistently spurious"
                     f"{' and above --min-quality' if min_quality is not None else ''}; nothing exported for it")
        (staging / "spurious_imagenet_classes.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        atomic_write_json(staging / EXPORT_MANIFEST, {**manifest_base, "stage": "export", "min_quality": min_quality,
                                                      "drop_object_present": drop_object_present, "images": entries})
    return len(entries)


# --- tables ------------------------------------------------------------------------------------------------------


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

    def values(result: SourceResult | None) -> list[float | None]:
        accuracy = [float(a) for a in result.spurious_accuracy] if result else [None] * len(names)
        return [*accuracy, result.consistent_rate if result else None]

    def means(source: str) -> list[float | None]:
        return [*(_mean_over_classes(evaluation, source, lambda r, c=c: r.spurious_accuracy[c]) for c in range(len(names))),
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
        table.rows.append([str(cls), *(_percent(by_source[j][c]) for c in range(len(names) + 1) for j in range(len(sources)))])
    if several:
        table.summary_from = len(table.rows)
        table.breaks.append(len(table.rows))
        by_source = [means(s) for s in sources]
        table.rows.append(["mean", *(_percent(by_source[j][c]) for c in range(len(names) + 1) for j in range(len(sources)))])
    return table


def summary_tables(evaluation: Evaluation, stacked: bool = False) -> list[TableData]:
    """Table 1 (``stacked``: sources one under another), Table 2 when several runs exist, and the quality and
    spurious score tables when they were measured."""
    sources, names = evaluation.sources, evaluation.classifiers
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
        score = TableData("Spurious score: ROC-AUC / average precision, mean over classes", ["source", *names],
                          caption="class probability separating --val-images (positives) from the source's images; "
                                  "lower means more spurious. Spurious ImageNet's paper calls its score AUC; its code "
                                  "computes average precision")
        for source in sources:
            score.rows.append([source, *(
                f"{_mean_over_classes(evaluation, source, lambda r, c=c: r.roc_auc[c]):.3f} / "
                f"{_mean_over_classes(evaluation, source, lambda r, c=c: r.average_precision[c]):.3f}"
                for c in range(len(names)))])
        tables.append(score)
    if evaluation.rated:
        tables.append(_ratings_table(evaluation))
    return tables


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


# --- outputs -----------------------------------------------------------------------------------------------------


def _rows(evaluation: Evaluation) -> list[dict[str, Any]]:
    """One record per class x source x classifier (evaluation.csv and the JSON's ``results``)."""
    records = []
    quality_name = evaluation.quality.name if evaluation.quality else None
    for r in evaluation.results:
        for c, name in enumerate(evaluation.classifiers):
            records.append({
                "class_index": r.cls.index, "class_name": r.cls.name, "source": r.source.name,
                "source_kind": r.source.kind, "classifier": name, "images": len(r.files), "unreadable": r.unreadable,
                "spurious_accuracy": float(r.spurious_accuracy[c]), "top5_rate": float(r.top5_rate[c]),
                "mean_class_probability": float(r.mean_probability[c]),
                "consistently_spurious_rate": r.consistent_rate,
                "spurious_score_roc_auc": None if r.roc_auc is None else float(r.roc_auc[c]),
                "spurious_score_average_precision": None if r.average_precision is None else float(r.average_precision[c]),
                "quality_metric": quality_name,
                "quality_mean": None if r.quality is None else float(r.quality.mean()),
                "quality_std": None if r.quality is None else float(r.quality.std()),
            })
    return records


def _image_rows(evaluation: Evaluation) -> list[dict[str, Any]]:
    """One record per image x classifier (evaluation-images.csv)."""
    records = []
    for r in evaluation.results:
        for i, path in enumerate(r.files):
            for c, name in enumerate(evaluation.classifiers):
                records.append({
                    "class_index": r.cls.index, "source": r.source.name, "file": str(path), "sha256": r.hashes[i],
                    "classifier": name, "top1": int(r.top1[c, i]), "top1_label": evaluation.labels.label(int(r.top1[c, i])),
                    "class_probability": float(r.probability[c, i]), "in_top5": bool(r.in_top5[c, i]),
                    "spurious": bool(r.spurious[c, i]), "consistently_spurious": bool(r.consistent[i]),
                    "quality": None if r.quality is None else float(r.quality[i]),
                })
    return records


def _csv_text(records: Iterable[dict[str, Any]]) -> str:
    records = list(records)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]) if records else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in record.items()} for record in records)
    return buffer.getvalue()


def _image_records(evaluation: Evaluation) -> list[dict[str, Any]]:
    """Per-image entries of evaluation.json: every classifier's prediction nested under the image."""
    images = []
    for r in evaluation.results:
        for i, path in enumerate(r.files):
            images.append({
                "class": r.cls.index, "source": r.source.name, "file": str(path), "sha256": r.hashes[i],
                "consistently_spurious": bool(r.consistent[i]),
                "quality": None if r.quality is None else float(r.quality[i]),
                "predictions": {name: {"top1": int(r.top1[c, i]), "top1_label": evaluation.labels.label(int(r.top1[c, i])),
                                       "class_probability": float(r.probability[c, i]), "in_top5": bool(r.in_top5[c, i])}
                                for c, name in enumerate(evaluation.classifiers)}})
    return images


def _means(evaluation: Evaluation) -> list[dict[str, Any]]:
    """Per source and classifier, the mean over classes of each measure (the tables' 'mean' rows)."""
    means = []
    for source in evaluation.sources:
        results = [r for r in evaluation.results if r.source.name == source]
        scored = all(r.roc_auc is not None for r in results)
        for c, name in enumerate(evaluation.classifiers):
            means.append({
                "source": source, "classifier": name, "classes": len(results),
                "spurious_accuracy": float(np.mean([r.spurious_accuracy[c] for r in results])),
                "top5_rate": float(np.mean([r.top5_rate[c] for r in results])),
                "mean_class_probability": float(np.mean([r.mean_probability[c] for r in results])),
                "consistently_spurious_rate": float(np.mean([r.consistent_rate for r in results])),
                "spurious_score_roc_auc": float(np.mean([r.roc_auc[c] for r in results])) if scored else None,  # type: ignore[index]
                "spurious_score_average_precision":
                    float(np.mean([r.average_precision[c] for r in results])) if scored else None,  # type: ignore[index]
            })
    return means


# --- the stage ---------------------------------------------------------------------------------------------------


def _result(cls: ClassInfo, source: Source, predictions: Predictions, quality: dict[str, float] | None,
            val_rows: list[int] | None) -> SourceResult | None:
    readable = [f for f in source.files if f not in predictions.unreadable]
    if not readable:
        warn(f"{cls}, source {source.name}: no readable image; left out")
        return None
    rows = predictions.rows(readable)
    top1, probability, consistent = consistency(predictions, rows, cls.index)
    names = list(predictions.logits)
    result = SourceResult(
        cls=cls, source=source, files=readable, hashes=[predictions.hashes[i] for i in rows], top1=top1,
        probability=probability, consistent=consistent,
        in_top5=np.stack([_in_top5(predictions.logits[n][rows], cls.index) for n in names]),
        unreadable=len(source.files) - len(readable))
    if quality is not None:
        result.quality = np.array([quality[h] for h in result.hashes], dtype=np.float64)
    if val_rows:
        real = np.stack([predictions.probabilities(n)[val_rows, cls.index] for n in names])
        result.roc_auc = np.array([roc_auc(real[c], probability[c]) for c in range(len(names))])
        result.average_precision = np.array([average_precision(real[c], probability[c]) for c in range(len(names))])
    return result


def evaluate(config: EvaluateConfig, workspace: Workspace, classifier_flags: Sequence[str] = ()) -> Evaluation:
    """Measures every class's sources with every classifier and writes the reports (and the export).

    Args:
        config: Resolved settings.
        workspace: Where the generated images, references, reports and prediction cache are.
        classifier_flags: ``--classifier NAME=ARCH[@PATH]`` values.

    Raises:
        SpurgenError: bad input, found before any model loads; nothing is written then.
    """
    settings = workspace.settings()
    labels = get_label_set(config.labels)
    classes = _resolve_classes(config, workspace, labels)
    ratings = load_ratings(workspace)
    if config.drop_object_present and not ratings:
        raise SpurgenError(f"--drop-object-present needs the answers of 'spurgen rate', but {workspace.root / 'ratings'} "
                           "holds none; rate the images first or leave out --drop-object-present")
    sources = _collect_sources(config, workspace, classes)
    val = _val_files(config.val_images, classes) if config.val_images else {}
    export = Path(config.export).expanduser().resolve() if config.export else None
    if export:
        _check_export_target(export)
        if not any(s.kind == "generated" for found in sources.values() for s in found):
            raise SpurgenError("--export writes consistently spurious generated images, but no generated images are "
                               "evaluated; run 'spurgen generate' first or leave out --export")
    workspace.ensure_writable()
    metric = load_quality_metric(config.quality, config.quality_weights, config.device) if config.quality else None
    classifiers = load_classifiers(config.classifiers, classifier_flags, labels, settings, config.crop, config.device)

    source_files = list(dict.fromkeys(f for found in sources.values() for s in found for f in s.files))
    all_files = list(dict.fromkeys([*source_files, *(f for files in val.values() for f in files)]))
    predictions = predict_files(all_files, classifiers, cache=PredictionCache(workspace.cache_dir("predictions")),
                                batch_size=config.batch_size, num_workers=config.num_workers, description="classifying")
    for path, reason in predictions.unreadable.items():
        warn(f"skipped unreadable image {path}: {reason}")
    quality = None
    if metric:
        readable = [f for f in source_files if f not in predictions.unreadable]
        quality = score_files(metric, readable, [predictions.hashes[i] for i in predictions.rows(readable)],
                              PredictionCache(workspace.cache_dir("quality")), num_workers=config.num_workers)
    results = [result for cls in classes for source in sources[cls.index]
               if (result := _result(cls, source, predictions, quality,
                                     predictions.rows(val[cls.index]) if val else None)) is not None]
    for result in results:
        result.rating = summarize_ratings(result.hashes, ratings)
    evaluation = Evaluation(labels=labels, classifiers=[c.name for c in classifiers], results=results, quality=metric,
                            reports=workspace.reports_dir, export=export)
    if not is_main_process():  # under `accelerate launch`, one process writes
        return evaluation

    manifest_base = {
        "created": utc_now(),
        "versions": environment_versions(),
        "settings": {**vars(config), "classes": [c.index for c in classes]},
        "classifiers": classifier_records(classifiers),
        "quality": {"metric": metric.name, "weights": metric.weights, "lower_better": metric.lower_better} if metric else None,
    }
    if export:
        evaluation.exported = _export(evaluation, export, config.min_quality, config.drop_object_present, manifest_base)
    from .report import render_report

    reports = workspace.reports_dir
    atomic_write_text(reports / SUMMARY_CSV, _csv_text(_rows(evaluation)))
    atomic_write_text(reports / IMAGES_CSV, _csv_text(_image_rows(evaluation)))
    atomic_write_text(reports / REPORT_FILE, render_report(evaluation, summary_tables(evaluation), config.report_images))
    atomic_write_json(reports / EVALUATION_FILE, {
        "stage": "evaluate", **manifest_base,
        "classes": [{"index": c.index, "name": c.name, "synset": c.synset, "spurious_feature": c.spurious_feature}
                    for c in classes],
        "sources": [{"class": r.cls.index, "name": r.source.name, "kind": r.source.kind, "folder": str(r.source.folder),
                     "images": len(r.files), "unreadable": r.unreadable} for r in results],
        "results": _rows(evaluation),
        "means": _means(evaluation),
        "images": _image_records(evaluation),
        "unreadable": [{"file": str(f), "reason": reason} for f, reason in predictions.unreadable.items()],
        "val_images": {str(k): [str(f) for f in files] for k, files in val.items()} or None,
        "computed_predictions": predictions.computed,
        "ratings": [{"class": r.cls.index, "source": r.source.name, **r.rating.record()}
                    for r in results if r.rating is not None] if evaluation.rated else None,
        "export": {"folder": str(export), "images": evaluation.exported, "min_quality": config.min_quality} if export else None,
    })
    return evaluation
