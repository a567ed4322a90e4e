"""Stage 1, ``spurgen select-refs``: pick each class's reference images.

An image of class k's spurious set is *consistently spurious* when every classifier's top-1
prediction is k. Those images are ranked by their weakest vote — the lowest of the classifiers'
probabilities for k — and the top ``k`` are copied to ``refs/<index>-<name>/`` with
``selection.json``, which records every scanned image's predictions and why it was or was not kept.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ._runtime import console, distributed_state, warn
from .classifiers import classifier_records, load_classifiers, protocol_crop
from .config import SelectRefsConfig
from .images import class_image_files, file_sha256
from .labels import ClassInfo, get_label_set
from .predict import PredictionCache, Predictions, consistency, predict_files
from .workspace import (
    SELECTION_FILE,
    Workspace,
    atomic_directory,
    atomic_write_json,
    environment_versions,
    holds_json,
    utc_now,
)

__all__ = ["ClassSelection", "select_refs", "print_selection_table"]

@dataclass
class ClassSelection:
    """The outcome of select-refs for one class."""

    cls: ClassInfo
    scanned: int
    unreadable: int
    spurious_per_classifier: dict[str, int]
    consistent: int
    selected: list[Path] = field(default_factory=list)
    folder: Path | None = None

    @property
    def ok(self) -> bool:
        return bool(self.selected)


def _rank_class(
    cls: ClassInfo, files: list[Path], predictions: Predictions, k: int
) -> tuple[ClassSelection, list[dict[str, Any]]]:
    """Ranks one class's images; returns the selection and the per-image manifest entries."""
    readable = [f for f in files if f not in predictions.unreadable]
    rows = predictions.rows(readable)
    top1, prob, consistent = consistency(predictions, rows, cls.index)
    weakest = prob.min(axis=0)
    # Highest weakest vote first; file name breaks ties so the order never depends on the file system.
    chosen = sorted(np.flatnonzero(consistent), key=lambda i: (-weakest[i], readable[i].name))[:k]
    rank = {int(i): r + 1 for r, i in enumerate(chosen)}
    names = list(predictions.logits)
    selection = ClassSelection(
        cls=cls,
        scanned=len(files),
        unreadable=len(files) - len(readable),
        spurious_per_classifier={n: int((top1[c] == cls.index).sum()) for c, n in enumerate(names)},
        consistent=int(consistent.sum()),
        selected=[readable[i] for i in chosen],
    )
    images = [
        {
            "file": str(path),
            "sha256": predictions.hashes[rows[i]],
            "consistently_spurious": bool(consistent[i]),
            "weakest_probability": float(weakest[i]),
            "selected": i in rank,
            "rank": rank.get(i),
            "predictions": {
                n: {"top1": int(top1[c, i]), "probability": float(prob[c, i])} for c, n in enumerate(names)
            },
        }
        for i, path in enumerate(readable)
    ]
    return selection, images


def _write_refs(selection: ClassSelection, images: list[dict[str, Any]], unreadable: dict[Path, str],
                workspace: Workspace, manifest_base: dict[str, Any]) -> None:
    """Replaces ``refs/<class>/`` with copies of the selected images and ``selection.json``, unless it already
    holds this very selection (a re-run, e.g. after an interruption): finished references are not redone."""
    cls = selection.cls
    target = workspace.refs_dir(cls)
    copied: dict[Path, str] = {}
    for source in selection.selected:
        # Two component folders may hold the same file name; prefix the folder to keep both.
        copied[source] = source.name if source.name not in copied.values() else f"{source.parent.name}_{source.name}"
    for entry in images:
        entry["copied_as"] = copied.get(Path(entry["file"]))
    manifest = {
        **manifest_base,
        "class": {"index": cls.index, "name": cls.name, "synset": cls.synset, "spurious_feature": cls.spurious_feature},
        "summary": {"scanned": selection.scanned, "unreadable": selection.unreadable,
                    "spurious_per_classifier": selection.spurious_per_classifier,
                    "consistently_spurious": selection.consistent, "selected": len(selection.selected)},
        "selected": [copied[p] for p in selection.selected],
        "images": images,
        "unreadable": [{"file": str(f), "reason": reason} for f, reason in unreadable.items()],
    }
    # How many predictions a run computed depends on the cache, not on what it selects.
    kept = holds_json(target / SELECTION_FILE, manifest, ("created", "computed_predictions")) and all(
        (target / name).is_file() and file_sha256(target / name) == entry["sha256"]
        for entry in images if (name := entry["copied_as"]))
    if not kept:
        with atomic_directory(target) as staging:
            for source, name in copied.items():
                shutil.copyfile(source, staging / name)
            atomic_write_json(staging / SELECTION_FILE, manifest)
    selection.selected = [target / copied[p] for p in selection.selected]
    selection.folder = target


def select_refs(
    config: SelectRefsConfig, workspace: Workspace, classifier_flags: Sequence[str] = ()
) -> list[ClassSelection]:
    """Runs select-refs for every class of ``config`` and writes ``refs/<class>/``.

    Args:
        config: Resolved settings.
        workspace: Where references, manifests and the prediction cache go.
        classifier_flags: ``--classifier NAME=ARCH[@PATH]`` values.

    Raises:
        SpurgenError: bad input; nothing in the workspace is changed then.
    """
    settings = workspace.settings()
    labels = get_label_set(config.labels)
    classes = labels.resolve_many(config.classes)
    files = class_image_files(classes, config.dataset, config.images)
    workspace.ensure_writable(*(workspace.refs_dir(c) for c in classes), workspace.cache_dir())
    classifiers = load_classifiers(
        config.classifiers,
        classifier_flags,
        labels,
        settings,
        protocol_crop(config.protocol, config.crop),
        config.device,
    )
    # Each class's images are classified in batches of their own: a logit depends on its batch's other images in
    # the last float digits (batched kernels), and that decides between references of near-equal scores. So a
    # class gets the references that `spurgen run`, which selects one class at a time, gets for it, and the same
    # fine-tuned model.
    cache = PredictionCache(workspace.cache_dir("predictions"))
    predictions = {
        c.index: predict_files(
            files[c.index], classifiers, cache=cache, batch_size=config.batch_size, num_workers=config.num_workers
        )
        for c in classes
    }
    for path, reason in ((p, r) for found in predictions.values() for p, r in found.unreadable.items()):
        warn(f"skipped unreadable image {path}: {reason}")
    state = distributed_state()
    manifest_base = {
        "stage": "select-refs",
        "created": utc_now(),
        "versions": environment_versions(),
        "settings": {**vars(config), "classes": [c.index for c in classes]},
        "source": {"dataset": config.dataset, "images": config.images},
        "classifiers": classifier_records(classifiers),
        "computed_predictions": {
            c.name: sum(p.computed.get(c.name, 0) for p in predictions.values()) for c in classifiers
        },
        "processes": state.num_processes,
    }
    results = []
    for cls in classes:
        found = predictions[cls.index]
        selection, images = _rank_class(cls, files[cls.index], found, config.k)
        if state.is_main_process:  # under `accelerate launch`, one process writes
            unreadable = {f: found.unreadable[f] for f in files[cls.index] if f in found.unreadable}
            _write_refs(selection, images, unreadable, workspace, manifest_base)
        results.append(selection)
    for result in results:
        if not result.ok:
            warn(
                f"{result.cls}: no image is predicted as the class by every classifier; nothing selected "
                "(try fewer --classifiers or another image folder)"
            )
        elif len(result.selected) < config.k:
            warn(
                f"{result.cls}: only {len(result.selected)} of {config.k} images are consistently spurious; selected "
                "those"
            )
    return results


def print_selection_table(results: Sequence[ClassSelection], classifiers: Sequence[str]) -> None:
    """The per-class summary table of select-refs."""
    from rich.table import Table

    table = Table(title="select-refs", show_lines=False)
    table.add_column("class")
    table.add_column("scanned", justify="right")
    for name in classifiers:
        table.add_column(f"spurious\n{name}", justify="right")
    table.add_column("consistent", justify="right")
    table.add_column("selected", justify="right")
    for r in results:
        style = "" if r.ok else "red"
        table.add_row(str(r.cls), f"{r.scanned}" + (f" ({r.unreadable} unreadable)" if r.unreadable else ""),
                      *(str(r.spurious_per_classifier[n]) for n in classifiers), str(r.consistent),
                      str(len(r.selected)), style=style)
    console.print(table)
