"""``spurgen world evidence``: choose SFSL's defaults on some world classes, report the ablation on others.

The paper's claim is that the spurious feature similarity loss makes fine-tuned images fool classifiers
more often than DreamBooth alone. The world lets us test that claim honestly, the way a hyper-parameter
search should be done:

1. **Tune** on the tuning classes: train ``dreambooth-te`` and an SFSL run for every kappa x timestep
   bound (contrib features), then the best of those with npca features; pick the setting with the highest
   mean spurious accuracy (mean over classifiers and tuning classes).
2. **Report** on the other classes, which the choice never saw: the base model's feature prompt and the
   three presets (SFSL with the chosen setting), each preset trained with several seeds, so that
   "SFSL - DreamBooth + text encoder" comes with its noise (the standard error of the paired differences
   over classes and seeds).

Everything runs through the ordinary stage functions in one workspace (``spurgen demo``'s settings), so
each run can be inspected with ``spurgen evaluate`` afterwards. Finished runs are skipped on a re-run.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from ..config import (EvaluateConfig, FinetuneConfig, FitNpcaConfig, GenerateConfig, SelectRefsConfig, require,
                      resolve_config, setting)

if TYPE_CHECKING:  # --help imports EvidenceConfig; it must not load the workspace and progress modules
    from ..workspace import Workspace

__all__ = ["EvidenceConfig", "gather_evidence", "EVIDENCE_FILE"]

EVIDENCE_FILE = "evidence.json"


@dataclass
class EvidenceConfig:
    """Settings of ``spurgen world evidence``."""

    tuning_classes: list[str] = setting(["square", "ring"], "World classes the SFSL defaults are chosen on.")
    report_classes: list[str] = setting(["circle", "triangle", "cross", "star"], "World classes the ablation is "
                                                                                 "reported on (never used for the "
                                                                                 "choice).")
    kappas: list[float] = setting([1.0, 10.0, 100.0], "SFSL weights tried on the tuning classes.")
    bounds: list[int] = setting([400, 999], "SFSL timestep bounds tried on the tuning classes.")
    seeds: list[int] = setting([0, 1], "Fine-tuning seeds of every reported run (their spread is the noise).")
    steps: int = setting(150, "Fine-tuning steps of every run.")
    num_images: int = setting(75, "Images generated per run.", flags=("-n",))

    def validate(self) -> None:
        require(not set(self.tuning_classes) & set(self.report_classes),
                "tuning and report classes overlap; a class used to choose the defaults cannot report them")
        require(bool(self.kappas) and bool(self.bounds) and bool(self.seeds), "kappas, bounds and seeds need a value "
                                                                              "each")
        require(self.steps >= 1 and self.num_images >= 1, "steps and num-images must be positive")


def _run_name(kappa: float, bound: int, feature: str, seed: int | None = None) -> str:
    name = f"sfsl-k{kappa:g}-t{bound}-{feature}"
    return name if seed is None else f"{name}-s{seed}"


class _Experiment:
    """One workspace, its settings, and the stage calls every run goes through."""

    def __init__(self, workspace: Workspace, config: EvidenceConfig) -> None:
        from .demo import DemoConfig, demo_settings, render_spurious_set
        from ..workspace import atomic_write_text

        self.workspace = workspace
        self.config = config
        workspace.ensure_writable()
        if not workspace.settings_path.is_file():
            demo = DemoConfig(steps=config.steps, num_images=config.num_images)
            atomic_write_text(workspace.settings_path, demo_settings(workspace, demo))
        self.settings = workspace.settings()
        render_spurious_set(workspace)

    def select_refs(self, classes: list[str]) -> None:
        from ..select_refs import select_refs

        select_refs(
            resolve_config(SelectRefsConfig, self.settings, "select-refs", {"classes": classes}), self.workspace
        )

    def fit_npca(self, classes: list[str]) -> None:
        """Fits each class's neural PCA on the world's unbiased validation images of the class."""
        from ..finetune.sfsl import fit_npca
        from ..labels import get_label_set
        from .dataset import WorldConfig, build_world

        world = self.workspace.root / "world-val"
        if not (world / "val").is_dir():
            build_world(WorldConfig(train_size=0, spurious_per_class=0, features_per_class=0), world)
        labels = get_label_set("world")
        # The features are those of finetune's SFSL model.
        sfsl_model = resolve_config(FinetuneConfig, self.settings, "finetune", {}).sfsl_model
        for name in classes:
            cls = labels.resolve(name)
            overrides = {"classes": [name], "images": str(world / "val" / f"{cls.index}-{cls.name}"),
                         "sfsl_model": sfsl_model}
            fit_npca(resolve_config(FitNpcaConfig, self.settings, "fit-npca", overrides), self.workspace)

    def train(self, classes: list[str], run: str, preset: str, seed: int, **sfsl: Any) -> None:
        from ..finetune import finetune

        overrides = {
            "classes": classes,
            "preset": preset,
            "run_name": run,
            "seed": seed,
            "steps": self.config.steps,
            **sfsl,
        }
        finetune(resolve_config(FinetuneConfig, self.settings, "finetune", overrides), self.workspace)

    def generate(self, classes: list[str], runs: list[str] | None = None) -> None:
        from ..generate import generate

        overrides = {"classes": classes, "num_images": self.config.num_images}
        overrides.update({"base": True} if runs is None else {"runs": runs})
        generate(resolve_config(GenerateConfig, self.settings, "generate", overrides), self.workspace)

    def scores(self, classes: list[str], runs: list[str]) -> dict[str, dict[str, dict[str, float]]]:
        """Per run and class: mean spurious accuracy over classifiers, and the consistently spurious rate."""
        from ..evaluate import evaluate

        evaluation = evaluate(resolve_config(EvaluateConfig, self.settings, "evaluate",
                                             {"classes": classes, "runs": runs}), self.workspace)
        table: dict[str, dict[str, dict[str, float]]] = {}
        for result in evaluation.results:
            table.setdefault(result.source.name, {})[result.cls.name] = {
                "spurious_accuracy": float(result.spurious_accuracy.mean()), "consistent": result.consistent_rate}
        return table


def _mean(scores: dict[str, dict[str, float]], key: str) -> float:
    return statistics.fmean(per_class[key] for per_class in scores.values())


def _tune(experiment: _Experiment) -> tuple[dict[str, Any], dict[str, Any]]:
    """Runs the grid on the tuning classes; returns every run's scores and the chosen SFSL setting."""
    config = experiment.config
    classes = config.tuning_classes
    # Every step, as the paper: --sfsl-every is judged separately, in the report.
    grid = {_run_name(k, t, "contrib"): {"sfsl_weight": k, "sfsl_max_timestep": t, "sfsl_feature": "contrib",
                                          "sfsl_every": 1}
            for k in config.kappas for t in config.bounds}
    experiment.train(classes, "dreambooth-te", "dreambooth-te", seed=0)
    for run, sfsl in grid.items():
        experiment.train(classes, run, "sfsl", seed=0, **sfsl)
    experiment.generate(classes, ["dreambooth-te", *grid])
    scores = experiment.scores(classes, ["dreambooth-te", *grid])
    best = max(grid, key=lambda run: _mean(scores[run], "spurious_accuracy"))
    # npca is tried at the best contrib setting only: a full second grid would double the cost for a
    # choice that the first grid already narrowed down.
    npca_run = _run_name(grid[best]["sfsl_weight"], grid[best]["sfsl_max_timestep"], "npca")
    grid[npca_run] = {**grid[best], "sfsl_feature": "npca"}
    experiment.fit_npca(classes)
    experiment.train(classes, npca_run, "sfsl", seed=0, **grid[npca_run])
    experiment.generate(classes, [npca_run])
    scores.update(experiment.scores(classes, [npca_run]))
    chosen = max(grid, key=lambda run: _mean(scores[run], "spurious_accuracy"))
    runs = {run: {"settings": grid.get(run), "scores": scores[run],
                  "mean_spurious_accuracy": _mean(scores[run], "spurious_accuracy"),
                  "mean_consistent": _mean(scores[run], "consistent")} for run in ["dreambooth-te", *grid]}
    return runs, {"run": chosen, **grid[chosen]}


def _paired_difference(scores: dict[str, dict[str, dict[str, float]]], run: str, baseline: str,
                       seeds: list[int], key: str = "spurious_accuracy") -> dict[str, float]:
    """Mean and standard error of ``run`` - ``baseline`` in ``key`` (``spurious_accuracy`` or ``consistent``),
    paired by class and seed (the two saw the same references, class images and seed)."""
    differences = [scores[f"{run}-s{seed}"][cls][key] - scores[f"{baseline}-s{seed}"][cls][key]
                   for seed in seeds for cls in scores["base"]]
    standard_error = statistics.stdev(differences) / math.sqrt(len(differences)) if len(differences) > 1 else math.nan
    return {"mean": statistics.fmean(differences), "standard_error": standard_error, "pairs": len(differences)}


def _report(experiment: _Experiment, chosen: dict[str, Any]) -> dict[str, Any]:
    """The ablation on the report classes with the chosen setting, every preset with every seed.

    Also ``sfsl-every4``: the chosen setting with ``--sfsl-every 4``, the cheap schedule that keeps SFSL within
    1.3x of a step at full size, to see whether the world can tell it from SFSL on every step.
    """
    config = experiment.config
    classes = config.report_classes
    sfsl = {key: chosen[key] for key in ("sfsl_weight", "sfsl_max_timestep", "sfsl_feature", "sfsl_every")}
    if sfsl["sfsl_feature"] == "npca":
        experiment.fit_npca(classes)
    variants = {"sfsl": ("sfsl", sfsl), "sfsl-every4": ("sfsl", {**sfsl, "sfsl_every": 4}),
                "dreambooth": ("dreambooth", {}), "dreambooth-te": ("dreambooth-te", {})}
    runs = {name: [f"{name}-s{seed}" for seed in config.seeds] for name in variants}
    # SFSL first: the baselines do not depend on the choice, so they may already have been trained meanwhile.
    for name, (preset, settings) in variants.items():
        for seed, run in zip(config.seeds, runs[name]):
            experiment.train(classes, run, preset, seed=seed, **settings)
    every_run = [run for names in runs.values() for run in names]
    experiment.generate(classes, every_run)
    experiment.generate(classes)  # the untouched model, feature prompt
    scores = experiment.scores(classes, ["base", *every_run])
    table = {"base": _row(scores, ["base"])}
    table.update({name: _row(scores, runs[name]) for name in ("dreambooth", "dreambooth-te", "sfsl", "sfsl-every4")})
    return {"classes": classes, "table2": table, "scores": scores,
            "sfsl_minus_dreambooth_te": _paired_difference(scores, "sfsl", "dreambooth-te", config.seeds),
            "sfsl_minus_dreambooth_te_consistent": _paired_difference(scores, "sfsl", "dreambooth-te", config.seeds,
                                                                      "consistent"),
            "sfsl_every4_minus_sfsl": _paired_difference(scores, "sfsl-every4", "sfsl", config.seeds),
            "sfsl_every4_minus_sfsl_consistent": _paired_difference(scores, "sfsl-every4", "sfsl", config.seeds,
                                                                    "consistent")}


def _row(scores: dict[str, dict[str, dict[str, float]]], runs: list[str]) -> dict[str, float]:
    """Mean and spread over a preset's seeds of the per-run means over classes."""
    per_run = {key: [_mean(scores[run], key) for run in runs] for key in ("spurious_accuracy", "consistent")}
    return {"spurious_accuracy": statistics.fmean(per_run["spurious_accuracy"]),
            "spurious_accuracy_std": statistics.pstdev(per_run["spurious_accuracy"]),
            "consistent": statistics.fmean(per_run["consistent"]), "runs": len(runs)}


def gather_evidence(config: EvidenceConfig, workspace: Workspace) -> dict[str, Any]:
    """Tunes SFSL on the tuning classes, reports the ablation on the others; writes ``reports/evidence.json``.

    Args:
        config: Classes, grid, seeds and run sizes.
        workspace: Where every run is trained, generated and evaluated (finished runs are kept).

    Returns:
        The tuning runs' scores, the chosen setting, the report's Table 2 and the SFSL - DreamBooth + text
        encoder difference with its standard error.
    """
    from .._runtime import console
    from ..workspace import atomic_write_json

    config.validate()
    started = time.perf_counter()
    experiment = _Experiment(workspace, config)
    experiment.select_refs(config.tuning_classes + config.report_classes)
    tuning, chosen = _tune(experiment)
    console.print(f"chosen on {', '.join(config.tuning_classes)}: {chosen}")
    report = _report(experiment, chosen)
    evidence = {"settings": asdict(config), "tuning": tuning, "chosen": chosen, "report": report,
                "seconds": time.perf_counter() - started}
    atomic_write_json(workspace.reports_dir / EVIDENCE_FILE, evidence)
    print_evidence(evidence)
    return evidence


def print_evidence(evidence: dict[str, Any]) -> None:
    """The tuning grid and the reported Table 2 as rich tables."""
    from rich.table import Table

    from .._runtime import console

    tuning = Table(title=f"tuning classes: {', '.join(evidence['settings']['tuning_classes'])}")
    for column in ("run", "spurious acc.", "consistent"):
        tuning.add_column(column)
    for run, row in evidence["tuning"].items():
        tuning.add_row(run, f"{row['mean_spurious_accuracy']:.1%}", f"{row['mean_consistent']:.1%}")
    console.print(tuning)
    report = evidence["report"]
    table = Table(title=f"Table 2 on the report classes: {', '.join(report['classes'])}")
    for column in ("run", "spurious acc. (mean over classifiers)", "± over seeds", "consistently spurious"):
        table.add_column(column)
    for run, row in report["table2"].items():
        table.add_row(
            run, f"{row['spurious_accuracy']:.1%}", f"{row['spurious_accuracy_std']:.1%}", f"{row['consistent']:.1%}"
        )
    console.print(table)
    for label, key in (("SFSL - DreamBooth + text encoder", "sfsl_minus_dreambooth_te"),
                       ("SFSL every 4 steps - SFSL every step", "sfsl_every4_minus_sfsl")):
        accuracy, consistent = report[key], report[f"{key}_consistent"]
        console.print(
            f"{label}: spurious acc. {accuracy['mean']:+.1%} ± {accuracy['standard_error']:.1%}, consistently "
            f"spurious {consistent['mean']:+.1%} ± {consistent['standard_error']:.1%} (standard errors over "
            f"{accuracy['pairs']} class x seed pairs)"
        )
