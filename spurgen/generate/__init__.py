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

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .._base_model import _read_config
from .._file_hashes import FileHashes
from .._runtime import console, distributed_state, progress_bar, resolve_device, warn
from ..config import MODEL_SCHEDULER, GenerateConfig
from ..errors import SpurgenError
from ..labels import ClassInfo, get_label_set
from ..workspace import Workspace, environment_versions, utc_now, workspace_classes
from .filters import ImageFilters
from .runs import (RunState, Until, check_folder, image_name, model_record, plan_class,
                   run_fingerprint, run_settings, trained_schedule)
from .sampling import PipelineSlot, build_scheduler, fill_run, torch_dtype

if TYPE_CHECKING:
    from ..families import ModelFamily

__all__ = [
    "GenerationResult",
    "generate",
    "check_family_settings",
    "trained_schedule",
    "image_name",
    "build_scheduler",
    "torch_dtype",
    "print_generation_table",
    "acceptance_rate",
]


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


def generate(config: GenerateConfig, workspace: Workspace,
             classifier_flags: Sequence[str] = ()) -> list[GenerationResult]:
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
    plans = [plan for cls in classes for plan in plan_class(config, workspace, cls)]
    for plan in plans:
        check_family_settings(config, plan.pipeline.family, plan.negative_prompt, f"{plan.cls} run '{plan.run}'")
        if plan.schedule:  # a sampler that cannot take the run's schedule is refused before any model loads
            build_scheduler(plan.pipeline.family.scheduler(config.scheduler, plan.schedule),
                            _read_config(plan.pipeline.path / "scheduler" / "scheduler_config.json",
                                         str(plan.pipeline.path)), plan.schedule)
    device = resolve_device(config.device)
    dtype = torch_dtype(config.dtype, device)
    workspace.ensure_writable(*(workspace.generated_dir(plan.cls, plan.run) for plan in plans), workspace.cache_dir())
    # A base model's SHA-256 (GBs) is remembered in the workspace, and saved only once the command has
    # succeeded: a refused command leaves the workspace as it was.
    hashes = FileHashes(workspace.cache_dir("sha256.json"))
    states, stale = [], []
    for plan in plans:
        settings = run_settings(config, plan, dtype)
        model = model_record(plan, hashes)
        fingerprint = run_fingerprint(model, settings)
        folder = workspace.generated_dir(plan.cls, plan.run)
        entries, replaced = check_folder(folder, settings, fingerprint, config.overwrite)
        stale.extend(replaced)
        if not config.safety_checker:
            # A blanked image is a black square, not its seed's image: without the checker it is made again.
            blanked = {i for i, entry in entries.items() if entry.get("nsfw_flagged")}
            stale.extend(folder / image_name(i) for i in sorted(blanked))
            entries = {i: entry for i, entry in entries.items() if i not in blanked}
        header = {"stage": "generate", "created": utc_now(), "versions": environment_versions(),
                  "class": {"index": plan.cls.index, "name": plan.cls.name, "synset": plan.cls.synset,
                            "spurious_feature": plan.cls.spurious_feature},
                  "run": plan.run, "model": model, "settings": settings, "fingerprint": fingerprint}
        states.append(RunState(plan, folder, header, config.seed, config.num_to_sample, entries,
                                until=Until(config.until) if config.until is not None else None))
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
    pipelines = PipelineSlot(dtype, device, config.safety_checker)
    with progress_bar("images") as progress:
        # Grouped by pipeline folder so that LoRA runs on one base model share one loaded pipeline.
        for n, state in sorted(enumerate(states), key=lambda item: str(item[1].plan.pipeline.path)):
            state.todo = [] if state.finished() else missing[n][processes.process_index::processes.num_processes]
            flagged[n] = fill_run(pipelines, state, config, progress, filters) if state.todo else 0
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


def check_family_settings(config: GenerateConfig, family: "ModelFamily", negative_prompt: str, model: str) -> None:
    """Refuses settings that a model family would not sample with, rather than ignore them.

    Args:
        config: Resolved settings.
        family: The model's family.
        negative_prompt: The negative prompt the run would be sampled with.
        model: The model as the message names it (``hummingbird (94) run 'sfsl'``, ``base model ID``).

    Raises:
        SpurgenError: a sampler the family cannot swap in, or a negative prompt its pipeline would drop.
    """
    model = f"{model} is a {family.title} model"
    if not family.swaps_samplers and family.scheduler(config.scheduler) != MODEL_SCHEDULER:
        raise SpurgenError(f"{model}, which samples with its own scheduler only; leave --scheduler unset or pass "
                           f"--scheduler {MODEL_SCHEDULER} (not {config.scheduler})")
    if negative_prompt and not family.negative_prompts:
        raise SpurgenError(f"{model}, whose pipeline ignores a negative prompt without true classifier-free "
                           "guidance, which spurgen does not offer; drop --negative-prompt (or negative-prompt under "
                           "[generate] in spurgen.toml)")


def _gather_entries(states: Sequence[RunState], flagged: dict[int, int]) -> None:
    """Brings every process's manifest entries and safety checker counts to every process (after all finished)."""
    from accelerate.utils import gather_object

    parts = gather_object([([s.entries for s in states], flagged)])
    for part_entries, part_flagged in parts:
        for state, entries in zip(states, part_entries):
            state.entries.update(entries)
    for n in flagged:
        flagged[n] = sum(part_flagged[n] for _, part_flagged in parts)


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
