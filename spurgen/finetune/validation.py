"""Validation during finetune: images of the validation prompt, the metric that scores them, and ``--keep-best``.

At each validation step (every ``--validation-steps`` and after the last step) the model draws
``--num-validation-images`` images with fixed seeds into ``validation/step-N/``. The classifiers that score them
(the SFSL model of a run with SFSL, and ``--validation-classifiers``) give two numbers, the measures of
``spurgen evaluate`` on these images: each classifier's *spurious accuracy* (the fraction whose top-1 is the
class) and the *consistent rate* (the fraction that every classifier predicts as the class). They join the
step's row of the log (``val_consistent_rate``, ``val_spurious_accuracy_<classifier>``), so ``losses.csv``,
checkpoints (hence resumed runs) and ``training.json`` keep them, and go to the trackers.

``--keep-best`` ships the weights of the validation step with the highest consistent rate, the later step on a
tie (so without any gain it ships the last step's). Validation and checkpoints have their own schedules, so the
best weights are not taken from checkpoints (which rotate away): whenever a validation step ties or beats every
earlier one, the weights are saved into ``best/`` with ``best.json`` naming the step.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .._runtime import warn
from ..predict import Predictions, consistency
from ..workspace import atomic_write_bytes, atomic_write_json, read_json, remove_tree
from .trackers import log_validation

if TYPE_CHECKING:
    from PIL import Image

    from ..classifiers import Classifier
    from .trainer import Trainer

__all__ = ["Validation", "score_images", "metric_records", "best_record", "validation_file", "BEST", "BEST_FILE",
           "CONSISTENT", "ACCURACY"]

# The log's columns of the metric: the consistent rate, and each classifier's spurious accuracy (prefix + name).
CONSISTENT = "val_consistent_rate"
ACCURACY = "val_spurious_accuracy_"
# --keep-best's folder in the run's folder, and its record of the step it holds.
BEST = "best"
BEST_FILE = "best.json"


def validation_file(step: int, index: int) -> str:
    """A validation image's path inside the run's folder (relative, so that the card's links work anywhere)."""
    return f"validation/step-{step:06d}/{index:02d}.png"


@torch.no_grad()
def score_images(images: Sequence["Image.Image"], classifiers: Sequence["Classifier"],
                 class_index: int) -> dict[str, float]:
    """The metric of images as log columns: each classifier's spurious accuracy and the consistent rate.

    Args:
        images: The validation images.
        classifiers: The classifiers that score them (each on its device, with its own preprocessing).
        class_index: The class the images should be predicted as.
    """
    logits = {}
    for classifier in classifiers:
        transform = classifier.transform()
        batch = torch.stack([transform(image) for image in images]).to(classifier.device)
        logits[classifier.name] = classifier.logits(batch).float().cpu().numpy()
    top1, _, consistent = consistency(Predictions(files=[], hashes=[], logits=logits), list(range(len(images))),
                                      class_index)
    accuracy = {ACCURACY + name: float((row == class_index).mean()) for name, row in zip(logits, top1)}
    return {**accuracy, CONSISTENT: float(consistent.mean())}


def metric_records(log: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The metric of each scored validation step, from the log rows that carry it, for ``training.json``."""
    return [{"step": row["step"], "consistent_rate": row[CONSISTENT],
             "spurious_accuracy": {name[len(ACCURACY):]: value for name, value in row.items()
                                   if name.startswith(ACCURACY)}}
            for row in log if row.get(CONSISTENT) is not None]


def best_record(log: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The scored validation step with the highest consistent rate, the later one on a tie; ``None`` before any."""
    records = metric_records(log)
    return max(records, key=lambda record: (record["consistent_rate"], record["step"])) if records else None


class Validation:
    """One class run's validation steps, on the main process: images, metric, trackers and ``best/``.

    Args:
        trainer: The class's trainer.
        classifiers: The classifiers that score the images; none: images without a metric.
    """

    def __init__(self, trainer: "Trainer", classifiers: Sequence["Classifier"]) -> None:
        self.trainer, self.classifiers = trainer, list(classifiers)
        self.folder = trainer.plan.folder
        self.count = trainer.config.num_validation_images

    def run(self, step: int, log: list[dict[str, Any]]) -> None:
        """Draws, saves, scores and logs the validation images of ``step``; with ``--keep-best``, saves the
        weights into ``best/`` when the step is now the best.

        Args:
            step: The optimizer steps taken; the log's last row is this step's (it has been read).
            log: The run's log; the step's row gets the metric.
        """
        if not self.count:
            return
        images = self.trainer.validation_images(self.count)
        for i, image in enumerate(images):
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            atomic_write_bytes(self.folder / validation_file(step, i), buffer.getvalue())
        metric = score_images(images, self.classifiers, self.trainer.plan.cls.index) if self.classifiers else {}
        log[-1].update(metric)
        log_validation(self.trainer.accelerator, step, images, metric)
        best = best_record(log)
        if self.trainer.config.keep_best and best is not None and best["step"] == step:
            self._save_best(step, best["consistent_rate"])

    def _save_best(self, step: int, rate: float) -> None:
        """Replaces ``best/`` with the current weights, staged and renamed: a crash leaves the old or the new."""
        final, staging = self.folder / BEST, self.folder / f".{BEST}.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        self.trainer.save_model(staging)
        atomic_write_json(staging / BEST_FILE, {"step": step, "consistent_rate": rate})
        remove_tree(final)
        os.replace(staging, final)

    def best_weights(self, log: Sequence[dict[str, Any]], step: int) -> tuple[int, Path | None]:
        """The step whose weights ``--keep-best`` ships, and the folder that holds them (``None``: the trainer's
        weights as they are now, those of ``step``).

        Args:
            log: The run's log, scored up to the last step.
            step: The last step.
        """
        best = best_record(log) if self.trainer.config.keep_best else None
        if best is None or best["step"] == step:
            return step, None
        saved = self.folder / BEST / BEST_FILE
        if saved.is_file() and read_json(saved).get("step") == best["step"]:
            return best["step"], self.folder / BEST
        # Only after a resume from a checkpoint older than the best's save, which a later trajectory overwrote.
        warn(f"{self.trainer.plan.cls}: --keep-best chose step {best['step']}, but {self.folder / BEST} does not "
             f"hold its weights; the last step's are kept")
        return step, None
