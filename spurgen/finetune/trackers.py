"""Experiment trackers of finetune (``--report-to``, ``--tensorboard``), through accelerate's trackers.

The command's accelerator is made with the trackers (``log_with``); each class's run is one tracker run: named
``<class>/<run>`` in the project ``spurgen`` (TensorBoard and Aim keep their files in ``models/<class>/<run>/logs/``),
with the settings as hyperparameters, every column of ``losses.csv`` at its step, and at each validation step
the validation metric and images. Only the main process logs (accelerate's trackers live there).
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, Sequence

from ..config import TRACKERS, FinetuneConfig
from ..errors import SpurgenError
from .plan import ClassPlan

if TYPE_CHECKING:
    from accelerate import Accelerator
    from PIL import Image

__all__ = ["resolve_trackers", "start_trackers", "log_rows", "log_validation", "finish_trackers", "PROJECT", "LOGS"]

PROJECT = "spurgen"
# The run's folder of local trackers' files (TensorBoard's events under logs/spurgen/).
LOGS = "logs"


def resolve_trackers(names: Sequence[str]) -> list[str]:
    """The trackers to start: ``names`` as given, or for ``all`` every supported tracker that is installed.

    Args:
        names: :attr:`FinetuneConfig.trackers`.

    Raises:
        SpurgenError: a named tracker's package is not installed, or ``all`` finds none.
    """
    installed = [name for name in TRACKERS if importlib.util.find_spec(name) is not None]
    if "all" in names:
        if not installed:
            raise SpurgenError("--report-to all found no tracker installed; pip install tensorboard (or 'spurgen"
                               "[tensorboard]'), or wandb, mlflow, comet_ml, aim")
        return installed
    for name in names:
        if name not in installed:
            extra = " (or 'spurgen[tensorboard]')" if name == "tensorboard" else ""
            raise SpurgenError(f"tracker {name} (--report-to, --tensorboard) needs {name}, which is not installed; "
                               f"pip install {name}{extra}, or leave it out")
    return list(names)


def _hyperparameters(plan: ClassPlan, config: FinetuneConfig) -> dict[str, bool | int | float | str]:
    """Every setting and the class's resolved run, as the scalars and strings that every tracker accepts."""
    values = {**asdict(config), "run": plan.run, "class": str(plan.cls), "kappa": plan.sfsl_weight,
              "instance_prompt": plan.instance_prompt, "class_prompt": plan.class_prompt,
              "validation_prompt": plan.validation_prompt, "train_text_encoder": config.trains_text_encoder}
    return {name: value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
            for name, value in values.items()}


def start_trackers(accelerator: "Accelerator", plan: ClassPlan, config: FinetuneConfig) -> None:
    """Starts the trackers' run of one class (nothing without trackers, and nothing on other processes).

    Args:
        accelerator: The command's accelerator, made with the trackers.
        plan: The class's run: its folder holds the local logs, its names name the tracker run.
        config: The settings, logged as hyperparameters.
    """
    if not accelerator.log_with:
        return
    # The accelerator is shared by the classes; its logging folder is this class's run's.
    logs = plan.folder / LOGS
    logs.mkdir(parents=True, exist_ok=True)
    accelerator.project_configuration.logging_dir = str(logs)
    label = f"{plan.cls.dirname}/{plan.run}"
    accelerator.init_trackers(PROJECT, config=_hyperparameters(plan, config),
                              init_kwargs={"wandb": {"name": label, "dir": str(logs)}, "mlflow": {"run_name": label},
                                           "aim": {"experiment": label}})


def log_rows(accelerator: "Accelerator", rows: Sequence[dict[str, Any]]) -> None:
    """Logs each step's row of ``losses.csv`` (loss terms, SFSL by t, gradient diagnostics, lr) at its step."""
    if not accelerator.trackers:
        return
    for row in rows:
        accelerator.log({name: value for name, value in row.items() if name != "step" and value is not None},
                        step=row["step"])


def log_validation(accelerator: "Accelerator", step: int, images: Sequence["Image.Image"],
                   metric: dict[str, float]) -> None:
    """Logs a validation step's metric, and its images to the trackers that accelerate gives images to.

    Args:
        accelerator: The command's accelerator.
        step: The optimizer step.
        images: The validation images.
        metric: The metric's columns (empty without classifiers to score the images).
    """
    import numpy as np

    if not accelerator.trackers:
        return
    if metric:
        accelerator.log(metric, step=step)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"validation": np.stack([np.asarray(image) for image in images])}, step,
                               dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({"validation": list(images)}, step)
        elif tracker.name == "aim":  # one image per name
            tracker.log_images({f"validation/{i:02d}": image for i, image in enumerate(images)}, step)


def finish_trackers(accelerator: "Accelerator") -> None:
    """Ends the class's tracker run: accelerate's ``end_training`` without ending the process group, which the
    next class still needs."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()
