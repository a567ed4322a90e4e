"""The ``spurgen`` command line: a thin Typer layer over the stage functions.

Each command resolves its settings (defaults < spurgen.toml < flags), calls the stage function,
and turns :class:`~spurgen.errors.SpurgenError` into a one-line message and exit code 2. Heavy
libraries (torch, diffusers, timm) are imported only inside commands, so ``--help`` is fast.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import typer

from . import __version__
from .config import (EvaluateConfig, FinetuneConfig, FitNpcaConfig, GenerateConfig, RateConfig, RunConfig,
                     SelectRefsConfig, help_for)
from .errors import SpurgenError
from .workspace import DEFAULT_WORKSPACE, Workspace
from .world.demo import DemoConfig
from .world.evidence import EvidenceConfig
from .world.models import OUT_ENV

F = TypeVar("F", bound=Callable[..., Any])

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
    """Prints SpurgenError as one line and exits with its code; Ctrl-C says how to resume (``resume``)."""

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
    version: Optional[bool] = typer.Option(None, "--version", callback=_version_callback, is_eager=True,
                                           help="Show the version and exit."),
) -> None:
    """spurgen command line."""


def _split(values: Optional[list[str]]) -> Optional[list[str]]:
    """Joins repeated and comma-separated values: ``--classes a,b --classes c``."""
    if values is None:
        return None
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


@app.command("select-refs")
@_user_errors
def select_refs_command(
    classes: Optional[list[str]] = typer.Option(None, "--classes", "-c", help=help_for(SelectRefsConfig, "classes")),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help=help_for(SelectRefsConfig, "dataset")),
    images: Optional[Path] = typer.Option(None, "--images", help=help_for(SelectRefsConfig, "images")),
    classifiers: Optional[list[str]] = typer.Option(None, "--classifiers", help=help_for(SelectRefsConfig, "classifiers")),
    classifier: Optional[list[str]] = ClassifierOption,
    k: Optional[int] = typer.Option(None, "-k", "--k", help=help_for(SelectRefsConfig, "k")),
    crop: Optional[str] = typer.Option(None, "--crop", help=help_for(SelectRefsConfig, "crop")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=help_for(SelectRefsConfig, "batch_size")),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help=help_for(SelectRefsConfig, "num_workers")),
    device: Optional[str] = typer.Option(None, "--device", help=help_for(SelectRefsConfig, "device")),
    labels: Optional[str] = typer.Option(None, "--labels", help=help_for(SelectRefsConfig, "labels")),
    workspace: Path = WorkspaceOption,
) -> None:
    """Select each class's reference images: the spurious images that every classifier predicts as the class.

    Copies the top -k images (ranked by their weakest classifier vote) to refs/<index>-<name>/ with
    selection.json. Exit code 1 when some class has no consistently spurious image.
    """
    from .config import resolve_config
    from .select_refs import print_selection_table, select_refs

    ws = Workspace(workspace)
    config = resolve_config(SelectRefsConfig, ws.settings(), "select-refs", {
        "classes": _split(classes), "dataset": _path(dataset), "images": _path(images),
        "classifiers": _split(classifiers), "k": k, "crop": crop, "batch_size": batch_size,
        "num_workers": num_workers, "device": device, "labels": labels})
    results = select_refs(config, ws, classifier_flags=classifier or [])
    names = list(results[0].spurious_per_classifier) if results else []
    print_selection_table(results, names)
    typer.echo(f"references written under {ws.root / 'refs'}")
    if not all(r.ok for r in results):
        raise typer.Exit(1)


def _class_weights(values: Optional[list[str]]) -> Optional[dict[str, float]]:
    """Parses ``--class-sfsl-weight hummingbird=0.2,koala=0.05`` (repeatable) into a table."""
    if values is None:
        return None
    table: dict[str, float] = {}
    for item in _split(values) or []:
        name, sep, kappa = item.rpartition("=")
        try:
            table[name.strip()] = float(kappa)
        except ValueError:
            name = ""
        if not sep or not name.strip():
            raise SpurgenError(f"--class-sfsl-weight: bad entry {item!r}; write CLASS=KAPPA, e.g. hummingbird=0.2")
    return table


@app.command("finetune")
# An unfinished run continues only with --resume (without it, finetune refuses to touch it).
@functools.partial(_user_errors, resume="run the same command with --resume to continue")
def finetune_command(
    classes: Optional[list[str]] = typer.Option(None, "--classes", "-c", help=help_for(FinetuneConfig, "classes")),
    model: Optional[str] = typer.Option(None, "--model", help=help_for(FinetuneConfig, "model")),
    preset: Optional[str] = typer.Option(None, "--preset", help=help_for(FinetuneConfig, "preset")),
    run_name: Optional[str] = typer.Option(None, "--run-name", help=help_for(FinetuneConfig, "run_name")),
    identifier: Optional[str] = typer.Option(None, "--identifier", help=help_for(FinetuneConfig, "identifier")),
    noun: Optional[str] = typer.Option(None, "--noun", help=help_for(FinetuneConfig, "noun")),
    instance_prompt: Optional[str] = typer.Option(None, "--instance-prompt", help=help_for(FinetuneConfig, "instance_prompt")),
    class_prompt: Optional[str] = typer.Option(None, "--class-prompt", help=help_for(FinetuneConfig, "class_prompt")),
    train_text_encoder: Optional[bool] = typer.Option(None, "--train-text-encoder/--no-train-text-encoder", show_default=False, help=help_for(FinetuneConfig, "train_text_encoder")),
    lora: Optional[bool] = typer.Option(None, "--lora/--full", show_default=False, help=help_for(FinetuneConfig, "lora")),
    rank: Optional[int] = typer.Option(None, "--rank", help=help_for(FinetuneConfig, "rank")),
    alpha: Optional[float] = typer.Option(None, "--alpha", help=help_for(FinetuneConfig, "alpha")),
    learning_rate: Optional[float] = typer.Option(None, "--learning-rate", "--lr", help=help_for(FinetuneConfig, "learning_rate")),
    text_encoder_lr: Optional[float] = typer.Option(None, "--text-encoder-lr", help=help_for(FinetuneConfig, "text_encoder_lr")),
    lr_scheduler: Optional[str] = typer.Option(None, "--lr-scheduler", help=help_for(FinetuneConfig, "lr_scheduler")),
    lr_warmup_steps: Optional[int] = typer.Option(None, "--lr-warmup-steps", help=help_for(FinetuneConfig, "lr_warmup_steps")),
    adam_weight_decay: Optional[float] = typer.Option(None, "--adam-weight-decay", help=help_for(FinetuneConfig, "adam_weight_decay")),
    max_grad_norm: Optional[float] = typer.Option(None, "--max-grad-norm", help=help_for(FinetuneConfig, "max_grad_norm")),
    use_8bit_adam: Optional[bool] = typer.Option(None, "--use-8bit-adam", show_default=False, help=help_for(FinetuneConfig, "use_8bit_adam")),
    steps: Optional[int] = typer.Option(None, "--steps", help=help_for(FinetuneConfig, "steps")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=help_for(FinetuneConfig, "batch_size")),
    gradient_accumulation_steps: Optional[int] = typer.Option(None, "--gradient-accumulation-steps", help=help_for(FinetuneConfig, "gradient_accumulation_steps")),
    resolution: Optional[int] = typer.Option(None, "--resolution", help=help_for(FinetuneConfig, "resolution")),
    seed: Optional[int] = typer.Option(None, "--seed", help=help_for(FinetuneConfig, "seed")),
    mixed_precision: Optional[str] = typer.Option(None, "--mixed-precision", help=help_for(FinetuneConfig, "mixed_precision")),
    gradient_checkpointing: Optional[bool] = typer.Option(None, "--gradient-checkpointing/--no-gradient-checkpointing", show_default=False, help=help_for(FinetuneConfig, "gradient_checkpointing")),
    attention: Optional[str] = typer.Option(None, "--attention", help=help_for(FinetuneConfig, "attention")),
    device: Optional[str] = typer.Option(None, "--device", help=help_for(FinetuneConfig, "device")),
    prior_preservation: Optional[bool] = typer.Option(None, "--prior-preservation/--no-prior-preservation", show_default=False, help=help_for(FinetuneConfig, "prior_preservation")),
    prior_weight: Optional[float] = typer.Option(None, "--prior-weight", help=help_for(FinetuneConfig, "prior_weight")),
    num_class_images: Optional[int] = typer.Option(None, "--num-class-images", help=help_for(FinetuneConfig, "num_class_images")),
    sample_steps: Optional[int] = typer.Option(None, "--sample-steps", help=help_for(FinetuneConfig, "sample_steps")),
    guidance_scale: Optional[float] = typer.Option(None, "--guidance-scale", help=help_for(FinetuneConfig, "guidance_scale")),
    sample_batch_size: Optional[int] = typer.Option(None, "--sample-batch-size", help=help_for(FinetuneConfig, "sample_batch_size")),
    sfsl_weight: Optional[float] = typer.Option(None, "--sfsl-weight", help=help_for(FinetuneConfig, "sfsl_weight")),
    class_sfsl_weight: Optional[list[str]] = typer.Option(None, "--class-sfsl-weight", metavar="CLASS=KAPPA", help=help_for(FinetuneConfig, "class_sfsl_weight")),
    sfsl_model: Optional[str] = typer.Option(None, "--sfsl-model", help=help_for(FinetuneConfig, "sfsl_model")),
    sfsl_feature: Optional[str] = typer.Option(None, "--sfsl-feature", help=help_for(FinetuneConfig, "sfsl_feature")),
    sfsl_npca_components: Optional[str] = typer.Option(None, "--sfsl-npca-components", help=help_for(FinetuneConfig, "sfsl_npca_components")),
    sfsl_max_timestep: Optional[int] = typer.Option(None, "--sfsl-max-timestep", help=help_for(FinetuneConfig, "sfsl_max_timestep")),
    sfsl_every: Optional[int] = typer.Option(None, "--sfsl-every", help=help_for(FinetuneConfig, "sfsl_every")),
    sfsl_decoder: Optional[str] = typer.Option(None, "--sfsl-decoder", help=help_for(FinetuneConfig, "sfsl_decoder")),
    checkpointing_steps: Optional[int] = typer.Option(None, "--checkpointing-steps", help=help_for(FinetuneConfig, "checkpointing_steps")),
    checkpoints_total_limit: Optional[int] = typer.Option(None, "--checkpoints-total-limit", help=help_for(FinetuneConfig, "checkpoints_total_limit")),
    resume: Optional[bool] = typer.Option(None, "--resume", show_default=False, help=help_for(FinetuneConfig, "resume")),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", show_default=False, help=help_for(FinetuneConfig, "overwrite")),
    validation_steps: Optional[int] = typer.Option(None, "--validation-steps", help=help_for(FinetuneConfig, "validation_steps")),
    num_validation_images: Optional[int] = typer.Option(None, "--num-validation-images", help=help_for(FinetuneConfig, "num_validation_images")),
    tensorboard: Optional[bool] = typer.Option(None, "--tensorboard", show_default=False, help=help_for(FinetuneConfig, "tensorboard")),
    labels: Optional[str] = typer.Option(None, "--labels", help=help_for(FinetuneConfig, "labels")),
    classifier: Optional[list[str]] = ClassifierOption,
    workspace: Path = WorkspaceOption,
) -> None:
    """Fine-tune Stable Diffusion on each class's references: DreamBooth + prior preservation + SFSL, LoRA or full.

    Reads refs/<index>-<name>/ (spurgen select-refs) and writes models/<index>-<name>/<run>/: the LoRA file or a
    diffusers folder, validation images, README.md and training.json ("status": "complete" once finished). The
    three --preset runs (dreambooth, dreambooth-te, sfsl) are the paper's ablation. Several GPUs:
    accelerate launch -m spurgen finetune ...
    """
    from ._runtime import console
    from .config import resolve_config
    from .finetune import finetune, print_finetune_table

    ws = Workspace(workspace)
    config = resolve_config(FinetuneConfig, ws.settings(), "finetune", {
        "classes": _split(classes), "model": model, "preset": preset, "run_name": run_name, "identifier": identifier,
        "noun": noun, "instance_prompt": instance_prompt, "class_prompt": class_prompt,
        "train_text_encoder": train_text_encoder, "lora": lora, "rank": rank, "alpha": alpha,
        "learning_rate": learning_rate, "text_encoder_lr": text_encoder_lr, "lr_scheduler": lr_scheduler,
        "lr_warmup_steps": lr_warmup_steps, "adam_weight_decay": adam_weight_decay, "max_grad_norm": max_grad_norm,
        "use_8bit_adam": use_8bit_adam, "steps": steps, "batch_size": batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps, "resolution": resolution, "seed": seed,
        "mixed_precision": mixed_precision, "gradient_checkpointing": gradient_checkpointing, "attention": attention,
        "device": device, "prior_preservation": prior_preservation, "prior_weight": prior_weight,
        "num_class_images": num_class_images, "sample_steps": sample_steps, "guidance_scale": guidance_scale,
        "sample_batch_size": sample_batch_size, "sfsl_weight": sfsl_weight,
        "class_sfsl_weight": _class_weights(class_sfsl_weight), "sfsl_model": sfsl_model, "sfsl_feature": sfsl_feature,
        "sfsl_npca_components": sfsl_npca_components, "sfsl_max_timestep": sfsl_max_timestep,
        "sfsl_every": sfsl_every, "sfsl_decoder": sfsl_decoder,
        "checkpointing_steps": checkpointing_steps, "checkpoints_total_limit": checkpoints_total_limit,
        "resume": resume, "overwrite": overwrite, "validation_steps": validation_steps,
        "num_validation_images": num_validation_images, "tensorboard": tensorboard, "labels": labels})
    results = finetune(config, ws, classifier_flags=classifier or [])
    print_finetune_table(results)
    console.print(f"models written under {ws.root / 'models'}", highlight=False, soft_wrap=True)


@app.command("fit-npca")
@_user_errors
def fit_npca_command(
    classes: Optional[list[str]] = typer.Option(None, "--classes", "-c", help=help_for(FitNpcaConfig, "classes")),
    images: Optional[Path] = typer.Option(None, "--images", help=help_for(FitNpcaConfig, "images")),
    sfsl_model: Optional[str] = typer.Option(None, "--sfsl-model", help=help_for(FitNpcaConfig, "sfsl_model")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=help_for(FitNpcaConfig, "batch_size")),
    device: Optional[str] = typer.Option(None, "--device", help=help_for(FitNpcaConfig, "device")),
    labels: Optional[str] = typer.Option(None, "--labels", help=help_for(FitNpcaConfig, "labels")),
    classifier: Optional[list[str]] = ClassifierOption,
    workspace: Path = WorkspaceOption,
) -> None:
    """Fit a class's neural PCA for finetune --sfsl-feature npca, from a folder of real images of the class.

    The neural PCA is Spurious ImageNet's class-wise PCA of the --sfsl-model's last-layer contributions
    w_k * phi(x). Writes npca/<sfsl-model>/<index>-<name>.safetensors in the workspace.
    """
    from .config import resolve_config
    from .sfsl import fit_npca

    ws = Workspace(workspace)
    config = resolve_config(FitNpcaConfig, ws.settings(), "fit-npca", {
        "classes": _split(classes), "images": _path(images), "sfsl_model": sfsl_model, "batch_size": batch_size,
        "device": device, "labels": labels})
    fit = fit_npca(config, ws, classifier_flags=classifier or [])
    typer.echo(f"{fit.cls}: neural PCA of {fit.dimensions} '{fit.classifier}' features fitted on {fit.num_images} "
               f"images (variance share of the first components: {', '.join(map(str, fit.top_variance))}); "
               f"written to {fit.path}")


@app.command("generate")
@_user_errors
def generate_command(
    classes: Optional[list[str]] = typer.Option(None, "--classes", "-c", help=help_for(GenerateConfig, "classes")),
    runs: Optional[list[str]] = typer.Option(None, "--runs", "--run", help=help_for(GenerateConfig, "runs")),
    base: Optional[bool] = typer.Option(None, "--base", help=help_for(GenerateConfig, "base"), show_default=False),
    model: Optional[str] = typer.Option(None, "--model", help=help_for(GenerateConfig, "model")),
    num_images: Optional[int] = typer.Option(None, "-n", "--num-images", help=help_for(GenerateConfig, "num_images")),
    prompt: Optional[str] = typer.Option(None, "--prompt", help=help_for(GenerateConfig, "prompt")),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt", help=help_for(GenerateConfig, "negative_prompt")),
    steps: Optional[int] = typer.Option(None, "--steps", help=help_for(GenerateConfig, "steps")),
    guidance: Optional[float] = typer.Option(None, "--guidance", help=help_for(GenerateConfig, "guidance")),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help=help_for(GenerateConfig, "scheduler")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=help_for(GenerateConfig, "batch_size")),
    seed: Optional[int] = typer.Option(None, "--seed", help=help_for(GenerateConfig, "seed")),
    resolution: Optional[int] = typer.Option(None, "--resolution", help=help_for(GenerateConfig, "resolution")),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=help_for(GenerateConfig, "dtype")),
    device: Optional[str] = typer.Option(None, "--device", help=help_for(GenerateConfig, "device")),
    labels: Optional[str] = typer.Option(None, "--labels", help=help_for(GenerateConfig, "labels")),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite", help=help_for(GenerateConfig, "overwrite"), show_default=False),
    until: Optional[int] = typer.Option(None, "--until", help=help_for(GenerateConfig, "until")),
    filter: Optional[list[str]] = typer.Option(None, "--filter", help=help_for(GenerateConfig, "filter")),
    max_images: Optional[int] = typer.Option(None, "--max-images", help=help_for(GenerateConfig, "max_images")),
    classifiers: Optional[list[str]] = typer.Option(None, "--classifiers", help=help_for(GenerateConfig, "classifiers")),
    classifier: Optional[list[str]] = ClassifierOption,
    crop: Optional[str] = typer.Option(None, "--crop", help=help_for(GenerateConfig, "crop")),
    quality: Optional[str] = typer.Option(None, "--quality", help=help_for(GenerateConfig, "quality")),
    quality_weights: Optional[Path] = typer.Option(None, "--quality-weights", help=help_for(GenerateConfig, "quality_weights")),
    clip_model: Optional[str] = typer.Option(None, "--clip-model", help=help_for(GenerateConfig, "clip_model")),
    clip_weights: Optional[Path] = typer.Option(None, "--clip-weights", help=help_for(GenerateConfig, "clip_weights")),
    clip_margin: Optional[float] = typer.Option(None, "--clip-margin", help=help_for(GenerateConfig, "clip_margin")),
    workspace: Path = WorkspaceOption,
) -> None:
    """Sample images from each class's fine-tuned models (or, with --base, the untouched base model).

    Writes generated/<index>-<name>/<run>/00000.png ... with generation.json. Image i uses seed SEED + i, so the
    images do not depend on --batch-size, and running the same command again makes only the missing ones.
    """
    from .config import resolve_config
    from .generate import generate, print_generation_table

    ws = Workspace(workspace)
    config = resolve_config(GenerateConfig, ws.settings(), "generate", {
        "classes": _split(classes), "runs": _split(runs), "base": base, "model": model, "num_images": num_images,
        "prompt": prompt, "negative_prompt": negative_prompt, "steps": steps, "guidance": guidance,
        "scheduler": scheduler, "batch_size": batch_size, "seed": seed, "resolution": resolution, "dtype": dtype,
        "device": device, "labels": labels, "overwrite": overwrite, "until": until, "filter": _split(filter),
        "max_images": max_images, "classifiers": _split(classifiers), "crop": crop, "quality": quality,
        "quality_weights": _path(quality_weights), "clip_model": clip_model, "clip_weights": _path(clip_weights),
        "clip_margin": clip_margin})
    results = generate(config, ws, classifier_flags=classifier or [])
    print_generation_table(results)
    typer.echo(f"{sum(r.made for r in results)} new images, {sum(r.existing for r in results)} already there, "
               f"under {ws.root / 'generated'}")
    if config.until is not None:
        accepted, total = sum(r.accepted or 0 for r in results), sum(r.total for r in results)
        typer.echo(f"{accepted} of {total} images passed --filter {','.join(config.filter)} "
                   f"(acceptance rate {accepted / total if total else 0:.0%})")


@app.command("evaluate")
@_user_errors
def evaluate_command(
    classes: Optional[list[str]] = typer.Option(None, "--classes", "-c", help=help_for(EvaluateConfig, "classes")),
    runs: Optional[list[str]] = typer.Option(None, "--runs", "--run", help=help_for(EvaluateConfig, "runs")),
    refs: Optional[bool] = typer.Option(None, "--refs/--no-refs", help=help_for(EvaluateConfig, "refs"), show_default=False),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help=help_for(EvaluateConfig, "dataset")),
    images: Optional[list[str]] = typer.Option(None, "--images", metavar="[NAME=]DIR", help=help_for(EvaluateConfig, "images")),
    val_images: Optional[Path] = typer.Option(None, "--val-images", help=help_for(EvaluateConfig, "val_images")),
    classifiers: Optional[list[str]] = typer.Option(None, "--classifiers", help=help_for(EvaluateConfig, "classifiers")),
    classifier: Optional[list[str]] = ClassifierOption,
    crop: Optional[str] = typer.Option(None, "--crop", help=help_for(EvaluateConfig, "crop")),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=help_for(EvaluateConfig, "batch_size")),
    num_workers: Optional[int] = typer.Option(None, "--num-workers", help=help_for(EvaluateConfig, "num_workers")),
    device: Optional[str] = typer.Option(None, "--device", help=help_for(EvaluateConfig, "device")),
    labels: Optional[str] = typer.Option(None, "--labels", help=help_for(EvaluateConfig, "labels")),
    quality: Optional[str] = typer.Option(None, "--quality", help=help_for(EvaluateConfig, "quality")),
    quality_weights: Optional[Path] = typer.Option(None, "--quality-weights", help=help_for(EvaluateConfig, "quality_weights")),
    min_quality: Optional[float] = typer.Option(None, "--min-quality", help=help_for(EvaluateConfig, "min_quality")),
    export: Optional[Path] = typer.Option(None, "--export", help=help_for(EvaluateConfig, "export")),
    report_images: Optional[int] = typer.Option(None, "--report-images", help=help_for(EvaluateConfig, "report_images")),
    drop_object_present: Optional[bool] = typer.Option(None, "--drop-object-present", help=help_for(EvaluateConfig, "drop_object_present"), show_default=False),
    workspace: Path = WorkspaceOption,
) -> None:
    """Measure how spurious each class's images are for each classifier: generated runs, references, data sets.

    Per class, source and classifier: spurious accuracy (top-1 = the class), top-5 rate, mean class probability,
    and the rate of images every classifier predicts as the class. Writes reports/evaluation.json, .csv and
    report.html; prints Table 1 (and Table 2 when several runs exist).
    """
    from .config import resolve_config
    from .evaluate import evaluate, print_evaluation_tables

    ws = Workspace(workspace)
    config = resolve_config(EvaluateConfig, ws.settings(), "evaluate", {
        "classes": _split(classes), "runs": _split(runs), "refs": refs, "dataset": _path(dataset), "images": images,
        "val_images": _path(val_images), "classifiers": _split(classifiers), "crop": crop, "batch_size": batch_size,
        "num_workers": num_workers, "device": device, "labels": labels, "quality": quality,
        "quality_weights": _path(quality_weights), "min_quality": min_quality, "export": _path(export),
        "report_images": report_images, "drop_object_present": drop_object_present})
    evaluation = evaluate(config, ws, classifier_flags=classifier or [])
    print_evaluation_tables(evaluation)
    images = sum(len(r.files) for r in evaluation.results)
    typer.echo(f"{images} images of {len(evaluation.classes)} class(es) evaluated; report: "
               f"{evaluation.reports / 'report.html'}")
    if evaluation.export:
        typer.echo(f"exported {evaluation.exported} consistently spurious images to {evaluation.export}")


def _numbers(values: Optional[list[str]], kind: Callable[[str], Any], flag: str) -> Optional[list[Any]]:
    """Parses ``--sfsl-weight 0.05,0.1`` (repeatable) into numbers of type ``kind``."""
    if values is None:
        return None
    try:
        return [kind(v) for v in _split(values) or []]
    except ValueError:
        raise SpurgenError(f"{flag}: expected numbers separated by commas, e.g. 0.05,0.1,0.2; got {','.join(values)}") from None


@app.command("run")
@_user_errors
def run_command(
    classes: Optional[list[str]] = typer.Option(None, "--classes", "-c", help=help_for(RunConfig, "classes")),
    presets: Optional[list[str]] = typer.Option(None, "--presets", help=help_for(RunConfig, "presets")),
    sfsl_weight: Optional[list[str]] = typer.Option(None, "--sfsl-weight", help=help_for(RunConfig, "sfsl_weight")),
    labels: Optional[str] = typer.Option(None, "--labels", help=help_for(RunConfig, "labels")),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would run, be skipped (complete) or resumed, and stop."),
    classifier: Optional[list[str]] = ClassifierOption,
    workspace: Path = WorkspaceOption,
) -> None:
    """Run select-refs, finetune, generate for every class and grid run, then evaluate them all.

    Every other setting comes from spurgen.toml: its top level and each stage's table (\\[select-refs], \\[finetune],
    \\[generate], \\[evaluate]); \\[run] holds these options. Stages whose outputs are complete are skipped, interrupted
    ones resume, and a class that fails does not stop the others (exit code 1 at the end). Several GPUs:
    accelerate launch -m spurgen run ...
    """
    from .config import resolve_config
    from .evaluate import print_evaluation_tables
    from .run import plan_run, print_plan, run_all

    ws = Workspace(workspace)
    config = resolve_config(RunConfig, ws.settings(), "run", {
        "classes": _split(classes), "presets": _split(presets), "sfsl_weight": _numbers(sfsl_weight, float, "--sfsl-weight"),
        "labels": labels})
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
def rate_command(
    export: bool = typer.Option(False, "--export", help="Write every rating to the CSV file PATH (default: reports/ratings.csv in the workspace) and exit without serving."),
    path: Optional[Path] = typer.Argument(None, metavar="PATH", help="The CSV file of --export."),
    classes: Optional[list[str]] = typer.Option(None, "--classes", "-c", help=help_for(RateConfig, "classes")),
    dataset: Optional[Path] = typer.Option(None, "--dataset", help=help_for(RateConfig, "dataset")),
    max_images: Optional[int] = typer.Option(None, "--max-images", help=help_for(RateConfig, "max_images")),
    seed: Optional[int] = typer.Option(None, "--seed", help=help_for(RateConfig, "seed")),
    image_size: Optional[int] = typer.Option(None, "--image-size", help=help_for(RateConfig, "image_size")),
    host: Optional[str] = typer.Option(None, "--host", help=help_for(RateConfig, "host")),
    port: Optional[int] = typer.Option(None, "--port", help=help_for(RateConfig, "port")),
    labels: Optional[str] = typer.Option(None, "--labels", help=help_for(RateConfig, "labels")),
    workspace: Path = WorkspaceOption,
) -> None:
    """Serve the rating page of a human study: naturalness 1-5 and "do you see the class object?" per image.

    The images are a shuffled mix of references, generated images and (with --dataset) Spurious ImageNet images,
    their source hidden. Raters enter a name once; every click is saved to ratings/<rater>.json, and a rater
    resumes where they stopped. Needs the rate extra: pip install 'spurgen\\[rate]'.
    """
    from .config import resolve_config
    from .rate import export_ratings_csv, rate

    ws = Workspace(workspace)
    if export:
        target, rows = export_ratings_csv(ws, path)
        typer.echo(f"{rows} ratings written to {target}")
        return
    if path is not None:
        raise SpurgenError(f"{path} is only used with --export; pass --export {path}, or leave it out to serve")
    config = resolve_config(RateConfig, ws.settings(), "rate", {
        "classes": _split(classes), "dataset": _path(dataset), "max_images": max_images, "seed": seed,
        "image_size": image_size, "host": host, "port": port, "labels": labels})
    rate(config, ws)


@app.command("demo")
@_user_errors
def demo_command(
    classes: Optional[list[str]] = typer.Option(None, "--classes", "-c", help=help_for(DemoConfig, "classes")),
    steps: Optional[int] = typer.Option(None, "--steps", help=help_for(DemoConfig, "steps")),
    num_images: Optional[int] = typer.Option(None, "-n", "--num-images", help=help_for(DemoConfig, "num_images")),
    workspace: Path = typer.Option("spurgen-demo", "--workspace", "-w", help="Workspace of the demo."),
) -> None:
    """Run the whole method on the built-in synthetic world: select-refs, the three finetune presets, generate, evaluate.

    Everything is real (diffusers and timm models shipped with spurgen), only small: it runs on a laptop CPU.
    The workspace can be explored with the ordinary commands afterwards (its spurgen.toml points at the world).
    """
    from .config import resolve_config
    from .world.demo import run_demo

    config = resolve_config(DemoConfig, {}, "demo", {"classes": _split(classes), "steps": steps,
                                                      "num_images": num_images})
    run_demo(config, Workspace(workspace))


def _path(value: Optional[Path]) -> Optional[str]:
    return str(value.expanduser()) if value is not None else None


@app.command("classes")
@_user_errors
def classes_command(
    query: Optional[str] = typer.Argument(None, help="Only classes whose name contains this text."),
    labels: str = typer.Option("imagenet", "--labels", help=help_for(SelectRefsConfig, "labels")),
    everything: bool = typer.Option(False, "--all-classes", help="List every class of the label set, not only those 'all' selects."),
) -> None:
    """List the classes of a label set (for ImageNet: the 100 Spurious ImageNet classes) and their spurious features."""
    from rich.table import Table

    from ._runtime import console
    from .labels import get_label_set, normalize_name

    label_set = get_label_set(labels)
    indices = sorted(label_set.classes) if everything else list(label_set.default_indices)
    table = Table(title=f"label set '{label_set.name}'")
    for column in ("index", "name", "synset", "spurious feature"):
        table.add_column(column)
    for index in indices:
        info = label_set[index]
        if query and normalize_name(query) not in normalize_name(" ".join((info.name, *info.aliases))):
            continue
        table.add_row(str(info.index), info.name, info.synset or "", info.spurious_feature or "")
    console.print(table)


@app.command("classifiers")
@_user_errors
def classifiers_command(
    labels: str = typer.Option("imagenet", "--labels", help=help_for(SelectRefsConfig, "labels")),
    classifier: Optional[list[str]] = ClassifierOption,
    workspace: Path = WorkspaceOption,
) -> None:
    """List the configured classifiers: built-in ones, spurgen.toml's \\[classifiers], and --classifier flags."""
    from rich.table import Table

    from ._runtime import console
    from .classifiers import configured_classifiers

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
    work: Path = typer.Option("spurgen-world-build", "--work", help="Scratch folder: the rendered world and resumable checkpoints."),
    threads: int = typer.Option(1, "--threads", help="torch threads for training (1 is fastest on a busy 2-core machine)."),
    out: Optional[Path] = typer.Option(
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

    config = WorldBuildConfig()
    config.classifiers = replace(config.classifiers, threads=threads)
    config.text_to_image = replace(config.text_to_image, threads=threads)
    summary = build_world_models(work, config, out=out.expanduser() if out is not None else None, log=console.print)
    console.print({"timings_seconds": summary["timings"],
                   "object_prompt_recognised": summary["recognition"]["object_prompt_mean"],
                   "feature_prompt_recognised": summary["recognition"]["feature_prompt_mean"]})


@world_app.command("evidence")
@_user_errors
def world_evidence_command(
    workspace: Path = typer.Option("spurgen-evidence", "--workspace", "-w", help="Workspace of every run (finished runs are kept)."),
    tuning_classes: Optional[list[str]] = typer.Option(None, "--tuning-classes", help=help_for(EvidenceConfig, "tuning_classes")),
    report_classes: Optional[list[str]] = typer.Option(None, "--report-classes", help=help_for(EvidenceConfig, "report_classes")),
    kappas: Optional[list[str]] = typer.Option(None, "--kappas", help=help_for(EvidenceConfig, "kappas")),
    bounds: Optional[list[str]] = typer.Option(None, "--bounds", help=help_for(EvidenceConfig, "bounds")),
    seeds: Optional[list[str]] = typer.Option(None, "--seeds", help=help_for(EvidenceConfig, "seeds")),
    steps: Optional[int] = typer.Option(None, "--steps", help=help_for(EvidenceConfig, "steps")),
    num_images: Optional[int] = typer.Option(None, "-n", "--num-images", help=help_for(EvidenceConfig, "num_images")),
) -> None:
    """Choose SFSL's defaults on some world classes and report the three presets' Table 2 on the others.

    Writes reports/evidence.json; the README's evidence table comes from it.
    """
    from .config import resolve_config
    from .world.evidence import gather_evidence

    config = resolve_config(EvidenceConfig, {}, "evidence", {
        "tuning_classes": _split(tuning_classes), "report_classes": _split(report_classes),
        "kappas": _numbers(kappas, float, "--kappas"), "bounds": _numbers(bounds, int, "--bounds"),
        "seeds": _numbers(seeds, int, "--seeds"), "steps": steps, "num_images": num_images})
    gather_evidence(config, Workspace(workspace))


def run() -> None:
    """Console-script entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Our own rich progress bars cover model loading; the libraries' tqdm bars would interleave with them.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    app()
