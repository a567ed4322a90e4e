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
from .config import SelectRefsConfig, help_for
from .errors import SpurgenError
from .workspace import DEFAULT_WORKSPACE, Workspace

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


def _user_errors(func: F) -> F:
    """Prints SpurgenError as one line and exits with its code; Ctrl-C says how to resume."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from rich.markup import escape

        from ._runtime import err_console

        try:
            return func(*args, **kwargs)
        except SpurgenError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]interrupted[/]: finished work is saved; run the same command again to resume",
                              highlight=False)
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


def _not_yet(stage: str, issue: str) -> Callable[[], None]:
    def command() -> None:
        raise SpurgenError(f"'spurgen {stage}' is not yet available in spurgen {__version__}; it lands with {issue}",
                           exit_code=2)

    command.__doc__ = f"(not yet available) the {stage} stage."
    return _user_errors(command)


for _stage in ("finetune", "generate", "evaluate"):
    if _stage not in {c.name for c in app.registered_commands}:
        app.command(_stage, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
            _not_yet(_stage, "a later release"))


def run() -> None:
    """Console-script entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
