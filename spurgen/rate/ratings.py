"""The raters' answers: one file per rater in ``ratings/``, written by the server, read by evaluate and --export."""

from __future__ import annotations

import csv
import dataclasses
import io
import re
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SpurgenError
from ..workspace import Workspace, atomic_write_json, atomic_write_text, read_json, safe_name, utc_now
from .study import StudyImage

__all__ = ["OBJECT_ANSWERS", "Rating", "RatingsStore", "ratings_dir", "sanitize_rater", "load_ratings",
           "export_ratings_csv"]

OBJECT_ANSWERS = ("yes", "no", "unsure")
RATINGS_FORMAT = 1
_MAX_RATER_LENGTH = 40


@dataclass(frozen=True)
class Rating:
    """One rater's answers for one image, as evaluate and the CSV export see them.

    Attributes:
        rater: The sanitised rater name (also the ratings file's name).
        sha256: Content hash of the image file, the key to join with predictions and manifests.
        path: Where the image was: relative to the workspace for references and generated images,
            relative to the ``--dataset`` folder for data set images.
        source: ``"reference"``, ``"dataset"`` or ``"generated"``.
        class_index: The class the image belongs to.
        class_name: Its display name.
        run: The generation run of a generated image, else ``None``.
        naturalness: 1 (very unnatural) to 5 (very natural), ``None`` while unanswered.
        object_present: ``"yes"``, ``"no"`` or ``"unsure"``, ``None`` while unanswered.
        timestamp: When this answer last changed (UTC, ISO 8601).
    """

    rater: str
    sha256: str
    path: str
    source: str
    class_index: int
    class_name: str
    run: str | None
    naturalness: int | None
    object_present: str | None
    timestamp: str


def sanitize_rater(name: str) -> str:
    """A rater's typed name as a file-safe, case-folded name: ``"José Müller"`` -> ``"jose-muller"``.

    Case is folded so that "Alice" and "alice" are one rater on every file system.

    Raises:
        SpurgenError: nothing usable is left (no ASCII letter or digit).
    """
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode("ascii").lower()
    slug = re.sub(r"[^a-z0-9_]+", "-", ascii_name).strip("-_")[:_MAX_RATER_LENGTH].rstrip("-_")
    if not slug:
        raise SpurgenError(f"rater name {name!r} has no letter or digit; type a name such as 'alice'")
    return safe_name(slug, "rater name")


def ratings_dir(workspace: Workspace) -> Path:
    """The folder of the workspace's answer files."""
    return workspace.root / "ratings"


class RatingsStore:
    """The per-rater answer files ``ratings/<rater>.json`` of one workspace, safe for a threaded server.

    A file holds ``{"format": 1, "rater": ..., "answers": {sha256: {path, source, class_index, class_name,
    run, naturalness, object_present, timestamp}}}``. Each answer records where its image was, so the
    answers can be read without rebuilding the study.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def file(self, rater: str) -> Path:
        return self.folder / f"{rater}.json"

    def answers(self, rater: str) -> dict[str, dict[str, Any]]:
        """The rater's answers by image hash (empty for a new rater)."""
        path = self.file(rater)
        return _read_ratings_file(path)["answers"] if path.is_file() else {}

    def record(self, rater: str, image: StudyImage, naturalness: int | None = None,
               object_present: str | None = None) -> dict[str, Any]:
        """Sets the given answers of one image (the other one is kept) and rewrites the rater's file.

        The lock makes one rater's overlapping requests (two quick clicks, two tabs) a read-modify-write
        each in turn, so neither answer is lost; the atomic replace means a reader never sees half a file.
        """
        with self._lock(rater):
            answers = self.answers(rater)
            entry = answers.get(image.sha256, {"naturalness": None, "object_present": None})
            entry.update(path=image.path, source=image.source, class_index=image.cls.index,
                         class_name=image.cls.name, run=image.run, timestamp=utc_now())
            if naturalness is not None:
                entry["naturalness"] = naturalness
            if object_present is not None:
                entry["object_present"] = object_present
            answers[image.sha256] = entry
            atomic_write_json(self.file(rater), {"format": RATINGS_FORMAT, "rater": rater, "answers": answers})
            return entry

    def _lock(self, rater: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(rater, threading.Lock())


def _read_ratings_file(path: Path) -> dict[str, Any]:
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != RATINGS_FORMAT or not isinstance(data.get("answers"), dict):
        raise SpurgenError(f"{path} is not a spurgen ratings file (format {RATINGS_FORMAT}); move it out of ratings/")
    return data


def load_ratings(workspace: Workspace) -> list[Rating]:
    """Every rater's answers in the workspace, by rater then image hash; empty when nobody has rated.

    Partly answered images are included with ``None`` for the open question.

    Raises:
        SpurgenError: a file in ``ratings/`` is unreadable or not a ratings file.
    """
    folder = ratings_dir(workspace)
    ratings = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        if path.name.startswith("."):
            continue
        data = _read_ratings_file(path)
        try:
            ratings += [Rating(rater=data["rater"], sha256=sha, path=a["path"], source=a["source"],
                               class_index=int(a["class_index"]), class_name=a["class_name"], run=a["run"],
                               naturalness=a["naturalness"], object_present=a["object_present"],
                               timestamp=a["timestamp"])
                        for sha, a in sorted(data["answers"].items())]
        except (KeyError, TypeError, ValueError):
            raise SpurgenError(f"{path} has a malformed answer; restore it or move it out of ratings/") from None
    return ratings


def export_ratings_csv(workspace: Workspace, target: Path | None = None) -> tuple[Path, int]:
    """Writes every rating as one CSV row (the :class:`Rating` fields as columns; empty for ``None``).

    Args:
        workspace: Whose ``ratings/`` to export.
        target: The CSV file; default ``reports/ratings.csv`` in the workspace.

    Returns:
        The file written and its number of rows.

    Raises:
        SpurgenError: no ratings yet.
    """
    ratings = load_ratings(workspace)
    if not ratings:
        raise SpurgenError(f"no ratings in {ratings_dir(workspace)}; run 'spurgen rate' and rate some images first")
    target = target or workspace.reports_dir / "ratings.csv"
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(field.name for field in dataclasses.fields(Rating))
    for rating in ratings:
        writer.writerow("" if value is None else value for value in dataclasses.astuple(rating))
    atomic_write_text(target, buffer.getvalue())
    return target, len(ratings)
