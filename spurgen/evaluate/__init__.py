"""Stage 4, ``spurgen evaluate``: how spurious each source's images are for each classifier, and their quality.

The sources of a class are the images of each generated run (``generated/<class>/<run>/``; the untouched
base model's run is ``base``), the selected references (``refs``), Spurious ImageNet's images of the class
(``--dataset``, source ``spurious-imagenet``) and any ``--images [NAME=]DIR``. For each class, source and
classifier:

- *spurious accuracy*: the fraction of images whose top-1 prediction is the class (the paper's measure);
- *top-5 rate*: the fraction with the class among the classifier's five highest logits;
- *mean class probability*: the mean softmax probability of the class;

and for each class and source the *consistently spurious rate*, the fraction of images that every
classifier predicts as the class. ``--val-images`` adds Spurious ImageNet's spurious score (per class, its
mean, and the joint score over all classes), ``--quality`` a no-reference quality score per image, ``--export``
writes the consistently spurious generated images as a new spurious test set. ``--protocol spurious-imagenet``
feeds the classifiers as Spurious ImageNet's code does, so the score is theirs to the last digit. Images that the
safety checker blanked (``nsfw_flagged`` in generation.json) are left out of every measure and counted.

Predictions come from :func:`~spurgen.predict.predict_files` with the same content-addressed cache as
select-refs: each image is classified once per classifier, whichever source, command or run it belongs to.

Outputs, in ``reports/``: ``evaluation.csv`` (one row per class x source x classifier),
``evaluation-images.csv`` (one row per image x classifier), ``report.html``, and ``evaluation.json``,
written last.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from .._runtime import is_main_process, warn
from ..classifiers import SPURIOUS_IMAGENET_VAL_CROP, classifier_records, load_classifiers, protocol_crop
from ..config import EvaluateConfig
from ..errors import SpurgenError
from ..labels import get_label_set
from ..predict import PredictionCache, Predictions, predict_files
from ..quality import load_quality_metric, score_files
from ..rate import load_ratings
from ..rate.stats import summarize_ratings
from ..workspace import (EVALUATION_FILE, IMAGES_CSV, REPORT_FILE, SUMMARY_CSV, Workspace, atomic_write_json,
                         atomic_write_text, environment_versions, utc_now)
from .export import check_export_target, export_images
from .metrics import average_precision, roc_auc
from .records import csv_text, image_records, image_rows, means, result_rows
from .report import render_report
from .results import Evaluation, Source, SourceResult, source_result
from .sources import collect_sources, resolve_classes, val_files
from .tables import TableData, print_evaluation_tables, summary_tables

__all__ = ["Source", "SourceResult", "Evaluation", "TableData", "evaluate", "summary_tables", "print_evaluation_tables",
           "roc_auc", "average_precision"]


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
    classes = resolve_classes(config, workspace, labels)
    ratings = load_ratings(workspace)
    if config.drop_object_present and not ratings:
        raise SpurgenError(f"--drop-object-present needs the answers of 'spurgen rate', but "
                           f"{workspace.root / 'ratings'} holds none; rate the images first or leave out "
                           "--drop-object-present")
    sources = collect_sources(config, workspace, classes)
    val = val_files(config.val_images, classes) if config.val_images else {}
    export = Path(config.export).expanduser().resolve() if config.export else None
    if export:
        check_export_target(export)
        if not any(s.kind == "generated" for found in sources.values() for s in found):
            raise SpurgenError("--export writes consistently spurious generated images, but no generated images are "
                               "evaluated; run 'spurgen generate' first or leave out --export")
    workspace.ensure_writable(workspace.reports_dir, workspace.cache_dir(), *([export] if export else []))
    metric = load_quality_metric(config.quality, config.quality_weights, config.device) if config.quality else None
    classifiers = load_classifiers(config.classifiers, classifier_flags, labels, settings,
                                   protocol_crop(config.protocol, config.crop), config.device)
    # Spurious ImageNet feeds real images otherwise than spurious ones; spurgen feeds every image alike.
    val_classifiers = ([c.preprocessed_as(SPURIOUS_IMAGENET_VAL_CROP) for c in classifiers]
                       if config.protocol == "spurious-imagenet" else classifiers)

    source_files = list(dict.fromkeys(f for found in sources.values() for s in found for f in s.files))
    cache = PredictionCache(workspace.cache_dir("predictions"))
    predictions = predict_files(source_files, classifiers, cache=cache, batch_size=config.batch_size,
                                num_workers=config.num_workers, description="classifying")
    val_predictions = predict_files(list(dict.fromkeys(f for files in val.values() for f in files)), val_classifiers,
                                    cache=cache, batch_size=config.batch_size, num_workers=config.num_workers,
                                    description="classifying --val-images") if val else None
    unreadable = {**predictions.unreadable, **(val_predictions.unreadable if val_predictions else {})}
    for path, reason in unreadable.items():
        warn(f"skipped unreadable image {path}: {reason}")
    quality = None
    if metric:
        readable = [f for f in source_files if f not in predictions.unreadable]
        quality = score_files(metric, readable, [predictions.hashes[i] for i in predictions.rows(readable)],
                              PredictionCache(workspace.cache_dir("quality")), num_workers=config.num_workers)
    results = [result for cls in classes for source in sources[cls.index]
               if (result := source_result(cls, source, predictions, quality,
                                           _val_probability(val_predictions, val, cls.index))) is not None]
    for result in results:
        result.rating = summarize_ratings(result.hashes, ratings)
    evaluation = Evaluation(labels=labels, classifiers=[c.name for c in classifiers], results=results, quality=metric,
                            reports=workspace.reports_dir, protocol=config.protocol, export=export)
    if not is_main_process():  # under `accelerate launch`, one process writes
        return evaluation

    manifest_base = {
        "created": utc_now(),
        "protocol": config.protocol,
        "versions": environment_versions(),
        "settings": {**vars(config), "classes": [c.index for c in classes]},
        "classifiers": classifier_records(classifiers),
        "quality": ({"metric": metric.name, "weights": metric.weights, "lower_better": metric.lower_better}
                    if metric else None),
    }
    if export:
        evaluation.exported = export_images(evaluation, export, config.min_quality, config.drop_object_present,
                                            manifest_base)
    reports = workspace.reports_dir
    atomic_write_text(reports / SUMMARY_CSV, csv_text(result_rows(evaluation)))
    atomic_write_text(reports / IMAGES_CSV, csv_text(image_rows(evaluation)))
    atomic_write_text(reports / REPORT_FILE,
                      render_report(evaluation, summary_tables(evaluation), config.report_images))
    atomic_write_json(reports / EVALUATION_FILE, {
        "stage": "evaluate", **manifest_base,
        "classes": [{"index": c.index, "name": c.name, "synset": c.synset, "spurious_feature": c.spurious_feature}
                    for c in classes],
        "sources": [{"class": r.cls.index, "name": r.source.name, "kind": r.source.kind, "folder": str(r.source.folder),
                     "images": len(r.files), "unreadable": r.unreadable, "blanked": r.source.blanked}
                    for r in results],
        "blanked": evaluation.blanked,
        "results": result_rows(evaluation),
        "means": means(evaluation),
        "images": image_records(evaluation),
        "unreadable": [{"file": str(f), "reason": reason} for f, reason in unreadable.items()],
        "val_images": {str(k): [str(f) for f in files] for k, files in val.items()} or None,
        "computed_predictions": {name: count + (val_predictions.computed[name] if val_predictions else 0)
                                 for name, count in predictions.computed.items()},
        "ratings": [{"class": r.cls.index, "source": r.source.name, **r.rating.record()}
                    for r in results if r.rating is not None] if evaluation.rated else None,
        "export": ({"folder": str(export), "images": evaluation.exported, "min_quality": config.min_quality}
                   if export else None),
    })
    return evaluation


def _val_probability(predictions: Predictions | None, val: dict[int, list[Path]],
                     class_index: int) -> np.ndarray | None:
    """[classifiers, readable --val-images of the class]: each classifier's probability of the class.

    Args:
        predictions: Every classifier's predictions on the --val-images, or ``None`` without them.
        val: The --val-images of each class.
        class_index: The class.
    """
    if predictions is None:
        return None
    rows = predictions.rows(val[class_index])
    return np.stack([predictions.probabilities(name)[rows, class_index] for name in predictions.logits])
