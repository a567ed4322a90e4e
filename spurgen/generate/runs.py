"""What one run of ``spurgen generate`` is: the model to load, the settings that decide its images, and its folder.

A :class:`ModelPlan` is resolved and checked for every class and run before any model loads; a :class:`RunState`
tracks one run folder's images and writes its ``generation.json``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .._base_model import _HUB_ID, BaseModel, resolve_base_model
from .._file_hashes import FileHashes
from .._lora import LORA_WEIGHTS_NAME
from ..config import GenerateConfig
from ..errors import SpurgenError
from ..images import file_sha256
from ..labels import ClassInfo
from ..workspace import (BASE_RUN, GENERATION_FILE, TRAINING_FILE, Workspace, atomic_write_json, checkpoint_dir,
                         holds_json, list_checkpoints, read_json, safe_name, utc_now)
from .filters import ImageFilters, Verdict

if TYPE_CHECKING:
    import torch

__all__ = ["image_name", "ModelPlan", "trained_schedule", "checkpoint_lora", "plan_class", "model_record",
           "run_settings", "run_fingerprint", "Until", "RunState", "check_folder"]

_IMAGE_NAME = re.compile(r"^\d{5,}\.png$")


def image_name(index: int) -> str:
    """File name of image ``index`` of a run: ``00000.png``."""
    return f"{index:05d}.png"


@dataclass(frozen=True)
class ModelPlan:
    """What to load for one class and run, resolved and checked before any sampling starts."""

    cls: ClassInfo
    run: str
    kind: str  # "base", "lora" or "full"
    pipeline: BaseModel  # the folder the family's pipeline loads: the base or a full run
    base_model: str  # as the user or training.json named it
    prompt: str
    negative_prompt: str
    resolution: int | None
    lora_file: Path | None = None  # the LoRA weights loaded onto ``pipeline``
    lora_source: str | None = None  # where they came from, as named: a run or checkpoint folder, a path, a hub id
    schedule: dict[str, Any] | None = None  # the scheduler settings the run was trained on (trained_schedule)


def _fill(template: str, cls: ClassInfo) -> str:
    # Plain replacement rather than str.format, so other braces in a prompt stay as the user wrote them.
    return template.replace("{class}", cls.name).replace("{feature}", cls.spurious_feature or cls.name)


def trained_schedule(training: dict[str, Any]) -> dict[str, Any] | None:
    """The scheduler settings a run must be sampled with, as its training.json records them: a zero-terminal-SNR
    run's rescaled betas and trailing timesteps (``noise.sampler``); ``None`` for the base model's own schedule.

    Args:
        training: The run's training.json; empty for a LoRA trained elsewhere.
    """
    return (training.get("noise") or {}).get("sampler") or None


def _base_of_training(training: dict[str, Any]) -> str:
    """The base model a run was trained on: its resolved local path when that still exists, else as given."""
    resolved = training.get("base_model_resolved")
    if resolved and Path(resolved).is_dir():
        return str(resolved)
    return str(training.get("base_model") or resolved or "")


def _lora_base(config: GenerateConfig, cls: ClassInfo, run: str, base: str, training: dict[str, Any]) -> BaseModel:
    """The base model a LoRA run was trained on; ``--model`` finds it when it has moved since training.

    Raises:
        SpurgenError: the recorded base is gone and no --model is given, or --model is another model
            (its fingerprint differs from the one training.json recorded).
    """
    try:
        return resolve_base_model(base)
    except SpurgenError as exc:
        if not config.model:
            raise SpurgenError(f"LoRA run '{run}' of {cls} needs the base model it was trained on: {exc}") from None
    moved = resolve_base_model(config.model)
    recorded = training.get("base_model_fingerprint")
    if recorded and recorded != moved.fingerprint:
        raise SpurgenError(f"--model {config.model} is not the base model LoRA run '{run}' of {cls} was trained on "
                           f"({base}; the fingerprints differ); pass that model")
    return moved


def _lora_plan(config: GenerateConfig, cls: ClassInfo, run: str, lora_file: Path, source: str,
               training: dict[str, Any], prompt: str | None) -> ModelPlan:
    """A LoRA loaded onto the base model that ``training`` (its run's training.json) names, else onto --model.

    Args:
        config: The settings (--model, --resolution, --negative-prompt).
        cls: The class.
        run: The run name of the images.
        lora_file: The weights.
        source: Where they come from, as the user knows it (a run folder, a path, a hub id).
        training: The run's training.json; empty for a LoRA trained elsewhere.
        prompt: The prompt of the images: --prompt or the run's instance prompt.

    Raises:
        SpurgenError: no prompt, or no base model known.
    """
    if not prompt:
        raise SpurgenError(f"nothing records the prompt {source} was trained with; pass --prompt, e.g. "
                           f"--prompt 'a photo of sks {cls.spurious_feature or cls.name}'")
    base = _base_of_training(training)
    if base:
        base_model = _lora_base(config, cls, run, base, training)
    elif config.model:
        base, base_model = config.model, resolve_base_model(config.model)
    else:
        raise SpurgenError(f"no base model for the LoRA {source}; pass --model, the Stable Diffusion folder or hub id "
                           "it was trained on")
    return ModelPlan(cls, run, "lora", base_model, base, prompt, _fill(config.negative_prompt, cls),
                     config.resolution or training.get("resolution"), lora_file=lora_file, lora_source=source,
                     schedule=trained_schedule(training))


def _outside_lora_file(source: str) -> Path:
    """The weights of ``--lora``: a .safetensors file, a folder holding the diffusers file, or a hub repository's.

    Raises:
        SpurgenError: nothing there, a file of another kind, or a hub id that cannot be fetched (offline too).
    """
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise SpurgenError(f"--lora {source}: {path.name} is not a .safetensors file; spurgen loads weights only "
                               "from safetensors (convert it, or give the .safetensors file)")
        return path.resolve()
    if path.is_dir():
        if not (path / LORA_WEIGHTS_NAME).is_file():
            found = sorted(p.name for p in path.glob("*.safetensors"))
            raise SpurgenError(f"--lora {source}: the folder holds no {LORA_WEIGHTS_NAME}"
                               + (f" (it has {', '.join(found)}); give the file itself" if found else
                                  "; give a LoRA .safetensors file or its folder"))
        return (path / LORA_WEIGHTS_NAME).resolve()
    if not _HUB_ID.fullmatch(source) or "/" not in source:
        raise SpurgenError(f"--lora {source}: no such file or folder, and not a hub id (ORG/NAME); check the path")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source, LORA_WEIGHTS_NAME))
    except Exception as exc:  # noqa: BLE001 - offline, unknown repository, gated, no such file, network failure
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpurgenError(f"--lora {source}: not a local file or folder, and the hub gave no {LORA_WEIGHTS_NAME} "
                           f"({first}); download it and pass its path, or check the id and the network") from None


def _outside_lora_plan(config: GenerateConfig, workspace: Workspace, cls: ClassInfo) -> ModelPlan:
    """--lora: a LoRA trained elsewhere, on --model, as run --run-name (default: the file's, folder's or repo's name).

    Raises:
        SpurgenError: a bad or reserved run name, one of a fine-tuned run of the class, or see the helpers.
    """
    source = str(config.lora)
    lora_file = _outside_lora_file(source)
    local = Path(source).expanduser()
    if local.exists():
        default = lora_file.parent.name if lora_file.name == LORA_WEIGHTS_NAME else lora_file.stem
        source = str(local.resolve())  # recorded as provenance: a relative path would say nothing later
    else:
        default = source.rsplit("/", 1)[-1]  # a hub id: the repository's name
    run = safe_name(config.run_name or default, "--run-name")
    if run == BASE_RUN or (workspace.class_models_dir(cls) / run).is_dir():
        raise SpurgenError(f"the run name '{run}' of --lora {source} is "
                           + ("reserved for the base model's images" if run == BASE_RUN
                              else f"a fine-tuned run of {cls} in {workspace.class_models_dir(cls)}")
                           + "; pass --run-name NAME")
    return _lora_plan(config, cls, run, lora_file, source, {}, _fill(config.prompt, cls) if config.prompt else None)


def checkpoint_lora(workspace: Workspace, cls: ClassInfo, run: str, step: int) -> tuple[Path, dict[str, Any]]:
    """The LoRA file saved with checkpoint ``step`` of a run (finished or not), and the run's training.json ({} when
    it has none yet).

    Raises:
        SpurgenError: no such checkpoint, or one without a LoRA file (full fine-tuning, an older spurgen).
    """
    run_dir = workspace.model_dir(cls, run)
    folder = checkpoint_dir(run_dir, step)
    training = read_json(run_dir / TRAINING_FILE) if (run_dir / TRAINING_FILE).is_file() else {}
    if not folder.is_dir():
        steps = [p.name.rsplit("-", 1)[-1] for p in list_checkpoints(run_dir)]
        raise SpurgenError(f"{folder} does not exist: run '{run}' of {cls} has "
                           + (f"checkpoints of steps {', '.join(steps)}; pick one" if steps else "no checkpoint; drop "
                              "--checkpoint to use its final weights"))
    if not (folder / LORA_WEIGHTS_NAME).is_file():
        why = ("a full fine-tuning checkpoint holds only the training state" if training.get("weights") == "full"
               else "it was saved by an older spurgen")
        raise SpurgenError(f"{folder} holds no {LORA_WEIGHTS_NAME} ({why}); use the finished run instead")
    return folder / LORA_WEIGHTS_NAME, training


def _checkpoint_plan(config: GenerateConfig, workspace: Workspace, cls: ClassInfo, run: str) -> ModelPlan:
    """--checkpoint N of a run: the LoRA file saved in the checkpoint, as run <run>-checkpoint-N (or --run-name)."""
    step = int(config.checkpoint or 0)
    lora_file, training = checkpoint_lora(workspace, cls, run, step)
    name = safe_name(config.run_name or f"{run}-checkpoint-{step}", "--run-name")
    prompt = _fill(config.prompt, cls) if config.prompt else training.get("instance_prompt")
    return _lora_plan(config, cls, name, lora_file, str(lora_file.parent), training, prompt)


def plan_class(config: GenerateConfig, workspace: Workspace, cls: ClassInfo) -> list[ModelPlan]:
    """The models to sample for one class: the base model with --base, a LoRA from elsewhere with --lora, else each
    selected run (finished, or with --checkpoint any run that has that checkpoint).

    Raises:
        SpurgenError: no base model, an unfinished or unknown run, or a run folder with missing weights.
    """
    if config.lora:
        return [_outside_lora_plan(config, workspace, cls)]
    runs = workspace.finished_runs(cls)
    negative = _fill(config.negative_prompt, cls)
    if config.base:
        bases = {_base_of_training(t) for t in runs.values()} - {""}
        if config.model:
            base = config.model
        elif len(bases) == 1:
            base = bases.pop()
        elif bases:
            raise SpurgenError(f"the runs of {cls} were trained on different base models ({', '.join(sorted(bases))}); "
                               "pick one with --model")
        else:
            raise SpurgenError(f"no base model for {cls}: pass --model PATH_OR_HUB_ID or set model = \"...\" "
                               "in spurgen.toml")
        class_prompts = {t.get("class_prompt") for t in runs.values()} - {None, ""}
        default_prompt = (class_prompts.pop() if len(class_prompts) == 1
                          else f"a photo of {cls.spurious_feature or cls.name}")
        resolutions = {t.get("resolution") for t in runs.values()} - {None}
        return [ModelPlan(cls, BASE_RUN, "base", resolve_base_model(base), base,
                          _fill(config.prompt, cls) if config.prompt else default_prompt, negative,
                          config.resolution or (resolutions.pop() if len(resolutions) == 1 else None))]
    models_dir = workspace.class_models_dir(cls)
    if "all" in config.runs:
        if not runs:
            raise SpurgenError(f"no finished fine-tuned model for {cls} in {models_dir}; run 'spurgen finetune "
                               f"--classes {cls.index}' first, or pass --base to sample the untouched base model")
        names = list(runs)
    else:
        names = config.runs
    if config.checkpoint is not None:
        if config.run_name and len(names) > 1:
            raise SpurgenError(f"--run-name names one run's images, but --checkpoint applies to {len(names)} runs of "
                               f"{cls} ({', '.join(names)}); pick one with --runs")
        return [_checkpoint_plan(config, workspace, cls, run) for run in names]
    plans = []
    for run in names:
        run_dir = workspace.model_dir(cls, run)
        if run not in runs:
            known = f"finished runs: {', '.join(runs)}" if runs else "it has no finished run"
            raise SpurgenError(f"{run_dir} holds no finished model (training.json with status complete); {known}. "
                               "Finish 'spurgen finetune' for it or pick another --runs")
        if run == BASE_RUN:
            raise SpurgenError(f"{run_dir}: the run name '{BASE_RUN}' is reserved for the untouched base model's "
                               "images; rename the run folder")
        training = runs[run]
        prompt = _fill(config.prompt, cls) if config.prompt else training.get("instance_prompt")
        if not prompt:
            raise SpurgenError(f"{run_dir / TRAINING_FILE} has no instance_prompt; pass --prompt")
        resolution = config.resolution or training.get("resolution")
        if training.get("weights") == "lora":
            if not (run_dir / LORA_WEIGHTS_NAME).is_file():
                raise SpurgenError(f"{run_dir / LORA_WEIGHTS_NAME} is missing; re-run 'spurgen finetune' for run {run}")
            base = _base_of_training(training)
            if not base:
                raise SpurgenError(f"{run_dir / TRAINING_FILE} names no base_model; re-run 'spurgen finetune' "
                                   f"for run {run}")
            plans.append(_lora_plan(config, cls, run, run_dir / LORA_WEIGHTS_NAME, str(run_dir), training, prompt))
        elif training.get("weights") == "full":
            plans.append(ModelPlan(cls, run, "full", resolve_base_model(str(run_dir)),
                                   str(training.get("base_model", "")), prompt, negative, resolution,
                                   schedule=trained_schedule(training)))
        else:
            raise SpurgenError(f"{run_dir / TRAINING_FILE}: weights is {training.get('weights')!r}, expected 'lora' or "
                               "'full'; re-run 'spurgen finetune'")
    return plans


def _weight_files(model: BaseModel) -> list[Path]:
    """The weight files from_pretrained reads by default: per sub-model whose weights decide an image (the
    denoiser, the text encoders and the VAE; the safety checker only blanks flagged images), safetensors over
    .bin, no variants."""
    family, folder = model.family, model.path
    files: list[Path] = []
    for part in (family.denoiser, *family.text_encoders, "vae"):
        candidates = [p for p in sorted((folder / part).glob("*")) if p.is_file() and p.name.count(".") == 1]
        safetensors = [p for p in candidates if p.suffix == ".safetensors"]
        files.extend(safetensors or [p for p in candidates if p.suffix == ".bin"])
    return files


def model_record(plan: ModelPlan, hashes: FileHashes) -> dict[str, Any]:
    """The model part of generation.json: where the weights came from and their SHA-256."""
    hashed = hashes.digest
    record: dict[str, Any] = {
        "kind": plan.kind,
        "base_model": plan.base_model,
        "folder": str(plan.pipeline.path),
        "revision": plan.pipeline.revision,
        "files": {str(p.relative_to(plan.pipeline.path)): hashed(p) for p in _weight_files(plan.pipeline)},
    }
    if plan.lora_file:
        record.update(lora_source=plan.lora_source, lora_file=str(plan.lora_file), lora_sha256=hashed(plan.lora_file))
    return record


def run_fingerprint(model: dict[str, Any], settings: dict[str, Any]) -> str:
    """Hash of everything that changes an image: weight hashes and the settings (not paths, n or batch size)."""
    payload = {"files": model["files"], "lora": model.get("lora_sha256"), **settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def run_settings(config: GenerateConfig, plan: ModelPlan, dtype: "torch.dtype") -> dict[str, Any]:
    """The settings that change an image (batch size, device and n do not), the family's defaults filled in; a run
    trained on a rescaled schedule (zero terminal SNR) adds it as ``schedule``, which every sampler is built with."""
    import torch

    return {
        "prompt": plan.prompt,
        "negative_prompt": plan.negative_prompt,
        "steps": config.steps,
        "guidance": plan.pipeline.family.guidance(config.guidance),
        "scheduler": plan.pipeline.family.scheduler(config.scheduler, plan.schedule),
        **({"schedule": plan.schedule} if plan.schedule else {}),
        "resolution": plan.resolution or plan.pipeline.resolution,
        "seed": config.seed,
        "dtype": {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype],
        **({"lora_scale": config.lora_scale} if plan.lora_file else {}),
    }


@dataclass
class Until:
    """Over-generation of one run: how many images must pass, and each judged image's verdict."""

    wanted: int
    verdicts: dict[int, Verdict] = field(default_factory=dict)

    @property
    def accepted(self) -> int:
        return sum(v.accepted for v in self.verdicts.values())

    def record(self) -> dict[str, Any]:
        judged = len(self.verdicts)
        return {"judged": judged, "accepted": self.accepted,
                "acceptance_rate": self.accepted / judged if judged else None}


@dataclass
class RunState:
    """One run folder being filled, and its generation.json.

    ``total`` is how many image indices the run may use: -n, or with ``until`` the --max-images limit.
    """

    plan: ModelPlan
    folder: Path
    header: dict[str, Any]
    seed: int
    total: int
    entries: dict[int, dict[str, Any]] = field(default_factory=dict)
    todo: list[int] = field(default_factory=list)  # the images this process makes (its share of the missing ones)
    until: Until | None = None

    def present(self) -> list[int]:
        return [i for i in range(self.total) if (self.folder / image_name(i)).is_file()]

    def finished(self) -> bool:
        """Every image exists; with ``until``, also as soon as enough images passed."""
        enough = self.until is not None and self.until.accepted >= self.until.wanted
        return enough or len(self.present()) == self.total

    def judge(self, filters: ImageFilters, indices: Sequence[int]) -> None:
        """Judges images of an over-generated run by every filter; an image the safety checker blanked never passes."""
        if self.until is None or not indices:
            return
        verdicts = filters.judge(self.plan.cls, [self.folder / image_name(i) for i in indices])
        for i, verdict in zip(indices, verdicts):
            if self.entries.get(i, {}).get("nsfw_flagged"):
                verdict = Verdict(False, (*verdict.reasons, "blanked by the safety checker"))
            self.until.verdicts[i] = verdict

    def missing(self, stale: set[Path]) -> list[int]:
        """The images still to make: absent, or about to be deleted as ``stale``."""
        return [i for i in range(self.total)
                if not (self.folder / image_name(i)).is_file() or self.folder / image_name(i) in stale]

    def record(self, index: int, flagged: bool | None) -> None:
        self.entries[index] = {"index": index, "file": image_name(index), "seed": self.seed + index,
                               "prompt": self.plan.prompt, "negative_prompt": self.plan.negative_prompt,
                               "nsfw_flagged": flagged}

    def write(self) -> None:
        """Writes the manifest, ``"complete"`` once images 0..total-1 all exist.

        An image whose entry is unknown (made by another process sharing the work) is recorded from the
        settings, which determine it; only the safety checker's flag is then unknown.
        """
        present = self.present()
        complete = self.finished()
        for i in present:
            if i not in self.entries:
                self.record(i, None)
        verdicts = self.until.verdicts if self.until else {}
        images = [dict(self.entries[i], **({"sha256": file_sha256(self.folder / image_name(i))} if complete else {}),
                       **({"accepted": verdicts[i].accepted, "reasons": list(verdicts[i].reasons)}
                          if i in verdicts else {}))
                  for i in present]
        over_generation = ({"over_generation": {**self.header["over_generation"], **self.until.record()}}
                           if self.until else {})
        manifest = {**self.header, "status": "complete" if complete else "incomplete", "updated": utc_now(),
                    "num_images": len(present) if self.until else self.total, "images": images, **over_generation}
        if not holds_json(self.folder / GENERATION_FILE, manifest):  # a finished run's manifest stays untouched
            atomic_write_json(self.folder / GENERATION_FILE, manifest)


def check_folder(folder: Path, settings: dict[str, Any], fingerprint: str,
                 overwrite: bool) -> tuple[dict[int, dict[str, Any]], list[Path]]:
    """Checks that a run folder holds only images of these settings.

    Returns:
        The manifest entries of the images to keep, and the files that --overwrite is to delete.

    Raises:
        SpurgenError: earlier images of other settings (or of unknown origin) and no --overwrite.
    """
    ours = [p for p in folder.iterdir() if _IMAGE_NAME.match(p.name)] if folder.is_dir() else []
    manifest_path = folder / GENERATION_FILE
    previous = read_json(manifest_path) if manifest_path.is_file() else None
    if previous is not None and previous.get("fingerprint") == fingerprint:
        return {int(e["index"]): e for e in previous.get("images", [])}, []
    if not ours and previous is None:
        return {}, []
    if not overwrite:
        if previous is None:
            reason = "images without generation.json (not made by spurgen generate)"
        else:
            changed = [k for k, v in settings.items() if previous.get("settings", {}).get(k) != v]
            reason = "images made with other settings" + (f" ({', '.join(changed)} changed)" if changed
                                                          else " (the model's weights changed)")
        raise SpurgenError(f"{folder} holds {reason}; pass --overwrite to replace them, or move them away")
    return {}, [*ours, *([manifest_path] if previous is not None else [])]
