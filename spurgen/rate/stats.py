"""What the human study (``spurgen rate``) says about each class and source, for ``spurgen evaluate``.

Ratings are matched to a source's images by content hash, so a rating counts for every source holding that
image (a reference is also a data set image). Per class and source:

- the *distribution* of naturalness scores: the fraction of all answers (every rater, every image) that
  gave each score 1-5, the paper's Figure 3; and their *mean*;
- *inter-rater agreement*: Krippendorff's alpha at the ordinal level over the raters x images matrix of
  naturalness scores (missing answers allowed), from the ``krippendorff`` package (the ``rate`` extra).
  It needs two raters scoring one image and two distinct scores; otherwise it is ``None``;
- the *object-present rate*: the fraction of images with an object answer whose majority answer is "yes"
  (more than half of that image's answers; "unsure" counts as an answer, not as a yes). These images are
  what ``evaluate --export --drop-object-present`` leaves out.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .._runtime import warn
from .ratings import Rating

__all__ = ["SCORES", "RatingSummary", "summarize_ratings", "ordinal_alpha", "object_seen"]

SCORES = (1, 2, 3, 4, 5)


@dataclass(frozen=True)
class RatingSummary:
    """The study's answers on one class and source's images.

    Attributes:
        images_rated: Images with at least one naturalness score.
        ratings: Naturalness scores given, over all raters and images.
        raters: Raters who scored at least one of these images.
        counts: How many scores were 1, 2, 3, 4 and 5.
        alpha: Krippendorff's alpha (ordinal) of the naturalness scores, or ``None`` when undefined.
        object_answers: Images with at least one object answer.
        object_seen: Hashes of the images whose majority object answer is "yes".
    """

    images_rated: int
    ratings: int
    raters: int
    counts: tuple[int, ...]
    alpha: float | None
    object_answers: int
    object_seen: frozenset[str]

    @property
    def distribution(self) -> tuple[float, ...]:
        """Fraction of scores that were 1..5 (zeros when nothing was scored)."""
        return tuple(c / self.ratings if self.ratings else 0.0 for c in self.counts)

    @property
    def mean(self) -> float | None:
        return sum(s * c for s, c in zip(SCORES, self.counts)) / self.ratings if self.ratings else None

    @property
    def object_present_rate(self) -> float | None:
        return len(self.object_seen) / self.object_answers if self.object_answers else None

    def record(self) -> dict[str, Any]:
        """The summary as evaluation.json stores it."""
        return {"images_rated": self.images_rated, "ratings": self.ratings, "raters": self.raters,
                "naturalness_counts": dict(zip(map(str, SCORES), self.counts)),
                "naturalness_distribution": dict(zip(map(str, SCORES), self.distribution)),
                "naturalness_mean": self.mean, "krippendorff_alpha_ordinal": self.alpha,
                "object_answers": self.object_answers, "object_present_images": len(self.object_seen),
                "object_present_rate": self.object_present_rate}


def ordinal_alpha(matrix: np.ndarray) -> float | None:
    """Krippendorff's alpha, ordinal level, of a raters x units matrix with NaN for missing answers.

    ``None`` when it is undefined (no unit scored twice, or a single distinct score) or the ``krippendorff``
    package is missing.
    """
    try:
        import krippendorff
    except ImportError:
        warn("inter-rater agreement needs the krippendorff package; install it with: pip install 'spurgen[rate]'")
        return None
    pairable = (np.sum(~np.isnan(matrix), axis=0) >= 2).any()
    if not pairable or len(np.unique(matrix[~np.isnan(matrix)])) < 2:
        return None
    return float(krippendorff.alpha(reliability_data=matrix, level_of_measurement="ordinal",
                                     value_domain=list(SCORES)))


def object_seen(ratings: Sequence[Rating]) -> frozenset[str]:
    """Hashes of the images whose object answers are more than half "yes"."""
    answers: dict[str, list[str]] = {}
    for r in ratings:
        if r.object_present is not None:
            answers.setdefault(r.sha256, []).append(r.object_present)
    return frozenset(h for h, given in answers.items() if 2 * given.count("yes") > len(given))


def summarize_ratings(hashes: Sequence[str], ratings: Sequence[Rating]) -> RatingSummary | None:
    """The summary of the ratings of these images (by content hash); ``None`` when none of them was rated."""
    wanted = set(hashes)
    mine = [r for r in ratings if r.sha256 in wanted]
    if not mine:
        return None
    scored = [r for r in mine if r.naturalness is not None]
    raters = sorted({r.rater for r in scored})
    units = sorted({r.sha256 for r in scored})
    matrix = np.full((len(raters), len(units)), np.nan)
    for r in scored:
        matrix[raters.index(r.rater), units.index(r.sha256)] = r.naturalness
    counts = Counter(r.naturalness for r in scored)
    return RatingSummary(images_rated=len(units), ratings=len(scored), raters=len(raters),
                         counts=tuple(counts[s] for s in SCORES), alpha=ordinal_alpha(matrix),
                         object_answers=len({r.sha256 for r in mine if r.object_present is not None}),
                         object_seen=object_seen(mine))
