"""The records ``spurgen evaluate`` writes: rows of evaluation.csv and evaluation-images.csv, parts of its JSON."""

from __future__ import annotations

import csv
import io
from typing import Any, Iterable

import numpy as np

from .results import Evaluation

__all__ = ["result_rows", "image_rows", "csv_text", "image_records", "means"]


def result_rows(evaluation: Evaluation) -> list[dict[str, Any]]:
    """One record per class x source x classifier (evaluation.csv and the JSON's ``results``)."""
    records = []
    quality_name = evaluation.quality.name if evaluation.quality else None
    for r in evaluation.results:
        for c, name in enumerate(evaluation.classifiers):
            records.append({
                "class_index": r.cls.index, "class_name": r.cls.name, "source": r.source.name,
                "source_kind": r.source.kind, "classifier": name, "images": len(r.files), "unreadable": r.unreadable,
                "blanked": r.source.blanked,
                "spurious_accuracy": float(r.spurious_accuracy[c]), "top5_rate": float(r.top5_rate[c]),
                "mean_class_probability": float(r.mean_probability[c]),
                "consistently_spurious_rate": r.consistent_rate,
                "spurious_score_roc_auc": None if r.roc_auc is None else float(r.roc_auc[c]),
                "spurious_score_average_precision":
                    None if r.average_precision is None else float(r.average_precision[c]),
                "quality_metric": quality_name,
                "quality_mean": None if r.quality is None else float(r.quality.mean()),
                "quality_std": None if r.quality is None else float(r.quality.std()),
            })
    return records


def image_rows(evaluation: Evaluation) -> list[dict[str, Any]]:
    """One record per image x classifier (evaluation-images.csv)."""
    records = []
    for r in evaluation.results:
        for i, path in enumerate(r.files):
            for c, name in enumerate(evaluation.classifiers):
                records.append({
                    "class_index": r.cls.index, "source": r.source.name, "file": str(path), "sha256": r.hashes[i],
                    "classifier": name, "top1": int(r.top1[c, i]),
                    "top1_label": evaluation.labels.label(int(r.top1[c, i])),
                    "class_probability": float(r.probability[c, i]), "in_top5": bool(r.in_top5[c, i]),
                    "spurious": bool(r.spurious[c, i]), "consistently_spurious": bool(r.consistent[i]),
                    "quality": None if r.quality is None else float(r.quality[i]),
                })
    return records


def csv_text(records: Iterable[dict[str, Any]]) -> str:
    """The records as CSV, the first record's keys as header; ``None`` becomes an empty cell."""
    records = list(records)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]) if records else [], lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in record.items()} for record in records)
    return buffer.getvalue()


def image_records(evaluation: Evaluation) -> list[dict[str, Any]]:
    """Per-image entries of evaluation.json: every classifier's prediction nested under the image."""
    images = []
    for r in evaluation.results:
        for i, path in enumerate(r.files):
            images.append({
                "class": r.cls.index, "source": r.source.name, "file": str(path), "sha256": r.hashes[i],
                "consistently_spurious": bool(r.consistent[i]),
                "quality": None if r.quality is None else float(r.quality[i]),
                "predictions": {name: {"top1": int(r.top1[c, i]),
                                       "top1_label": evaluation.labels.label(int(r.top1[c, i])),
                                       "class_probability": float(r.probability[c, i]),
                                       "in_top5": bool(r.in_top5[c, i])}
                                for c, name in enumerate(evaluation.classifiers)}})
    return images


def means(evaluation: Evaluation) -> list[dict[str, Any]]:
    """Per source and classifier, the mean over classes of each measure (the tables' 'mean' rows)."""
    means = []
    for source in evaluation.sources:
        results = [r for r in evaluation.results if r.source.name == source]
        scored = all(r.roc_auc is not None for r in results)
        joint = evaluation.joint_average_precision(source)
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
                "spurious_score_joint_average_precision": None if joint is None else float(joint[c]),
            })
    return means
