"""What finetune does with each class, decided and checked before anything is trained or written.

A class is trained from scratch, resumed from its latest checkpoint, or skipped when its run is complete. A
checkpoint resumes only under the same resume key: a hash of every setting that shapes the training trajectory.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._base_model import BaseModel
from .._runtime import warn
from ..config import FINETUNE_PRESETS, FinetuneConfig
from ..errors import SpurgenError
from ..images import file_sha256
from ..labels import ClassInfo, LabelSet
from ..workspace import SELECTION_FILE, TRAINING_FILE, Workspace, list_checkpoints, read_json

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["ClassPlan", "plan_classes", "list_checkpoints", "latest_checkpoint", "resume_key"]

# Settings a resumed run may change: they do not alter what the steps already taken would have been. (The
# resolved kappa and the base model's fingerprint enter the resume key instead of the settings they come from.
# Like gradient checkpointing, compilation and the memory format change the float rounding only.)
_RESUMABLE = {"classes", "steps", "resume", "overwrite", "run_name", "checkpointing_steps", "checkpoints_total_limit",
              "validation_steps", "num_validation_images", "validation_prompt", "validation_classifiers", "keep_best",
              "tensorboard", "report_to", "sample_batch_size",
              "gradient_checkpointing", "device", "class_sfsl_weight", "sfsl_weight", "model", "compile",
              "compile_mode", "channels_last"}

# Switches whose off form is not --no-NAME.
_SWITCHES = {"lora": ("--lora", "--full")}


@dataclass
class ClassPlan:
    """One class's run, resolved from the settings.

    Args:
        cls: The class.
        run: The run's folder name (the preset unless ``--run-name``).
        folder: ``models/<class>/<run>/``.
        noun, instance_prompt, class_prompt, validation_prompt: The prompts, filled in for this class.
        references: The reference image files (instance images).
        sfsl_weight: kappa for this class; 0 means SFSL is not computed at all.
        action: ``train`` (from scratch), ``resume`` (from ``checkpoint``) or ``skip`` (already complete).
        checkpoint: The checkpoint a resumed run starts from.
    """

    cls: ClassInfo
    run: str
    folder: Path
    noun: str
    instance_prompt: str
    class_prompt: str
    validation_prompt: str
    references: list[Path]
    sfsl_weight: float
    action: str = "train"
    checkpoint: Path | None = None


def _references(workspace: Workspace, cls: ClassInfo) -> list[Path]:
    """The reference images that select-refs chose for a class."""
    folder = workspace.refs_dir(cls)
    hint = f"run spurgen select-refs --classes {cls.index} first"
    if not (folder / SELECTION_FILE).is_file():
        raise SpurgenError(f"no reference images for {cls}: {folder / SELECTION_FILE} is missing; {hint}")
    names = read_json(folder / SELECTION_FILE).get("selected") or []
    if not names:
        raise SpurgenError(f"no reference images for {cls}: select-refs selected none; {hint} with other images or "
                           "classifiers")
    files = [folder / name for name in names]
    for path in files:
        if not path.is_file():
            raise SpurgenError(f"reference image {path} is missing; {hint} again")
    return files


def _class_weights(config: FinetuneConfig, labels: LabelSet) -> dict[int, float]:
    """The per-class kappa table, its keys (names, indices, WordNet ids) resolved to class indices."""
    weights = {}
    for key, kappa in config.class_sfsl_weight.items():
        try:
            weights[labels.resolve(key).index] = kappa
        except SpurgenError as exc:
            raise SpurgenError(f"class-sfsl-weight: {exc}") from None
    return weights


def latest_checkpoint(folder: Path) -> Path | None:
    return (list_checkpoints(folder) or [None])[-1]


def _as_flag(name: str, value: Any) -> str:
    """A setting as the command-line flag that gives it: ``--rank 8``, ``--full``, ``--no-prior-preservation``."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        on, off = _SWITCHES.get(name, (f"--{flag}", f"--no-{flag}"))
        return on if value else off
    return f"--{flag} {value if isinstance(value, str) else json.dumps(value)}"


def _differing_settings(config: FinetuneConfig, kappa: float, run: dict[str, Any]) -> list[str]:
    """``X in the run, Y requested`` (as flags) for each setting that shapes training and differs from a run's record.

    Args:
        config: The requested settings.
        kappa: The class's requested kappa (0 without SFSL).
        run: The run's training.json; settings it lacks (an older spurgen's) are not compared.
    """
    # As training.json stores them: JSON values, and the text encoder setting resolved from the preset.
    requested = {**json.loads(json.dumps(asdict(config), default=str)),
                 "train_text_encoder": config.trains_text_encoder}
    recorded = run.get("settings") or {}
    differing = [f"{_as_flag(name, recorded[name])} in the run, {_as_flag(name, value)} requested"
                 for name, value in requested.items()
                 if name not in _RESUMABLE and name in recorded and recorded[name] != value]
    # kappa is per class (--sfsl-weight or [finetune.class-sfsl-weight]): the record's resolved value counts.
    trained_kappa = (run.get("sfsl") or {}).get("weight", 0.0)
    if "sfsl" in run and trained_kappa != kappa:
        differing.append(f"kappa {trained_kappa:g} in the run, {kappa:g} requested (--sfsl-weight)")
    return differing


def _action(config: FinetuneConfig, folder: Path, kappa: float) -> tuple[str, Path | None]:
    """Whether a class is trained from scratch, resumed or skipped, from what its folder holds.

    Args:
        config: The requested settings.
        folder: The class's run folder.
        kappa: The class's requested kappa.

    Raises:
        SpurgenError: the folder holds a complete run with other settings, or an unfinished one, and neither
            --overwrite nor (for an unfinished run) --resume says what to do with it.
    """
    status = read_json(folder / TRAINING_FILE) if (folder / TRAINING_FILE).is_file() else {}
    checkpoint = latest_checkpoint(folder)
    if config.overwrite:
        return "train", None
    if status.get("status") == "complete":
        # Skipping it would hand over a model of other settings (a LoRA for --full) as if it were the one asked for.
        differing = _differing_settings(config, kappa, status)
        if differing:
            raise SpurgenError(f"{folder} holds a complete run with other settings ({'; '.join(differing)}); pass "
                               "--run-name NAME to train a new run beside it, or --overwrite to replace it")
        if not config.resume or status.get("steps", 0) >= config.steps:
            return "skip", None
        if checkpoint is None:
            raise SpurgenError(f"{folder} is complete at {status.get('steps')} steps but has no checkpoint to "
                               "continue from; pass --overwrite to train it again")
        return "resume", checkpoint
    if config.resume:
        if checkpoint is None:
            warn(f"{folder} has no checkpoint to resume from; training from scratch")
        return ("resume", checkpoint) if checkpoint else ("train", None)
    if checkpoint is not None:
        raise SpurgenError(f"{folder} holds an unfinished run ({checkpoint.name}); pass --resume to continue it "
                           "or --overwrite to start over")
    return "train", None


def plan_classes(config: FinetuneConfig, workspace: Workspace, labels: LabelSet) -> list[ClassPlan]:
    """Resolves classes, references, prompts, kappa and what to do with each class's folder.

    Raises:
        SpurgenError: missing references, an unknown class in the kappa table, equal prompts, or a folder
            holding an unfinished run without --resume/--overwrite.
    """
    overrides = _class_weights(config, labels)
    sfsl_on = FINETUNE_PRESETS[config.preset]["sfsl"]
    plans = []
    for cls in labels.resolve_many(config.classes):
        noun = config.noun or cls.spurious_feature or cls.name
        prompts = {"identifier": config.identifier, "noun": noun}
        plan = ClassPlan(cls=cls, run=config.run, folder=workspace.model_dir(cls, config.run), noun=noun,
                         instance_prompt=config.instance_prompt.format(**prompts),
                         class_prompt=config.class_prompt.format(**prompts),
                         validation_prompt=(config.validation_prompt or config.instance_prompt).format(**prompts),
                         references=_references(workspace, cls),
                         sfsl_weight=overrides.get(cls.index, config.sfsl_weight) if sfsl_on else 0.0)
        if config.prior_preservation and plan.instance_prompt == plan.class_prompt:
            raise SpurgenError(f"instance and class prompts are both '{plan.instance_prompt}'; the instance prompt "
                               "needs the {identifier} token to tell the references apart")
        plan.action, plan.checkpoint = _action(config, plan.folder, plan.sfsl_weight)
        plans.append(plan)
    return plans


def resume_key(config: FinetuneConfig, plan: ClassPlan, base: BaseModel, resolution: int,
               accelerator: "Accelerator") -> str:
    """A hash of everything that shapes the training trajectory; a checkpoint resumes only under the same key."""
    settings = {k: v for k, v in asdict(config).items() if k not in _RESUMABLE}
    payload = {"settings": settings, "kappa": plan.sfsl_weight, "prompts": [plan.instance_prompt, plan.class_prompt],
               "references": [file_sha256(p) for p in plan.references], "base": base.fingerprint,
               "resolution": resolution, "processes": accelerator.num_processes,
               "mixed_precision": accelerator.mixed_precision}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
