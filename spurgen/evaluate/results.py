"""What ``spurgen evaluate`` measures: sources of images, each class and source's result, the whole evaluation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._runtime import warn
from ..labels import ClassInfo, LabelSet
from ..predict import Predictions, consistency
from ..quality import QualityMetric
from ..rate.stats import RatingSummary
from .metrics import average_precision, in_top5, roc_auc

__all__ = ["Source", "SourceResult", "Evaluation", "source_result"]


@dataclass(frozen=True)
class Source:
    """A set of images of one class: a generated run, the references, the data set, or a user folder."""

    name: str
    kind: str  # "generated", "refs", "dataset" or "images"
    folder: Path
    files: tuple[Path, ...]
    blanked: int = 0  # images the safety checker blanked, left out of files


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
    val_probability: np.ndarray | None = None  # [classifiers, val images] probability of the class, --val-images
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
    protocol: str = "spurgen"
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

    @property
    def blanked(self) -> int:
        """Images the safety checker blanked, left out of every measure."""
        return sum(r.source.blanked for r in self.results)

    def result(self, cls: ClassInfo, source: str) -> SourceResult | None:
        return next((r for r in self.results if r.cls.index == cls.index and r.source.name == source), None)

    def joint_average_precision(self, source: str) -> np.ndarray | None:
        """[classifiers]: Spurious ImageNet's joint score, one average precision over every class's images pooled.

        Positives are each class's --val-images scored by the probability of their own class, negatives the
        source's images scored likewise; ``None`` without --val-images.
        """
        results = [r for r in self.results if r.source.name == source]
        if not results or any(r.val_probability is None for r in results):
            return None
        real = [r.val_probability for r in results]
        return np.array([average_precision(np.concatenate([v[c] for v in real]),  # type: ignore[index]
                                           np.concatenate([r.probability[c] for r in results]))
                         for c in range(len(self.classifiers))])


def source_result(cls: ClassInfo, source: Source, predictions: Predictions, quality: dict[str, float] | None,
                  val_probability: np.ndarray | None) -> SourceResult | None:
    """One class and source measured from every classifier's predictions; ``None`` when no image is readable.

    Args:
        cls: The class the source's images are meant to show.
        source: Its images.
        predictions: Every classifier's predictions on (at least) the source's files.
        quality: Quality score by image hash, or ``None`` without --quality.
        val_probability: [classifiers, images]: each classifier's probability of the class on the class's
            readable --val-images, or ``None`` without --val-images.
    """
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
        in_top5=np.stack([in_top5(predictions.logits[n][rows], cls.index) for n in names]),
        unreadable=len(source.files) - len(readable))
    if quality is not None:
        result.quality = np.array([quality[h] for h in result.hashes], dtype=np.float64)
    if val_probability is not None and val_probability.shape[1]:
        result.val_probability = val_probability
        result.roc_auc = np.array([roc_auc(val_probability[c], probability[c]) for c in range(len(names))])
        result.average_precision = np.array([average_precision(val_probability[c], probability[c])
                                             for c in range(len(names))])
    return result
