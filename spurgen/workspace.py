"""The workspace: one folder holding every stage's outputs at fixed places.

::

    spurgen.toml                      settings (optional)
    refs/94-hummingbird/              select-refs: reference images + selection.json
    models/94-hummingbird/<run>/      finetune: LoRA or full weights + training.json + README.md
    generated/94-hummingbird/<run>/   generate: PNGs + generation.json
    reports/                          evaluate: evaluation.json/.csv, report.html
    cache/                            predictions, class images, reference features

Each command finds the previous one's work here without flags. Every file is written to a
temporary name and renamed, so a crash never leaves a half-written file under its final name.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from .errors import SpurgenError
from .labels import ClassInfo, LabelSet

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser, as a package (a dependency there)
    import tomli as tomllib

__all__ = [
    "Workspace",
    "expand_home",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_directory",
    "remove_tree",
    "sweep_leftovers",
    "holds_json",
    "safe_name",
    "environment_versions",
    "workspace_classes",
    "list_checkpoints",
    "checkpoint_dir",
    "SELECTION_FILE",
    "TRAINING_FILE",
    "CHECKPOINTS",
    "CHECKPOINT_STATE",
    "LOSSES_FILE",
    "GENERATION_FILE",
    "BASE_RUN",
    "EVALUATION_FILE",
    "SUMMARY_CSV",
    "IMAGES_CSV",
    "REPORT_FILE",
    "EXPORT_MANIFEST",
    "LORA_EXPORTS",
]

SETTINGS_FILE = "spurgen.toml"
# Every manifest a stage writes, by name: a stage finds another's outputs through these names, never by
# importing that stage. A manifest is written last, so its presence marks the output finished.
SELECTION_FILE = "selection.json"  # refs/<class>/
TRAINING_FILE = "training.json"  # models/<class>/<run>/; finished when "status" is "complete"
CHECKPOINTS = "checkpoints"  # models/<class>/<run>/checkpoints/checkpoint-<step>/
CHECKPOINT_STATE = "spurgen_state.json"  # in each checkpoint: step, resume key, loss log
LOSSES_FILE = "losses.csv"  # models/<class>/<run>/
GENERATION_FILE = "generation.json"  # generated/<class>/<run>/
BASE_RUN = "base"  # generated/<class>/base/: the untouched base model's images
EVALUATION_FILE = "evaluation.json"  # reports/
SUMMARY_CSV = "evaluation.csv"  # reports/
IMAGES_CSV = "evaluation-images.csv"  # reports/
REPORT_FILE = "report.html"  # reports/
EXPORT_MANIFEST = "manifest.json"  # an evaluate --export folder
LORA_EXPORTS = "exports"  # exports/<class>/<run>[-checkpoint-N]-<format>.safetensors: spurgen export-lora
# The hidden names of spurgen's own unfinished writes, which a killed process leaves behind: atomic_write_bytes's
# files and atomic_directory's staging folders ``.<name>.<pid>-<random>.tmp``, folders set aside to be deleted
# ``.<name>.<pid>-<random>.old`` (also without the pid, as spurgen 0.x wrote them), finetune's checkpoint and
# output staging ``.checkpoint-<step>.tmp`` / ``.final-<pid>.tmp``, and ensure_writable's probe.
_LEFTOVER = re.compile(r"^\..+\.(?:(?P<pid>\d+)-)?[a-z0-9_]{8}\.(?:tmp|old)$|^\.checkpoint-\d+\.tmp$"
                       r"|^\.final-(?P<final_pid>\d+)\.tmp$|^\.spurgen-write-test$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,99}$")


def safe_name(name: str, what: str = "name") -> str:
    """Checks that a user-chosen name (run name, classifier name) is safe to use as one path part.

    Raises:
        SpurgenError: the name has separators, ``..``, spaces or non-ASCII characters.
    """
    if not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise SpurgenError(
            f"invalid {what} {name!r}; use 1-100 ASCII letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def _unique() -> str:
    """The middle of a temporary name: this process's id (so that a sweep can tell a live writer's files from a
    killed one's) and 8 random hex digits."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _writer_alive(pid: int) -> bool:
    """Whether another process with this id runs: its temporary files are work in progress, not leftovers."""
    if pid == os.getpid():  # a killed process's id, reused by this one (a container's first process)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, as another user
        return True
    return True


def sweep_leftovers(folder: Path, recursive: bool = True, beside: bool = True) -> list[Path]:
    """Deletes what killed writes left behind: spurgen's own hidden temporary files and folders, nothing else.

    Names of a writer that still runs are left alone, so a command started while another works in the same
    workspace does not pull its files away.

    Args:
        folder: A folder that the calling command owns (writes); a missing one is fine.
        recursive: Also sweep every sub-folder.
        beside: Also the staging and set-aside copies of ``folder`` itself (``.<folder name>.*`` beside it).

    Returns:
        The paths deleted.
    """
    folder = Path(folder)
    swept: list[Path] = []

    def visit(directory: Path, only_prefix: str | None, descend: bool) -> None:
        try:
            entries = list(os.scandir(directory))
        except OSError:  # missing, or not a folder: nothing was left there
            return
        for entry in entries:
            if only_prefix is not None and not entry.name.startswith(only_prefix):
                continue
            match = _LEFTOVER.match(entry.name)
            if match:
                pid = match.group("pid") or match.group("final_pid")
                if pid and _writer_alive(int(pid)):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    Path(entry.path).unlink(missing_ok=True)
                swept.append(Path(entry.path))
            elif descend and entry.is_dir(follow_symlinks=False):
                visit(Path(entry.path), None, True)

    visit(folder, None, recursive)
    if beside:
        visit(folder.parent, f".{folder.name}.", False)
    return swept


def _umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; some file systems do not support it, which is harmless.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file in the same folder and a rename.

    Raises:
        SpurgenError: the folder is not writable or the disk is full; ``path`` is left untouched.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{_unique()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # the folder itself is unusable (a file in the way, read-only): nothing was written
            pass
        raise SpurgenError(
            f"cannot write {path}: {exc.strerror or exc}; free disk space or choose a writable --workspace"
        ) from None
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yields an empty temporary folder beside ``final`` that replaces ``final`` on success.

    On an exception the temporary folder is removed and ``final`` keeps its old content. The
    swap renames the old folder aside first, so at no moment is a half-filled folder visible under
    the final name.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.{os.getpid()}-", suffix=".tmp", dir=final.parent))
        # mkdtemp makes the folder private (0700); the final folder should get the usual permissions, so
        # that a workspace shared by a group stays readable to it.
        staging.chmod(0o777 & ~_umask())
    except OSError as exc:
        raise SpurgenError(
            f"cannot write in {final.parent}: {exc.strerror or exc}; choose a writable --workspace"
        ) from None
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = final.with_name(f".{final.name}.{_unique()}.old")
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(final.parent)


def holds_json(path: Path, data: Any, ignore: tuple[str, ...] = ("created", "updated")) -> bool:
    """Whether the JSON file ``path`` already holds ``data`` as :func:`atomic_write_json` would write it, but for
    the top-level keys ``ignore`` (when it was written): a re-run then leaves a finished manifest untouched."""
    try:
        existing = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    new = json.loads(json.dumps(data, default=str))
    if not isinstance(existing, dict) or not isinstance(new, dict):
        return existing == new
    return ({k: v for k, v in existing.items() if k not in ignore} == {k: v for k, v in new.items() if k not in ignore})


def remove_tree(path: Path) -> None:
    """Deletes a folder, renamed aside to a temporary name first so that it is never seen half-deleted."""
    path = Path(path)
    if not path.exists():
        return
    aside = path.with_name(f".{path.name}.{_unique()}.old")
    os.replace(path, aside)
    shutil.rmtree(aside, ignore_errors=True)


def environment_versions() -> dict[str, str]:
    """Versions of Python and the libraries whose behaviour shapes the results, for manifests."""
    return dict(_environment_versions())


@functools.cache
def _environment_versions() -> tuple[tuple[str, str], ...]:
    # Speed: each metadata.version() scans the installed distributions (40-75 ms for these on a 2-core machine),
    # and generate asks once per run; the versions cannot change while the process runs.
    versions = {"python": platform.python_version(), "platform": sys.platform}
    for package in ("spurgen", "torch", "torchvision", "timm", "diffusers", "transformers", "peft",
                    "accelerate", "safetensors", "pillow"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return tuple(versions.items())


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def expand_home(path: Path | str) -> Path:
    """``path`` with a leading ``~`` or ``~user`` expanded.

    Raises:
        SpurgenError: ``~user`` names no user (or no home directory is known), which would otherwise surface as
            pathlib's RuntimeError.
    """
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise SpurgenError(f"{path}: its leading '~' names no known home directory; write the path out in "
                           "full") from None


class Workspace:
    """Paths of one workspace and its settings file.

    Args:
        root: The workspace folder; created on first write, not on construction.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = expand_home(root).resolve()

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    @property
    def settings_path(self) -> Path:
        return self.root / SETTINGS_FILE

    def settings(self) -> dict[str, Any]:
        """The parsed ``spurgen.toml`` (empty when absent).

        Raises:
            SpurgenError: malformed TOML, with the line and column named.
        """
        path = self.settings_path
        if not path.is_file():
            return {}
        try:
            return tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise SpurgenError(f"{path}: {exc}; fix the TOML syntax there") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SpurgenError(f"cannot read {path}: {exc}; check its permissions and encoding") from None

    def refs_dir(self, cls: ClassInfo) -> Path:
        return self.root / "refs" / cls.dirname

    def class_models_dir(self, cls: ClassInfo) -> Path:
        return self.root / "models" / cls.dirname

    def model_dir(self, cls: ClassInfo, run: str) -> Path:
        return self.class_models_dir(cls) / safe_name(run, "run name")

    def class_generated_dir(self, cls: ClassInfo) -> Path:
        return self.root / "generated" / cls.dirname

    def generated_dir(self, cls: ClassInfo, run: str) -> Path:
        return self.class_generated_dir(cls) / safe_name(run, "run name")

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    def cache_dir(self, *parts: str) -> Path:
        return self.root.joinpath("cache", *parts)

    def npca_path(self, classifier: str, cls: ClassInfo) -> Path:
        """Where fit-npca saves a class's neural PCA for one classifier: ``npca/<classifier>/<class>.safetensors``."""
        return self.root / "npca" / classifier / f"{cls.dirname}.safetensors"

    def finished_runs(self, cls: ClassInfo) -> dict[str, dict[str, Any]]:
        """``{run name: training.json}`` of the class's finished fine-tuning runs, by name."""
        runs = {}
        folder = self.class_models_dir(cls)
        for run_dir in sorted(folder.iterdir()) if folder.is_dir() else []:
            manifest = run_dir / TRAINING_FILE
            if run_dir.is_dir() and manifest.is_file():
                training = read_json(manifest)
                if training.get("status") == "complete":
                    runs[run_dir.name] = training
        return runs

    def ensure_writable(self, *owned: Path) -> None:
        """Creates the workspace and proves it writable before long work starts; sweeps a killed run's leftovers.

        Args:
            owned: The folders the command writes. What a killed run left in them (hidden ``.tmp``/``.old`` names,
                :func:`sweep_leftovers`) is deleted, and so is what it left at the workspace's top level.

        Raises:
            SpurgenError: the folder cannot be created or written.
        """
        atomic_write_bytes(self.root / ".spurgen-write-test", b"")
        (self.root / ".spurgen-write-test").unlink(missing_ok=True)
        sweep_leftovers(self.root, recursive=False, beside=False)  # run.json's, spurgen.toml's, the probe's
        for folder in owned:
            sweep_leftovers(folder)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """A run's finished checkpoints, oldest first (staging folders start with a dot and are not listed)."""
    found = [p for p in (run_dir / CHECKPOINTS).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where a run's checkpoint of optimizer step ``step`` is (or would be)."""
    return run_dir / CHECKPOINTS / f"checkpoint-{step}"


def read_json(path: Path) -> Any:
    """Reads a JSON manifest; a missing or corrupt one is a clear error, not a traceback."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpurgenError(f"{path} is missing; run the stage that writes it first") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpurgenError(f"{path} is unreadable ({exc}); delete it and re-run the stage that writes it") from None


def workspace_classes(folder: Path, labels: LabelSet) -> list[ClassInfo]:
    """The classes that have a sub-folder (``94-hummingbird``) in a workspace folder such as ``models/``."""
    found = []
    for sub in sorted(folder.iterdir()) if folder.is_dir() else []:
        index, _, _ = sub.name.partition("-")
        if sub.is_dir() and index.isdigit() and int(index) in labels.classes and labels[int(index)].dirname == sub.name:
            found.append(labels[int(index)])
    return sorted(found, key=lambda c: c.index)
