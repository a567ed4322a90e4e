"""Where ``spurgen evaluate`` finds each class's images: generated runs, references, Spurious ImageNet, folders."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .._runtime import warn
from ..config import EvaluateConfig
from ..errors import SpurgenError
from ..images import class_image_files, list_images
from ..labels import ClassInfo, LabelSet
from ..workspace import BASE_RUN, GENERATION_FILE, SELECTION_FILE, Workspace, read_json, workspace_classes
from .results import Source

__all__ = ["DATASET_SOURCE", "REFS_SOURCE", "resolve_classes", "collect_sources", "val_files"]

DATASET_SOURCE = "spurious-imagenet"
REFS_SOURCE = "refs"


def _generated_sources(workspace: Workspace, cls: ClassInfo, runs: Sequence[str]) -> list[Source]:
    """The class's finished generated runs; a run named explicitly must be finished and non-empty.

    Raises:
        SpurgenError: a named run has no images, or its generation is incomplete.
    """
    every = "all" in runs
    folder = workspace.class_generated_dir(cls)
    if every:
        found = ([p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
                 if folder.is_dir() else [])
        names = sorted(found, key=lambda name: (name != BASE_RUN, name))  # the baseline first
    else:
        names = list(runs)
    sources = []
    for run in names:
        run_dir = workspace.generated_dir(cls, run)
        manifest = read_json(run_dir / GENERATION_FILE) if (run_dir / GENERATION_FILE).is_file() else None
        entries = (manifest or {}).get("images", [])
        files = tuple(run_dir / entry["file"] for entry in entries)
        # An image the safety checker blanked is a black square: counting it would lower every measure.
        blanked = {run_dir / entry["file"] for entry in entries if entry.get("nsfw_flagged")}
        if manifest is None or not files:
            problem = (f"{run_dir} has no generated images; run 'spurgen generate --classes {cls.index}"
                       f"{' --base' if run == BASE_RUN else f' --runs {run}'}' first")
        elif manifest.get("status") != "complete":
            problem = (f"{run_dir}: generation is incomplete ({len(files)} of {manifest.get('num_images')} images); "
                       "run the same 'spurgen generate' command again to finish it")
        elif len(blanked) == len(files):
            problem = (f"{run_dir}: the safety checker blanked all {len(files)} images; generate them again with "
                       "--no-safety-checker --overwrite")
        else:
            sources.append(Source(run, "generated", run_dir, tuple(f for f in files if f not in blanked),
                                  blanked=len(blanked)))
            continue
        if not every:
            raise SpurgenError(problem)
        warn(f"{problem}; skipped")
    return sources


def _refs_source(workspace: Workspace, cls: ClassInfo) -> Source | None:
    folder = workspace.refs_dir(cls)
    if not (folder / SELECTION_FILE).is_file():
        return None
    selected = read_json(folder / SELECTION_FILE).get("selected", [])
    return Source(REFS_SOURCE, "refs", folder, tuple(folder / name for name in selected)) if selected else None


def _folder_sources(spec: str, classes: Sequence[ClassInfo]) -> dict[int, Source]:
    """``[NAME=]DIR``: a plain folder of one class's images, or a folder in Spurious ImageNet's layout."""
    name, sep, path = spec.partition("=")
    if not sep or "/" in name or not name:
        name, path = "", spec
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise SpurgenError(f"--images {spec}: {folder} is not a folder; give [NAME=]DIR")
    plain = bool(list_images(folder))
    files = class_image_files(classes, None if plain else str(folder), str(folder) if plain else None)
    name = name or folder.name
    return {c.index: Source(name, "images", folder, tuple(files[c.index])) for c in classes}


def collect_sources(config: EvaluateConfig, workspace: Workspace,
                    classes: Sequence[ClassInfo]) -> dict[int, list[Source]]:
    """Every source of every class, checked before any model loads.

    Raises:
        SpurgenError: a missing folder, a name used twice, or a class with nothing to evaluate.
    """
    dataset = class_image_files(classes, config.dataset, None) if config.dataset else {}
    folders = [_folder_sources(spec, classes) for spec in config.images]
    found: dict[int, list[Source]] = {}
    for cls in classes:
        sources = []
        if config.dataset:
            sources.append(Source(DATASET_SOURCE, "dataset", Path(config.dataset).expanduser(),
                                  tuple(dataset[cls.index])))
        refs = _refs_source(workspace, cls) if config.refs else None
        if refs:
            sources.append(refs)
        sources.extend(folder[cls.index] for folder in folders)
        sources.extend(_generated_sources(workspace, cls, config.runs))
        names = [s.name for s in sources]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise SpurgenError(f"source name '{twice[0]}' is used twice for {cls}; name --images sources with NAME=DIR")
        if not sources:
            raise SpurgenError(f"nothing to evaluate for {cls}: no finished generated images in "
                               f"{workspace.class_generated_dir(cls)}, no references; run 'spurgen generate' first "
                               "or pass --dataset / --images")
        found[cls.index] = sources
    return found


def val_files(spec: str, classes: Sequence[ClassInfo]) -> dict[int, list[Path]]:
    """Real images of each class for the spurious score: per-class sub-folders, or one plain folder.

    Raises:
        SpurgenError: the folder or a class's sub-folder is missing or holds no images.
    """
    root = Path(spec).expanduser()
    if not root.is_dir():
        raise SpurgenError(f"--val-images {root} is not a folder; give a folder of real class images")
    if len(classes) == 1 and list_images(root):
        return {classes[0].index: list_images(root)}
    found = {}
    for cls in classes:
        names = [n for n in (cls.synset, cls.dirname, str(cls.index)) if n]
        folder = next((root / n for n in names if (root / n).is_dir()), None)
        if folder is None:
            raise SpurgenError(f"--val-images {root} has no folder for {cls}; expected a sub-folder named "
                               f"{' or '.join(names)}")
        found[cls.index] = list_images(folder)
        if not found[cls.index]:
            raise SpurgenError(f"{folder} holds no images; put the class's real images there (.png/.jpg)")
    return found


def resolve_classes(config: EvaluateConfig, workspace: Workspace, labels: LabelSet) -> list[ClassInfo]:
    """The --classes, or else every class with generated images or references in the workspace.

    Raises:
        SpurgenError: no --classes and nothing in the workspace.
    """
    if config.classes:
        return labels.resolve_many(config.classes)
    found = {c.index: c for folder in ("generated", "refs") for c in workspace_classes(workspace.root / folder, labels)}
    if not found:
        raise SpurgenError(f"no generated images or references in {workspace.root}; pass --classes NAME with "
                           "--dataset or --images, or run 'spurgen generate' first")
    return [found[i] for i in sorted(found)]
