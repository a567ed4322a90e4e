"""``spurgen run``: the four stages for a list of classes and a grid of fine-tuning settings.

Class by class: select-refs, finetune (one run per preset and kappa of the grid), generate; then evaluate over
every class at the end (Table 1 / Table 2 and the report). Each stage is called with the config that
:func:`~spurgen.config.resolve_config` builds from ``spurgen.toml`` and the run's own overrides, exactly as its
command does, so ``[select-refs]``, ``[finetune]``, ``[generate]`` and ``[evaluate]`` apply unchanged.

A stage whose manifest says it is complete and current is skipped; an interrupted fine-tuning run resumes
from its checkpoint, an interrupted generation makes its missing images. A class that fails (a
:class:`~spurgen.errors.SpurgenError`) is reported and the next class goes on. ``run.json`` in the workspace
records, after each class, which stages ran and the memory of the process tree.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ._runtime import console, distributed_state, err_console, is_main_process, warn
from .config import EvaluateConfig, FinetuneConfig, GenerateConfig, RunConfig, SelectRefsConfig, resolve_config
from .errors import SpurgenError
from .evaluate import Evaluation, evaluate
from .finetune import finetune
from .families import get_family
from .generate import check_family_settings, generate, trained_schedule
from .labels import ClassInfo, get_label_set
from .select_refs import select_refs
from .workspace import (CHECKPOINTS, EVALUATION_FILE, GENERATION_FILE, SELECTION_FILE, TRAINING_FILE, Workspace,
                        atomic_write_json, read_json, utc_now)

__all__ = ["RUN_FILE", "RunStep", "RunSummary", "plan_class", "plan_run", "print_plan", "run_all", "run_names"]

RUN_FILE = "run.json"
SELECT, FINETUNE, GENERATE, EVALUATE = "select-refs", "finetune", "generate", "evaluate"
RUN, SKIP, RESUME = "will run", "skip (complete)", "resume"


@dataclass(frozen=True)
class RunStep:
    """One stage of one class (and run): what :func:`run_all` will do with it."""

    stage: str
    run: str | None
    action: str  # RUN, SKIP or RESUME


@dataclass
class RunSummary:
    """What ``spurgen run`` did: per class the stages that ran, failures, and the evaluation."""

    classes: list[dict[str, Any]] = field(default_factory=list)
    failures: dict[str, str] = field(default_factory=dict)
    evaluation: Evaluation | None = None


def run_names(config: RunConfig) -> dict[str, dict[str, Any]]:
    """``{run name: finetune overrides}``: each preset once, ``sfsl`` once per kappa of the grid (``sfsl-k0.05``)."""
    runs: dict[str, dict[str, Any]] = {}
    for preset in config.presets:
        if preset == "sfsl" and config.sfsl_weight:
            for kappa in config.sfsl_weight:
                runs[f"sfsl-k{kappa:g}"] = {"preset": preset, "run_name": f"sfsl-k{kappa:g}", "sfsl_weight": kappa}
        else:
            runs[preset] = {"preset": preset}
    return runs


def _stage_configs(workspace: Workspace, cls: ClassInfo, runs: dict[str, dict[str, Any]], resume: set[str]
                   ) -> tuple[SelectRefsConfig, dict[str, FinetuneConfig], GenerateConfig]:
    """One class's stage configs, resolved as the stage commands resolve them; ``resume``: runs to --resume."""
    settings = workspace.settings()
    only = [str(cls.index)]
    select = resolve_config(SelectRefsConfig, settings, SELECT, {"classes": only})
    tunes = {name: resolve_config(FinetuneConfig, settings, FINETUNE,
                                  {**overrides, "classes": only, "resume": name in resume or None})
             for name, overrides in runs.items()}
    gen = resolve_config(GenerateConfig, settings, GENERATE, {"classes": only, "runs": list(runs)})
    return select, tunes, gen


def _training_action(config: FinetuneConfig, folder: Path) -> str:
    """Complete with at least --steps steps; else resumed from its latest checkpoint when it has one."""
    training = read_json(folder / TRAINING_FILE) if (folder / TRAINING_FILE).is_file() else {}
    if training.get("status") == "complete" and training.get("steps", 0) >= config.steps:
        return SKIP
    return RESUME if any((folder / CHECKPOINTS).glob("checkpoint-*")) else RUN


def _generation_action(config: GenerateConfig, folder: Path, model: Path) -> str:
    """Complete with the same number of images and sampling settings; images already there are kept otherwise.

    Args:
        config: The generate settings.
        folder: The run's ``generated/<class>/<run>/``.
        model: The run's ``models/<class>/<run>/``: its training.json names the family whose default guidance
            and sampler an unset ``--guidance`` and ``--scheduler`` stand for (SD when it names none: it predates the
            other families), and the schedule it was trained on (zero terminal SNR: its own sampler and schedule, as
            generate resolves them); without one, the images are resumed and generate decides.
    """
    manifest = read_json(folder / GENERATION_FILE) if (folder / GENERATION_FILE).is_file() else {}
    if not manifest:
        return RUN
    if not (model / TRAINING_FILE).is_file():
        return RESUME
    training = read_json(model / TRAINING_FILE)
    family, schedule = get_family(training.get("family", "sd")), trained_schedule(training)
    recorded = manifest.get("settings", {})
    same = manifest.get("num_images") == config.num_images and (
        recorded.get("steps"), recorded.get("guidance"), recorded.get("scheduler"), recorded.get("schedule"),
        recorded.get("seed")
    ) == (config.steps, family.guidance(config.guidance), family.scheduler(config.scheduler, schedule), schedule,
          config.seed)
    return SKIP if same and manifest.get("status") == "complete" else RESUME


def _check_families(workspace: Workspace, classes: Sequence[ClassInfo], runs: dict[str, dict[str, Any]]) -> None:
    """What each base model's family refuses (FLUX.1's --full, a sampler it cannot swap in, a negative prompt its
    pipeline would drop), checked before any class starts rather than when a stage reaches it, after hours of work.

    Raises:
        SpurgenError: the first setting a family refuses, or a base model that cannot be found.
    """
    from ._base_model import resolve_base_model

    _, tunes, gen = _stage_configs(workspace, classes[0], runs, set())  # the family settings are not per class
    for model, family in dict.fromkeys((config.model, config.family) for config in tunes.values()):
        base = resolve_base_model(model, family)
        for config in tunes.values():
            if (config.model, config.family) == (model, family):
                base.family.check_config(config)
        check_family_settings(gen, base.family, gen.negative_prompt, f"base model {model}")


def plan_class(workspace: Workspace, cls: ClassInfo, runs: dict[str, dict[str, Any]]) -> list[RunStep]:
    """The stages of one class and what each will do, from the manifests in the workspace."""
    _, tunes, gen = _stage_configs(workspace, cls, runs, set())
    steps = [RunStep(SELECT, None, SKIP if (workspace.refs_dir(cls) / SELECTION_FILE).is_file() else RUN)]
    steps += [RunStep(FINETUNE, name, _training_action(config, workspace.model_dir(cls, name)))
              for name, config in tunes.items()]
    steps += [RunStep(GENERATE, name, _generation_action(gen, workspace.generated_dir(cls, name),
                                                         workspace.model_dir(cls, name))) for name in runs]
    return steps


def _evaluation_current(workspace: Workspace, classes: Sequence[ClassInfo]) -> bool:
    """reports/evaluation.json covers these classes and is newer than every reference and generated image set."""
    report = workspace.reports_dir / EVALUATION_FILE
    if not report.is_file() or read_json(report).get("settings", {}).get("classes") != [c.index for c in classes]:
        return False
    inputs = [*workspace.root.glob(f"refs/*/{SELECTION_FILE}"),
              *workspace.root.glob(f"generated/*/*/{GENERATION_FILE}")]
    return all(path.stat().st_mtime <= report.stat().st_mtime for path in inputs)


def plan_run(config: RunConfig, workspace: Workspace) -> tuple[list[ClassInfo], dict[ClassInfo, list[RunStep]], str]:
    """Every class's steps and the final evaluation's action."""
    classes = get_label_set(config.labels).resolve_many(config.classes)
    runs = run_names(config)
    plans = {cls: plan_class(workspace, cls, runs) for cls in classes}
    all_skipped = all(step.action == SKIP for steps in plans.values() for step in steps)
    return classes, plans, SKIP if all_skipped and _evaluation_current(workspace, classes) else RUN


def print_plan(classes: Sequence[ClassInfo], plans: dict[ClassInfo, list[RunStep]], evaluation: str) -> None:
    """The plan of ``--dry-run``: one row per class, one column per stage and run."""
    from rich.table import Table

    styles = {RUN: "green", SKIP: "dim", RESUME: "yellow"}
    table = Table(title="spurgen run: plan")
    table.add_column("class")
    columns = [f"{step.stage} {step.run}" if step.run else step.stage for step in plans[classes[0]]] if classes else []
    for column in columns:
        table.add_column(column)
    for cls in classes:
        table.add_row(str(cls), *(f"[{styles[s.action]}]{s.action}[/]" for s in plans[cls]))
    console.print(table)
    console.print(f"{EVALUATE} (every class): {evaluation}", highlight=False)


def _tree_rss_mb() -> float | None:
    """Resident memory of this process and its children (DataLoader workers), in MiB; None off Linux."""
    def rss(pid: str) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    if not Path("/proc/self/status").is_file():
        return None
    pids, total = [str(os.getpid())], 0
    while pids:
        pid = pids.pop()
        total += rss(pid)
        for children in Path(f"/proc/{pid}/task").glob("*/children"):
            pids.extend(children.read_text().split())
    return total / 2**20


def _free_memory() -> None:
    """Drops the class's models: its pipelines and classifiers are unreferenced once its stages return."""
    gc.collect()
    try:
        import torch
    except ImportError:
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run_class(workspace: Workspace, cls: ClassInfo, runs: dict[str, dict[str, Any]],
               classifier_flags: Sequence[str]) -> dict[str, str]:
    """The stages of one class that are not complete; returns ``{stage or stage/run: what happened}``."""
    steps = plan_class(workspace, cls, runs)
    resume = {step.run for step in steps if step.stage == FINETUNE and step.action == RESUME and step.run}
    select, tunes, gen = _stage_configs(workspace, cls, runs, resume)
    processes = distributed_state()
    done: dict[str, str] = {}
    for step in steps:
        key = f"{step.stage}/{step.run}" if step.run else step.stage
        if step.action == SKIP:
            done[key] = "skipped"
        elif step.stage == SELECT:
            if not all(result.ok for result in select_refs(select, workspace, classifier_flags)):
                raise SpurgenError(f"{cls}: no image is predicted as the class by every classifier; nothing to "
                                   "fine-tune on (try other --classifiers or images)")
            done[key] = "ran"
        elif step.stage == FINETUNE:
            done[key] = finetune(tunes[step.run], workspace, classifier_flags)[0].status  # type: ignore[index]
        else:
            done[key] = "resumed" if step.action == RESUME else "ran"
        # Under `accelerate launch` the main process writes a stage's outputs: the next stage reads them after it.
        processes.wait_for_everyone()
    if any(step.stage == GENERATE and step.action != SKIP for step in steps):
        # All the class's runs at once, so that LoRA runs share the loaded base model.
        generate(gen, workspace, classifier_flags)
        processes.wait_for_everyone()
    return done


def run_all(config: RunConfig, workspace: Workspace, classifier_flags: Sequence[str] = ()) -> RunSummary:
    """Runs the stages that are not complete for every class, then evaluates every class that succeeded.

    Raises:
        SpurgenError: bad settings (checked for every class and stage before any work), or the final evaluation.
    """
    classes, plans, evaluation_action = plan_run(config, workspace)  # checks every stage's settings up front
    runs = run_names(config)
    # Only when a model will be trained or sampled: a run that only evaluates needs no base model at hand.
    if any(step.action != SKIP for steps in plans.values() for step in steps if step.stage != SELECT):
        _check_families(workspace, classes, runs)
    workspace.ensure_writable()
    summary = RunSummary()
    record: dict[str, Any] = {"stage": "run", "created": utc_now(), "settings": vars(config),
                              "classes": summary.classes, "failures": summary.failures}
    for n, cls in enumerate(classes, 1):
        if is_main_process():
            err_console.print(f"[bold]{n}/{len(classes)} {cls}[/]", highlight=False)
        entry: dict[str, Any] = {"class": cls.index, "name": cls.name}
        try:
            entry["stages"] = _run_class(workspace, cls, runs, classifier_flags)
        except SpurgenError as exc:
            summary.failures[str(cls)] = str(exc)
            warn(f"{cls} failed, going on with the next class: {exc}")
        _free_memory()
        entry["rss_mb"] = _tree_rss_mb()
        summary.classes.append(entry)
        if is_main_process():
            atomic_write_json(workspace.root / RUN_FILE, {**record, "updated": utc_now()})
    succeeded = [cls for cls in classes if str(cls) not in summary.failures]
    ran_any = any(v != "skipped" for entry in summary.classes for v in entry.get("stages", {}).values())
    if succeeded and (ran_any or evaluation_action == RUN):
        settings = workspace.settings()
        evaluate_config = resolve_config(EvaluateConfig, settings, EVALUATE,
                                         {"classes": [str(c.index) for c in succeeded], "runs": list(runs)})
        summary.evaluation = evaluate(evaluate_config, workspace, classifier_flags)
    record["evaluated"] = summary.evaluation is not None
    if is_main_process():
        atomic_write_json(workspace.root / RUN_FILE, {**record, "updated": utc_now()})
    return summary
