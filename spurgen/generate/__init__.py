"""Stage 3, ``spurgen generate``: sample each class's images from its fine-tuned models or the base model.

A run's model lives in ``models/<class>/<run>/`` (finished when its ``training.json`` says
``"status": "complete"``): LoRA weights loaded onto the base model they were trained on, or a complete
fine-tuned pipeline. ``--base`` samples the untouched base model instead, the no-fine-tuning baseline,
under the run name ``base``. Images go to ``generated/<class>/<run>/00000.png ...`` with
``generation.json``.

Image i always uses seed ``seed + i``: its starting noise (and an ancestral sampler's noise) comes from
its own CPU generator, so an image depends neither on the batch size, nor on the device's random number
generator, nor on how many processes share the work. That is what makes the stage resumable: a re-run
makes only the images that are missing. ``generation.json`` is written before the first image with
``"status": "incomplete"``, rewritten now and then while sampling, and becomes ``"complete"`` once all
images exist. Its fingerprint (model file hashes and every setting that changes an image) guards against mixing
images of different settings in one folder.

``--until N --filter ...`` over-generates: images are made a batch at a time (never more than the images still
wanted, so exactly N pass unless ``--max-images`` ends the run first) and each batch is judged by
:mod:`spurgen.generate.filters` with the models loaded once. Such a run is complete when N images passed or the limit
is reached; each image's verdict and reasons are in ``generation.json``. A re-run re-judges the images already
there (from the caches, so nothing is recomputed), then goes on sampling.

Under ``accelerate launch`` the missing images of each run are dealt out between the processes (image i
still uses seed ``seed + i``, so N processes make the same files as one); only the main process deletes,
and writes ``generation.json``, after every process has finished.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from .._base_model import BaseModel, image_generator, resolve_base_model
from .._file_hashes import FileHashes
from .._lora import LORA_WEIGHTS_NAME
from .._runtime import (console, distributed_state, dtype_argument, library_progress_bars_off, progress_bar,
                       resolve_device, warn)
from ..config import MODEL_SCHEDULER, SCHEDULERS, GenerateConfig, find_scheduler
from ..errors import SpurgenError
from ..images import file_sha256
from ..labels import ClassInfo, get_label_set
from ..workspace import (BASE_RUN, GENERATION_FILE, TRAINING_FILE, Workspace, atomic_write_bytes, atomic_write_json,
                        environment_versions, holds_json, read_json, utc_now, workspace_classes)
from .filters import ImageFilters, Verdict

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionPipeline

__all__ = [
    "GenerationResult",
    "generate",
    "image_name",
    "build_scheduler",
    "torch_dtype",
    "print_generation_table",
    "acceptance_rate",
]

# The sub-models whose weights decide an image; the safety checker only blanks flagged images.
_WEIGHT_FOLDERS = ("unet", "text_encoder", "vae")
MANIFEST_INTERVAL_S = 10.0
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
    pipeline: BaseModel  # the folder StableDiffusionPipeline.from_pretrained loads: the base or a full run
    base_model: str  # as the user or training.json named it
    prompt: str
    negative_prompt: str
    resolution: int | None
    lora_folder: Path | None = None


@dataclass
class GenerationResult:
    """The outcome for one class and run."""

    cls: ClassInfo
    run: str
    kind: str
    folder: Path
    made: int
    existing: int
    total: int
    flagged: int = 0
    accepted: int | None = None  # with --until: the images that passed every filter


def _fill(template: str, cls: ClassInfo) -> str:
    # Plain replacement rather than str.format, so other braces in a prompt stay as the user wrote them.
    return template.replace("{class}", cls.name).replace("{feature}", cls.spurious_feature or cls.name)


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


def _plan_class(config: GenerateConfig, workspace: Workspace, cls: ClassInfo) -> list[ModelPlan]:
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
            raise SpurgenError(f"no base model for {cls}: pass --model PATH_OR_HUB_ID or set model = \"...\" in spurgen.toml")
        class_prompts = {t.get("class_prompt") for t in runs.values()} - {None, ""}
        default_prompt = class_prompts.pop() if len(class_prompts) == 1 else f"a photo of {cls.spurious_feature or cls.name}"
        resolutions = {t.get("resolution") for t in runs.values()} - {None}
        return [ModelPlan(cls, BASE_RUN, "base", resolve_base_model(base), base,
                          _fill(config.prompt, cls) if config.prompt else default_prompt, negative,
                          config.resolution or (resolutions.pop() if len(resolutions) == 1 else None))]
    models_dir = workspace.class_models_dir(cls)
    if "all" in config.runs:
        if not runs:
            raise SpurgenError(f"no finished fine-tuned model for {cls} in {models_dir}; run 'spurgen finetune --classes "
                               f"{cls.index}' first, or pass --base to sample the untouched base model")
        names = list(runs)
    else:
        names = config.runs
    plans = []
    for run in names:
        run_dir = workspace.model_dir(cls, run)
        if run not in runs:
            known = f"finished runs: {', '.join(runs)}" if runs else "it has no finished run"
            raise SpurgenError(f"{run_dir} holds no finished model (training.json with status complete); {known}. "
                               "Finish 'spurgen finetune' for it or pick another --runs")
        if run == BASE_RUN:
            raise SpurgenError(f"{run_dir}: the run name '{BASE_RUN}' is reserved for the untouched base model's images; "
                               "rename the run folder")
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
                raise SpurgenError(f"{run_dir / TRAINING_FILE} names no base_model; re-run 'spurgen finetune' for run {run}")
            base_model = _lora_base(config, cls, run, base, training)
            plans.append(ModelPlan(cls, run, "lora", base_model, base, prompt, negative, resolution, lora_folder=run_dir))
        elif training.get("weights") == "full":
            plans.append(ModelPlan(cls, run, "full", resolve_base_model(str(run_dir)),
                                   str(training.get("base_model", "")), prompt, negative, resolution))
        else:
            raise SpurgenError(f"{run_dir / TRAINING_FILE}: weights is {training.get('weights')!r}, expected 'lora' or "
                               "'full'; re-run 'spurgen finetune'")
    return plans


def _weight_files(folder: Path) -> list[Path]:
    """The weight files from_pretrained reads by default: per sub-model, safetensors over .bin, no variants."""
    files: list[Path] = []
    for part in _WEIGHT_FOLDERS:
        candidates = [p for p in sorted((folder / part).glob("*")) if p.is_file() and p.name.count(".") == 1]
        safetensors = [p for p in candidates if p.suffix == ".safetensors"]
        files.extend(safetensors or [p for p in candidates if p.suffix == ".bin"])
    return files


def _model_record(plan: ModelPlan, hashes: FileHashes) -> dict[str, Any]:
    """The model part of generation.json: where the weights came from and their SHA-256."""
    hashed = hashes.digest
    record: dict[str, Any] = {
        "kind": plan.kind,
        "base_model": plan.base_model,
        "folder": str(plan.pipeline.path),
        "revision": plan.pipeline.revision,
        "files": {str(p.relative_to(plan.pipeline.path)): hashed(p) for p in _weight_files(plan.pipeline.path)},
    }
    if plan.lora_folder:
        record.update(lora_folder=str(plan.lora_folder), lora_file=LORA_WEIGHTS_NAME,
                      lora_sha256=hashed(plan.lora_folder / LORA_WEIGHTS_NAME))
    return record


def _fingerprint(model: dict[str, Any], settings: dict[str, Any]) -> str:
    """Hash of everything that changes an image: weight hashes and the settings (not paths, n or batch size)."""
    payload = {"files": model["files"], "lora": model.get("lora_sha256"), **settings}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def torch_dtype(name: str, device: "torch.device") -> "torch.dtype":
    """The precision a --dtype name means on a device ('auto': fp16 on CUDA, fp32 elsewhere)."""
    import torch

    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def build_scheduler(name: str, model_config: Any) -> Any:
    """A diffusers scheduler by its user-facing name, built from the model's scheduler config.

    Building from the model's config keeps its noise schedule and prediction type (v-prediction for
    SD 2.x-768); ``"model"`` returns ``None`` (keep the model's own scheduler).
    """
    import diffusers

    canonical = find_scheduler(name)
    if canonical is None:
        raise SpurgenError(f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)} or '{MODEL_SCHEDULER}'")
    if canonical == MODEL_SCHEDULER:
        return None
    class_name, overrides = SCHEDULERS[canonical]
    return getattr(diffusers, class_name).from_config(model_config, **overrides)


def _load_pipeline(folder: Path, dtype: "torch.dtype", device: "torch.device") -> "StableDiffusionPipeline":
    from diffusers import StableDiffusionPipeline

    # A hub snapshot fetched by finetune lacks the safety checker (its download is skipped for training);
    # a model folder that has one keeps it.
    no_checker = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    try:
        with library_progress_bars_off():
            pipe = StableDiffusionPipeline.from_pretrained(folder, **dtype_argument(dtype),
                                                           **({} if (folder / "safety_checker").is_dir() else no_checker))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpurgenError(f"cannot load a Stable Diffusion pipeline from {folder} ({first}); give a diffusers "
                           "Stable Diffusion folder or hub id") from None
    pipe.set_progress_bar_config(disable=True)
    # Attention runs through PyTorch's scaled_dot_product_attention (diffusers' default AttnProcessor2_0),
    # which picks flash / memory-efficient kernels on GPUs.
    return pipe.to(device)


def _png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class _Until:
    """Over-generation of one run: how many images must pass, and each judged image's verdict."""

    wanted: int
    verdicts: dict[int, Verdict] = field(default_factory=dict)

    @property
    def accepted(self) -> int:
        return sum(v.accepted for v in self.verdicts.values())

    def record(self) -> dict[str, Any]:
        judged = len(self.verdicts)
        return {"judged": judged, "accepted": self.accepted, "acceptance_rate": self.accepted / judged if judged else None}


@dataclass
class _RunState:
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
    until: _Until | None = None

    def present(self) -> list[int]:
        return [i for i in range(self.total) if (self.folder / image_name(i)).is_file()]

    def finished(self) -> bool:
        """Every image exists; with ``until``, also as soon as enough images passed."""
        return (self.until is not None and self.until.accepted >= self.until.wanted) or len(self.present()) == self.total

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
                       **({"accepted": verdicts[i].accepted, "reasons": list(verdicts[i].reasons)} if i in verdicts else {}))
                  for i in present]
        over_generation = {"over_generation": {**self.header["over_generation"], **self.until.record()}} if self.until else {}
        manifest = {**self.header, "status": "complete" if complete else "incomplete", "updated": utc_now(),
                    "num_images": len(present) if self.until else self.total, "images": images, **over_generation}
        if not holds_json(self.folder / GENERATION_FILE, manifest):  # a finished run's manifest stays untouched
            atomic_write_json(self.folder / GENERATION_FILE, manifest)


def _check_folder(folder: Path, settings: dict[str, Any], fingerprint: str,
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


def _chunks(items: Sequence[int], size: int) -> Iterable[list[int]]:
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def _settings(config: GenerateConfig, plan: ModelPlan, dtype: "torch.dtype") -> dict[str, Any]:
    """The settings that change an image (batch size, device and n do not)."""
    import torch

    return {
        "prompt": plan.prompt,
        "negative_prompt": plan.negative_prompt,
        "steps": config.steps,
        "guidance": config.guidance,
        "scheduler": find_scheduler(config.scheduler),
        "resolution": plan.resolution or plan.pipeline.resolution,
        "seed": config.seed,
        "dtype": {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype],
    }


def _batches(state: _RunState, batch_size: int) -> Iterator[list[int]]:
    """The batches of images to make: the run's share of the missing ones.

    With --until, the images are taken in index order and a batch holds no more than the images still
    wanted, so no more than that many can pass; it ends once enough passed or at the --max-images limit.
    """
    if state.until is None:
        yield from _chunks(state.todo, batch_size)
        return
    remaining = iter(state.todo)
    while not state.finished():
        batch = list(itertools.islice(remaining, min(batch_size, state.until.wanted - state.until.accepted)))
        if not batch:
            return
        yield batch


def _sample(pipe: "StableDiffusionPipeline", state: _RunState, config: GenerateConfig, progress: Any,
            filters: ImageFilters | None) -> int:
    """Makes the run's missing images batch by batch; returns how many the safety checker flagged.

    With --until, each batch is judged by ``filters`` as soon as it is written.
    """
    resolution = state.header["settings"]["resolution"]
    until = state.until
    task = progress.add_task(f"{state.plan.cls.dirname}/{state.plan.run}" + (" accepted" if until else ""),
                             total=until.wanted if until else len(state.todo), completed=until.accepted if until else 0)
    flagged, written = 0, time.monotonic()
    main = distributed_state().is_main_process
    for batch in _batches(state, config.batch_size):
        # One CPU generator per image: its starting noise and any ancestral noise are drawn from seed + i
        # alone, so neither the batch it falls in nor the device changes it.
        generators = [image_generator(config.seed + i) for i in batch]
        output = pipe(prompt=[state.plan.prompt] * len(batch),
                      negative_prompt=[state.plan.negative_prompt] * len(batch) if state.plan.negative_prompt else None,
                      num_inference_steps=config.steps, guidance_scale=config.guidance,
                      height=resolution, width=resolution, generator=generators,
                      output_type="pil")
        flags = output.nsfw_content_detected or [None] * len(batch)
        for i, image, flag in zip(batch, output.images, flags):
            atomic_write_bytes(state.folder / image_name(i), _png_bytes(image))
            state.record(i, None if flag is None else bool(flag))
            flagged += bool(flag)
        if filters is not None:
            state.judge(filters, batch)
        # The images themselves are the progress a re-run resumes from; the manifest adds only the safety
        # checker's flags, so it is rewritten (a synced file) at most every MANIFEST_INTERVAL_S seconds.
        if main and time.monotonic() - written >= MANIFEST_INTERVAL_S:
            state.write()
            written = time.monotonic()
        if until:
            progress.update(task, completed=until.accepted)
        else:
            progress.advance(task, len(batch))
    return flagged


def generate(config: GenerateConfig, workspace: Workspace, classifier_flags: Sequence[str] = ()) -> list[GenerationResult]:
    """Samples each class's images for each selected run, or for the base model, into ``generated/``.

    Classes, runs, models and the images already in the output folders are all checked before the first
    model loads. A run whose images all exist is not loaded at all. Runs sharing a pipeline folder (LoRA
    runs on the same base model) load it once.

    With --until, the filters' models load once (after the checks, before any image) and each run samples
    until enough images pass; the images already there are judged first.

    Args:
        config: Resolved settings.
        workspace: Where the models are and the images go.
        classifier_flags: ``--classifier NAME=ARCH[@PATH]`` values, for the 'consistent' filter.

    Raises:
        SpurgenError: bad input; then nothing has been written.
    """
    if config.until is not None and distributed_state().num_processes > 1:
        raise SpurgenError("--until judges each batch before the next one and runs in one process; "
                           "run it without accelerate launch")
    labels = get_label_set(config.labels)
    if config.classes:
        classes = labels.resolve_many(config.classes)
    else:
        classes = workspace_classes(workspace.root / "models", labels)
        if not classes:
            raise SpurgenError(f"no fine-tuned model in {workspace.root / 'models'}; run 'spurgen finetune' first, or "
                               "pass --classes NAME --base to sample the untouched base model")
    plans = [plan for cls in classes for plan in _plan_class(config, workspace, cls)]
    device = resolve_device(config.device)
    dtype = torch_dtype(config.dtype, device)
    workspace.ensure_writable()
    # A base model's SHA-256 (GBs) is remembered in the workspace, and saved only once the command has
    # succeeded: a refused command leaves the workspace as it was.
    hashes = FileHashes(workspace.cache_dir("sha256.json"))
    states, stale = [], []
    for plan in plans:
        settings = _settings(config, plan, dtype)
        model = _model_record(plan, hashes)
        fingerprint = _fingerprint(model, settings)
        folder = workspace.generated_dir(plan.cls, plan.run)
        entries, replaced = _check_folder(folder, settings, fingerprint, config.overwrite)
        stale.extend(replaced)
        header = {"stage": "generate", "created": utc_now(), "versions": environment_versions(),
                  "class": {"index": plan.cls.index, "name": plan.cls.name, "synset": plan.cls.synset,
                            "spurious_feature": plan.cls.spurious_feature},
                  "run": plan.run, "model": model, "settings": settings, "fingerprint": fingerprint}
        states.append(_RunState(plan, folder, header, config.seed, config.num_to_sample, entries,
                                until=_Until(config.until) if config.until is not None else None))
    # The filters' models load once every folder has passed its checks.
    filters = ImageFilters(config, workspace, labels, classes, classifier_flags) if config.until is not None else None
    if filters is not None:
        for state in states:
            state.header["over_generation"] = {"until": config.until, "max_images": config.num_to_sample,
                                               **filters.record()}
    missing = [s.missing(set(stale)) for s in states]
    processes = distributed_state()
    processes.wait_for_everyone()  # every process has checked the folders and listed the missing images
    if processes.is_main_process:
        for path in stale:  # only once every run has passed its checks
            path.unlink()
    processes.wait_for_everyone()  # before any process writes an image where a stale one was
    existing = [len(s.present()) for s in states]
    if filters is not None:
        for state in states:  # an earlier run's images count first
            state.judge(filters, state.present())

    flagged: dict[int, int] = {}
    pipelines = _PipelineSlot(dtype, device)
    with progress_bar("images") as progress:
        # Grouped by pipeline folder so that LoRA runs on one base model share one loaded pipeline.
        for n, state in sorted(enumerate(states), key=lambda item: str(item[1].plan.pipeline.path)):
            state.todo = [] if state.finished() else missing[n][processes.process_index::processes.num_processes]
            flagged[n] = _fill_run(pipelines, state, config, progress, filters) if state.todo else 0
    if processes.num_processes > 1:
        _gather_entries(states, flagged)
    if processes.is_main_process:
        for state in states:
            state.write()
        hashes.save()
    results = [GenerationResult(s.plan.cls, s.plan.run, s.plan.kind, s.folder, made=len(s.present()) - existing[n],
                                existing=existing[n], total=len(s.present()), flagged=flagged[n],
                                accepted=s.until.accepted if s.until else None)
               for n, s in enumerate(states)]
    for result in results:
        if result.accepted is not None and result.accepted < (config.until or 0):
            warn(f"{result.cls} run {result.run}: only {result.accepted} of {config.until} images passed --filter "
                 f"within --max-images {config.num_to_sample}; raise --max-images to sample more")
        if result.flagged:
            warn(f"{result.cls} run {result.run}: the model's safety checker blanked {result.flagged} image(s); "
                 "they are marked nsfw_flagged in generation.json")
    return sorted(results, key=lambda r: (r.cls.index, r.run))


def _gather_entries(states: Sequence[_RunState], flagged: dict[int, int]) -> None:
    """Brings every process's manifest entries and safety checker counts to every process (after all finished)."""
    from accelerate.utils import gather_object

    parts = gather_object([([s.entries for s in states], flagged)])
    for part_entries, part_flagged in parts:
        for state, entries in zip(states, part_entries):
            state.entries.update(entries)
    for n in flagged:
        flagged[n] = sum(part_flagged[n] for _, part_flagged in parts)


class _PipelineSlot:
    """The one pipeline held in memory; loading another folder releases the previous pipeline first."""

    def __init__(self, dtype: "torch.dtype", device: "torch.device") -> None:
        self.dtype, self.device = dtype, device
        self.folder: Path | None = None
        self.pipe: Any = None
        self.scheduler: Any = None  # the pipeline's own scheduler, kept while runs swap in others

    def get(self, folder: Path) -> "StableDiffusionPipeline":
        if folder != self.folder:
            self.folder = self.pipe = self.scheduler = None
            self.pipe = _load_pipeline(folder, self.dtype, self.device)
            self.folder, self.scheduler = folder, self.pipe.scheduler
        return self.pipe


def _fill_run(pipelines: _PipelineSlot, state: _RunState, config: GenerateConfig, progress: Any,
              filters: ImageFilters | None) -> int:
    """Loads the run's model (LoRA onto its base) and makes its missing images; returns the flagged count."""
    plan = state.plan
    pipe = pipelines.get(plan.pipeline.path)
    pipe.scheduler = build_scheduler(config.scheduler, pipelines.scheduler.config) or pipelines.scheduler
    if plan.lora_folder:
        _load_lora(pipe, plan)  # before anything is written: a LoRA of another base model is bad input
    state.folder.mkdir(parents=True, exist_ok=True)
    main = distributed_state().is_main_process
    if main:
        state.write()  # "incomplete" before the first image: a crash leaves a resumable folder
    try:
        return _sample(pipe, state, config, progress, filters)
    except BaseException:
        if main:
            state.write()  # an interrupted run still records the images it made (Ctrl-C, an error in a batch)
        raise
    finally:
        if plan.lora_folder:
            pipe.unload_lora_weights()


def _load_lora(pipe: "StableDiffusionPipeline", plan: ModelPlan) -> None:
    from diffusers.utils import logging as diffusers_logging

    # A UNet-only run (preset dreambooth) has no text-encoder keys, which diffusers reports as a warning.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipe.load_lora_weights(plan.lora_folder, weight_name=LORA_WEIGHTS_NAME)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        # torch's "Error(s) in loading state_dict for ...:" header says less than the first mismatch under it.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        first = next((line for line in lines if not line.endswith(":")), lines[0] if lines else type(exc).__name__)
        raise SpurgenError(f"cannot load the LoRA of run '{plan.run}' ({plan.lora_folder / LORA_WEIGHTS_NAME}) onto "
                           f"{plan.base_model} ({first}); it must be loaded onto the base model it was trained on") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)


def print_generation_table(results: Sequence[GenerationResult]) -> None:
    """The per-class and run summary of generate."""
    from rich.table import Table

    until = any(r.accepted is not None for r in results)
    table = Table(title="generate")
    for column, justify in (("class", "left"), ("run", "left"), ("model", "left"), ("new", "right"),
                            ("already there", "right"), ("images", "right"),
                            *((("accepted", "right"),) if until else ()), ("folder", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for r in results:
        accepted = [f"{r.accepted} ({acceptance_rate(r):.0%})"] if until else []
        table.add_row(str(r.cls), r.run, r.kind, str(r.made), str(r.existing), str(r.total), *accepted, str(r.folder))
    console.print(table)


def acceptance_rate(result: GenerationResult) -> float:
    """With --until: the share of the run's images that passed every filter."""
    return (result.accepted or 0) / result.total if result.total else 0.0
