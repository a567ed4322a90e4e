"""The measures of ``spurgen evaluate`` that are plain maths: ROC-AUC, average precision, top-5 membership."""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["roc_auc", "average_precision", "in_top5"]


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


def in_top5(logits: np.ndarray, class_index: int) -> np.ndarray:
    """[images]: whether the class is among each row's five highest logits."""
    # Rank = how many classes score strictly higher; a tie with the class does not push it out.
    return (logits > logits[:, class_index:class_index + 1]).sum(axis=1) < 5
