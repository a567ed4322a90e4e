"""The ``spurgen`` command line: a thin Typer layer over the stage functions.

A command's settings options are generated from its config dataclass (:mod:`._cli_options`); only options that
are no setting (``--workspace``, ``--classifier``, ...) are written here. Each command resolves its settings
(defaults < spurgen.toml < flags), calls the stage function, and turns :class:`~spurgen.errors.SpurgenError` into
a one-line message and exit code 2. Heavy libraries (torch, diffusers, timm) and even the workspace module are
imported only inside commands, so ``--help`` is fast.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from . import __version__
from ._cli_options import config_options
from .config import (EvaluateConfig, ExportLoraConfig, FinetuneConfig, FitNpcaConfig, GenerateConfig, RateConfig,
                     RunConfig, SelectRefsConfig, help_for, resolve_config)
from .errors import SpurgenError, out_of_memory_message
from .world.demo import DemoConfig
from .world.evidence import EvidenceConfig
from .world.models import OUT_ENV, TEXT_TO_IMAGE_MODELS, text_to_image_model

if TYPE_CHECKING:
    from .workspace import Workspace

F = TypeVar("F", bound=Callable[..., Any])
C = TypeVar("C")
# Flags of a command: each given option's value by config field name, None where not given (see _cli_options).
Flags = dict[str, Any]
# The workspace without --workspace or SPURGEN_WORKSPACE; kept here, as --help must not import workspace.py.
DEFAULT_WORKSPACE = "spurgen-work"

app = typer.Typer(
    name="spurgen",
    help=("Generate spurious images — a class's spurious feature without the class object — that fool several "
          "ImageNet classifiers at once, by fine-tuning Stable Diffusion with a spurious feature similarity loss.\n\n"
          "Pipeline: select-refs -> finetune -> generate -> evaluate. Every command works in one workspace folder "
          "(--workspace, default ./spurgen-work) and finds the previous stage's outputs there."),
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)

WorkspaceOption = typer.Option(
    DEFAULT_WORKSPACE, "--workspace", "-w", envvar="SPURGEN_WORKSPACE",
    help="Workspace folder holding settings (spurgen.toml) and every stage's outputs.")
ClassifierOption = typer.Option(
    None, "--classifier", metavar="NAME=ARCH[@PATH]",
    help="Define or override a classifier (repeatable): a timm/hub id, or ARCH@PATH for local weights "
         "(safetensors, timm checkpoint, torchvision state dict, timm model folder).")


def _user_errors(func: F, resume: str = "run the same command again to resume") -> F:
    """Prints SpurgenError as one line and exits with its code; Ctrl-C says how to resume (``resume``).

    File-system errors and running out of GPU memory are the user's to fix as well: one line and exit code 2.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from rich.markup import escape

        from ._runtime import err_console

        def fail(message: str, code: int) -> typer.Exit:
            # Messages quote what the user typed; a line break or NUL in it must not break the one line.
            message = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in message)
            err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
            return typer.Exit(code)

        try:
            return func(*args, **kwargs)
        except SpurgenError as exc:
            raise fail(str(exc), exc.exit_code) from None
        except OSError as exc:
            # A file-system failure outside spurgen's own checks (a name too long for the file system, a disk
            # that fills up inside a library's write) is the user's to fix as well: say which file and why.
            raise fail(f"cannot use {exc.filename or 'a file'}: {exc.strerror or exc}; check the path, free disk "
                       "space or choose a writable --workspace", 2) from None
        except RuntimeError as exc:  # torch.cuda.OutOfMemoryError is one: the failure users hit most on a GPU
            message = out_of_memory_message(exc)
            if message is None:
                raise
            raise fail(message, 2) from None
        except KeyboardInterrupt:
            err_console.print(f"[yellow]interrupted[/]: finished work is saved; {escape(resume)}", highlight=False)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"spurgen {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool | None = typer.Option(None, "--version", callback=_version_callback, is_eager=True,
                                           help="Show the version and exit."),
) -> None:
    """spurgen command line."""


def _stage(config_cls: type[C], section: str, flags: Flags, workspace: Path) -> tuple[Workspace, C]:
    """The workspace and a stage's settings: defaults < spurgen.toml < the flags given.

    Args:
        config_cls: The stage's config dataclass.
        section: Its table in ``spurgen.toml``, e.g. ``"select-refs"``.
        flags: The generated options' values (``None`` where not given).
        workspace: The ``--workspace`` folder.
    """
    from .workspace import Workspace

    ws = Workspace(workspace)
    return ws, resolve_config(config_cls, ws.settings(), section, flags)


@app.command("select-refs")
@_user_errors
@config_options(SelectRefsConfig, after={"classifier": "classifiers"})
def select_refs_command(
    flags: Flags,
    classifier: list[str] | None = ClassifierOption,
    workspace: Path = WorkspaceOption,
) -> None:
    """Select each class's reference images: the spurious images that every classifier predicts as the class.

    Copies the top -k images (ranked by their weakest classifier vote) to refs/<index>-<name>/ with
    selection.json. Exit code 1 when some class has no consistently spurious image.
    """
    from .select_refs import print_selection_table, select_refs

    ws, config = _stage(SelectRefsConfig, "select-refs", flags, workspace)
    results = select_refs(config, ws, classifier_flags=classifier or [])
    names = list(results[0].spurious_per_classifier) if results else []
    print_selection_table(results, names)
    typer.echo(f"references written under {ws.root / 'refs'}")
    if not all(r.ok for r in results):
        raise typer.Exit(1)


@app.command("finetune")
# An unfinished run continues only with --resume (without it, finetune refuses to touch it).
@functools.partial(_user_errors, resume="run the same command with --resume to continue")
@config_options(FinetuneConfig)
def finetune_command(
    flags: Flags,
    classifier: list[str] | None = ClassifierOption,
    workspace: Path = WorkspaceOption,
) -> None:
    """Fine-tune Stable Diffusion on each class's references: DreamBooth + prior preservation + SFSL, LoRA or full.

    Reads refs/<index>-<name>/ (spurgen select-refs) and writes models/<index>-<name>/<run>/: the LoRA file or a
    diffusers folder, validation images, README.md and training.json ("status": "complete" once finished). The
    three --preset runs (dreambooth, dreambooth-te, sfsl) are the paper's ablation. Several GPUs:
    accelerate launch -m spurgen finetune ...
    """
    from ._runtime import console
    from .finetune import finetune, print_finetune_table

    ws, config = _stage(FinetuneConfig, "finetune", flags, workspace)
    results = finetune(config, ws, classifier_flags=classifier or [])
    print_finetune_table(results)
    console.print(f"models written under {ws.root / 'models'}", highlight=False, soft_wrap=True)


@app.command("fit-npca")
@_user_errors
@config_options(FitNpcaConfig)
def fit_npca_command(
    flags: Flags,
    classifier: list[str] | None = ClassifierOption,
    workspace: Path = WorkspaceOption,
) -> None:
    """Fit a class's neural PCA for finetune --sfsl-feature npca, from a folder of real images of the class.

    The neural PCA is Spurious ImageNet's class-wise PCA of the --sfsl-model's last-layer contributions
    w_k * phi(x). Writes npca/<sfsl-model>/<index>-<name>.safetensors in the workspace.
    """
    from .finetune.sfsl import fit_npca

    ws, config = _stage(FitNpcaConfig, "fit-npca", flags, workspace)
    fit = fit_npca(config, ws, classifier_flags=classifier or [])
    typer.echo(f"{fit.cls}: neural PCA of {fit.dimensions} '{fit.classifier}' features fitted on {fit.num_images} "
               f"images (variance share of the first components: {', '.join(map(str, fit.top_variance))}); "
               f"written to {fit.path}")


@app.command("generate")
@_user_errors
@config_options(GenerateConfig, after={"classifier": "classifiers"})
def generate_command(
    flags: Flags,
    classifier: list[str] | None = ClassifierOption,
    workspace: Path = WorkspaceOption,
) -> None:
    """Sample images from each class's fine-tuned models (or, with --base, the untouched base model).

    Writes generated/<index>-<name>/<run>/00000.png ... with generation.json. Image i uses seed SEED + i, so the
    images do not depend on --batch-size, and running the same command again makes only the missing ones.
    """
    from .generate import generate, print_generation_table

    ws, config = _stage(GenerateConfig, "generate", flags, workspace)
    results = generate(config, ws, classifier_flags=classifier or [])
    print_generation_table(results)
    typer.echo(f"{sum(r.made for r in results)} new images, {sum(r.existing for r in results)} already there, "
               f"under {ws.root / 'generated'}")
    if config.until is not None:
        accepted, total = sum(r.accepted or 0 for r in results), sum(r.total for r in results)
        typer.echo(f"{accepted} of {total} images passed --filter {','.join(config.filter)} "
                   f"(acceptance rate {accepted / total if total else 0:.0%})")


@app.command("export-lora")
@_user_errors
@config_options(ExportLoraConfig)
def export_lora_command(
    flags: Flags,
    workspace: Path = WorkspaceOption,
) -> None:
    """Write a fine-tuned run's LoRA (or a --checkpoint's) as one .safetensors file for other tools.

    --format kohya gives the lora_unet_... / lora_te_... keys (SDXL: lora_te1_... / lora_te2_...) that AUTOMATIC1111's
    WebUI, ComfyUI, SD.Next and InvokeAI load; --format diffusers the file diffusers' load_lora_weights reads. The
    metadata names the base model by its hub id or folder name, never by a path of this machine.
    """
    from .export_lora import export_lora
    from .workspace import Workspace

    ws = Workspace(workspace)
    config = resolve_config(ExportLoraConfig, ws.settings(), "export-lora", flags)
    result = export_lora(config, ws)
    typer.echo(f"{result.cls} run {result.run}: {result.tensors} tensors in {result.format} format written to "
               f"{result.out}")


@app.command("evaluate")
@_user_errors
@config_options(EvaluateConfig, after={"classifier": "classifiers"})
def evaluate_command(
    flags: Flags,
    classifier: list[str] | None = ClassifierOption,
    workspace: Path = WorkspaceOption,
) -> None:
    """Measure how spurious each class's images are for each classifier: generated runs, references, data sets.

    Per class, source and classifier: spurious accuracy (top-1 = the class), top-5 rate, mean class probability,
    and the rate of images every classifier predicts as the class. Writes reports/evaluation.json, .csv and
    report.html; prints Table 1 (and Table 2 when several runs exist).
    """
    from .evaluate import evaluate, print_evaluation_tables

    ws, config = _stage(EvaluateConfig, "evaluate", flags, workspace)
    evaluation = evaluate(config, ws, classifier_flags=classifier or [])
    print_evaluation_tables(evaluation)
    images = sum(len(r.files) for r in evaluation.results)
    typer.echo(f"{images} images of {len(evaluation.classes)} class(es) evaluated; report: "
               f"{evaluation.reports / 'report.html'}")
    if evaluation.export:
        typer.echo(f"exported {evaluation.exported} consistently spurious images to {evaluation.export}")


@app.command("run")
@_user_errors
@config_options(RunConfig)
def run_command(
    flags: Flags,
    dry_run: bool = typer.Option(False, "--dry-run",
                                 help="Print what would run, be skipped (complete) or resumed, and stop."),
    classifier: list[str] | None = ClassifierOption,
    workspace: Path = WorkspaceOption,
) -> None:
    """Run select-refs, finetune, generate for every class and grid run, then evaluate them all.

    Every other setting comes from spurgen.toml: its top level and each stage's table (\\[select-refs], \\[finetune],
    \\[generate], \\[evaluate]); \\[run] holds these options. Stages whose outputs are complete are skipped, interrupted
    ones resume, and a class that fails does not stop the others (exit code 1 at the end). Several GPUs:
    accelerate launch -m spurgen run ...
    """
    from .evaluate import print_evaluation_tables
    from .run import plan_run, print_plan, run_all

    ws, config = _stage(RunConfig, "run", flags, workspace)
    if dry_run:
        print_plan(*plan_run(config, ws))
        return
    summary = run_all(config, ws, classifier_flags=classifier or [])
    if summary.evaluation is not None:
        print_evaluation_tables(summary.evaluation)
        typer.echo(f"report: {summary.evaluation.reports / 'report.html'}")
    typer.echo(f"{len(summary.classes) - len(summary.failures)} of {len(summary.classes)} class(es) complete")
    for cls, problem in summary.failures.items():
        typer.echo(f"failed: {cls}: {problem}", err=True)
    if summary.failures:
        raise typer.Exit(1)


@app.command("rate")
@_user_errors
@config_options(RateConfig)
def rate_command(
    export: bool = typer.Option(False, "--export", help="Write every rating to the CSV file PATH (default: "
                                "reports/ratings.csv in the workspace) and exit without serving."),
    path: Path | None = typer.Argument(None, metavar="PATH", help="The CSV file of --export."),
    *,
    flags: Flags,
    workspace: Path = WorkspaceOption,
) -> None:
    """Serve the rating page of a human study: naturalness 1-5 and "do you see the class object?" per image.

    The images are a shuffled mix of references, generated images and (with --dataset) Spurious ImageNet images,
    their source hidden. Raters enter a name once; every click is saved to ratings/<rater>.json, and a rater
    resumes where they stopped. Needs the rate extra: pip install 'spurgen\\[rate]'.
    """
    from .rate import export_ratings_csv, rate
    from .workspace import Workspace

    ws = Workspace(workspace)
    if export:
        target, rows = export_ratings_csv(ws, path)
        typer.echo(f"{rows} ratings written to {target}")
        return
    if path is not None:
        raise SpurgenError(f"{path} is only used with --export; pass --export {path}, or leave it out to serve")
    config = resolve_config(RateConfig, ws.settings(), "rate", flags)
    rate(config, ws)


@app.command("demo")
@_user_errors
@config_options(DemoConfig)
def demo_command(
    flags: Flags,
    workspace: Path = typer.Option("spurgen-demo", "--workspace", "-w", help="Workspace of the demo."),
) -> None:
    """Run the whole method on the synthetic world: select-refs, the three finetune presets, generate, evaluate.

    Everything is real (diffusers and timm models shipped with spurgen), only small: it runs on a laptop CPU.
    The workspace can be explored with the ordinary commands afterwards (its spurgen.toml points at the world).
    """
    from .workspace import Workspace
    from .world.demo import run_demo

    config = resolve_config(DemoConfig, {}, "demo", flags)
    run_demo(config, Workspace(workspace))


@app.command("classes")
@_user_errors
def classes_command(
    query: str | None = typer.Argument(None, help="Only classes whose name contains this text."),
    labels: str = typer.Option("imagenet", "--labels", help=help_for(SelectRefsConfig, "labels")),
    everything: bool = typer.Option(False, "--all-classes",
                                    help="List every class of the label set, not only those 'all' selects."),
) -> None:
    """List the classes of a label set (for ImageNet: the 100 Spurious ImageNet classes) and their spurious features."""
    from rich.table import Table

    from ._runtime import console
    from .labels import get_label_set

    label_set = get_label_set(labels)
    table = Table(title=f"label set '{label_set.name}'")
    for column in ("index", "name", "synset", "spurious feature"):
        table.add_column(column)
    for info in label_set.search(query, everything):
        table.add_row(str(info.index), info.name, info.synset or "", info.spurious_feature or "")
    console.print(table)


@app.command("classifiers")
@_user_errors
def classifiers_command(
    labels: str = typer.Option("imagenet", "--labels", help=help_for(SelectRefsConfig, "labels")),
    classifier: list[str] | None = ClassifierOption,
    workspace: Path = WorkspaceOption,
) -> None:
    """List the configured classifiers: built-in ones, spurgen.toml's \\[classifiers], and --classifier flags."""
    from rich.table import Table

    from ._runtime import console
    from .classifiers import configured_classifiers
    from .workspace import Workspace

    specs = configured_classifiers(labels, Workspace(workspace).settings().get("classifiers"), classifier or [])
    table = Table(title="classifiers ('all' selects every row)")
    for column in ("name", "architecture", "weights", "description"):
        table.add_column(column)
    for spec in specs.values():
        weights = spec.path or ("[red]required: --classifier NAME=ARCH@PATH[/]" if spec.needs_path else "timm / hub")
        table.add_row(spec.name, spec.arch, weights, spec.description)
    console.print(table)


world_app = typer.Typer(help="The synthetic spurious world behind `spurgen demo`.", no_args_is_help=True)
app.add_typer(world_app, name="world")


@world_app.command("build")
@_user_errors
def world_build_command(
    work: Path = typer.Option("spurgen-world-build", "--work", help="Scratch folder: the rendered world and resumable "
                                                                    "checkpoints."),
    threads: int = typer.Option(1, "--threads", help="torch threads for training (1 is fastest on a busy 2-core "
                                                     "machine)."),
    text_to_image: str = typer.Option(
        ",".join(TEXT_TO_IMAGE_MODELS), "--text-to-image",
        help="Text-to-image models to build, comma-separated (v: v-prediction; epsilon: SD's epsilon and "
             "scaled_linear schedule, started from v). A model built in --out or shipped is kept."),
    out: Path | None = typer.Option(
        None, "--out", envvar=OUT_ENV, show_default=False,
        help="Where the trained models go; the demo looks there first (default: $XDG_CACHE_HOME/spurgen/world, "
             "else ~/.cache/spurgen/world)."),
) -> None:
    """Render the world and train the models it needs, from scratch (seeded; resumable).

    Writes only what this installation lacks (its shipped models are read only, and kept) into --out.
    """
    from dataclasses import replace

    from ._runtime import console
    from .world.build import WorldBuildConfig, build_world_models

    names = [name.strip() for name in text_to_image.split(",") if name.strip()]
    for name in names:
        text_to_image_model(name)  # an unknown name fails before anything is built
    config = WorldBuildConfig()
    config.classifiers = replace(config.classifiers, threads=threads)
    config.text_to_image = {name: replace(settings, threads=threads) for name, settings in config.text_to_image.items()}
    # In the table's order: a model is built after the base it starts from.
    config.text_to_image_models = [name for name in TEXT_TO_IMAGE_MODELS if name in names]
    summary = build_world_models(work, config, out=out.expanduser() if out is not None else None, log=console.print)
    console.print({"timings_seconds": summary["timings"],
                   **{f"{name}: {kind}_recognised": rates[f"{kind}_prompt_mean"]
                      for name, rates in summary["recognition"].items() for kind in ("object", "feature")}})


@world_app.command("evidence")
@_user_errors
@config_options(EvidenceConfig)
def world_evidence_command(
    workspace: Path = typer.Option("spurgen-evidence", "--workspace", "-w",
                                   help="Workspace of every run (finished runs are kept)."),
    *,
    flags: Flags,
) -> None:
    """Choose SFSL's defaults on some world classes and report the three presets' Table 2 on the others.

    Writes reports/evidence.json; the README's evidence table comes from it.
    """
    from .workspace import Workspace
    from .world.evidence import gather_evidence

    config = resolve_config(EvidenceConfig, {}, "evidence", flags)
    gather_evidence(config, Workspace(workspace))


def run() -> None:
    """Console-script entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Our own rich progress bars cover model loading; the libraries' tqdm bars would interleave with them.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    app()
