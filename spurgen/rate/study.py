"""The images of a rating study: each distinct image of the chosen classes once, by content hash, in a seeded order."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path

from .._runtime import console, progress_bar
from ..config import RateConfig
from ..errors import SpurgenError
from ..images import SpuriousImageNetFolder, file_sha256, list_images
from ..labels import ClassInfo, get_label_set
from ..workspace import GENERATION_FILE, Workspace, read_json

__all__ = ["SOURCES", "StudyImage", "Study", "build_study", "print_study_table"]

# In this order an image found in several places takes its source: a reference is also a data set image.
SOURCES = ("reference", "dataset", "generated")


@dataclass(frozen=True)
class StudyImage:
    """One image of a study and what its answers record about it."""

    sha256: str
    file: Path
    path: str
    source: str
    cls: ClassInfo
    run: str | None

    def question(self) -> str:
        article = "an" if self.cls.name[:1].lower() in "aeiou" else "a"
        return f"Do you see {article} {self.cls.name} in this image?"


@dataclass
class Study:
    """The images to rate, by content hash, and the seed of every rater's order."""

    images: dict[str, StudyImage]
    seed: int

    def order_for(self, rater: str) -> list[StudyImage]:
        """The rater's own order of the images.

        Sorting by a hash keyed with the seed and the rater is a seeded shuffle that stays stable when
        images are added mid-study (another generate run): the images keep their order relative to each other.
        """
        def key(image: StudyImage) -> bytes:
            return hashlib.sha256(f"{self.seed}\0{rater}\0{image.sha256}".encode()).digest()

        return sorted(self.images.values(), key=key)


def _generated_files(run_dir: Path) -> list[Path]:
    """A generate run's images, less those the safety checker blanked (black squares are no study material)."""
    manifest = read_json(run_dir / GENERATION_FILE)
    entries = manifest.get("images", []) if isinstance(manifest, dict) else []
    blanked = {entry.get("file") for entry in entries if isinstance(entry, dict) and entry.get("nsfw_flagged")}
    return [f for f in list_images(run_dir) if f.name not in blanked]


def _class_candidates(cls: ClassInfo, workspace: Workspace,
                      dataset: SpuriousImageNetFolder | None) -> dict[str, list[tuple[Path, str, str | None]]]:
    """One class's image files by source, each as (file, recorded path, generation run)."""
    found: dict[str, list[tuple[Path, str, str | None]]] = {source: [] for source in SOURCES}
    refs = workspace.refs_dir(cls)
    if refs.is_dir():
        found["reference"] = [(f, f.relative_to(workspace.root).as_posix(), None) for f in list_images(refs)]
    if dataset is not None:
        found["dataset"] = [(f, f.relative_to(dataset.root).as_posix(), None) for f in dataset.class_images(cls.index)]
    generated = workspace.class_generated_dir(cls)
    for run_dir in sorted(generated.iterdir()) if generated.is_dir() else []:
        # Hidden folders are atomic_directory's staging areas; a folder without the manifest is not a run.
        if run_dir.is_dir() and not run_dir.name.startswith(".") and (run_dir / GENERATION_FILE).is_file():
            found["generated"] += [(f, f.relative_to(workspace.root).as_posix(), run_dir.name)
                                   for f in _generated_files(run_dir)]
    return found


def build_study(config: RateConfig, workspace: Workspace) -> Study:
    """Collects and hashes the images of the configured classes.

    With ``max_images``, each class and source keeps a sample seeded by the study seed, so a restarted
    server offers the same images.

    Raises:
        SpurgenError: unknown classes, a malformed ``--dataset`` folder, or no image at all.
    """
    labels = get_label_set(config.labels)
    classes = labels.resolve_many(config.classes)
    dataset = SpuriousImageNetFolder(config.dataset) if config.dataset else None
    chosen: list[tuple[ClassInfo, str, Path, str, str | None]] = []
    for cls in classes:
        for source, files in _class_candidates(cls, workspace, dataset).items():
            if config.max_images is not None and len(files) > config.max_images:
                sample = random.Random(f"{config.seed}/{cls.index}/{source}").sample(files, config.max_images)
                files = sorted(sample)
            chosen += [(cls, source, file, path, run) for file, path, run in files]
    if not chosen:
        names = ", ".join(c.dirname for c in classes[:5]) + (", ..." if len(classes) > 5 else "")
        raise SpurgenError(f"no images to rate for {names}; run select-refs and generate first, "
                           "or pass Spurious ImageNet's 'images' folder to --dataset")
    images: dict[str, StudyImage] = {}
    with progress_bar("images") as progress:
        task = progress.add_task("hashing images", total=len(chosen))
        for cls, source, file, path, run in chosen:
            digest = file_sha256(file)
            # Sources come in SOURCES order per class, so the first one seen is the one that counts.
            images.setdefault(digest, StudyImage(digest, file, path, source, cls, run))
            progress.advance(task)
    return Study(images=images, seed=config.seed)


def print_study_table(study: Study) -> None:
    """Images per class and source; the rater never sees this split."""
    from rich.table import Table

    counts: dict[ClassInfo, dict[str, int]] = {}
    for image in study.images.values():
        per_source = counts.setdefault(image.cls, dict.fromkeys(SOURCES, 0))
        per_source[image.source] += 1
    table = Table(title=f"rating study: {len(study.images)} images")
    for column in ("class", *SOURCES, "total"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for cls in sorted(counts, key=lambda c: c.index):
        table.add_row(str(cls), *(str(counts[cls][s]) for s in SOURCES), str(sum(counts[cls].values())))
    console.print(table)
