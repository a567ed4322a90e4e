"""The catalogue of bad input: every case docs/reliability.md's "Reliability" table lists, tried through the CLI.

Each case prepares its files in a fresh folder, runs one command in-process and checks what the user sees:
the documented exit code, no traceback, for exit code 2 exactly one ``error:`` line that names the problem
and the fix (``<problem>; <fix>``), and that nothing already on disk changed (for exit code 2, that nothing
was written at all). The table in docs/reliability.md is rendered from :data:`CASES`; a test keeps the two identical.
"""

from __future__ import annotations

import errno
import importlib
import itertools
import json
import os
import pickle
import pkgutil
import re
import shutil
import struct
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

import spurgen.workspace
from spurgen.cli import app
from spurgen.errors import SpurgenError

RELIABILITY = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"
SEED_FILE = Path("ws") / "reports" / "evaluation.json"  # earlier work that no bad input may damage


@dataclass
class Env:
    """One case's folder: ``root/ws`` is the workspace, inputs go beside it."""

    root: Path
    request: pytest.FixtureRequest
    monkeypatch: pytest.MonkeyPatch

    @property
    def ws(self) -> Path:
        return self.root / "ws"

    def fixture(self, name: str) -> Any:
        return self.request.getfixturevalue(name)

    def res_a(self) -> list[str]:
        """Flags selecting the rigged classifier res-a only."""
        return ["--classifier", self.fixture("rigged").flags["res-a"], "--classifiers", "res-a", "--num-workers", "0"]

    def write(self, relative: str, data: bytes | str) -> Path:
        path = self.root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path


@dataclass(frozen=True)
class Case:
    """One bad input: ``prepare`` writes its files and returns the command line; ``expect`` is in the output."""

    id: str
    given: str
    sees: str
    expect: str
    prepare: Callable[[Env], list[str]]
    code: int = 2
    check: Callable[[Env], None] | None = None
    usage: bool = False  # refused by the command-line parser itself: click's usage box, exit code 2
    keeps_work: bool = False  # fails midway: what was done before the failure stays (and resumes); nothing changes

    @property
    def row(self) -> str:
        return f"| `{self.id}` | {self.given} | {self.sees} | {self.code} |"


# --- Preparing inputs ---------------------------------------------------------------------------------------------


def _select(env: Env, *extra: str) -> list[str]:
    return ["select-refs", "-w", str(env.ws), "--classes", "94", *env.res_a(), *extra]


def _select_data(env: Env, *extra: str) -> list[str]:
    """select-refs on the rigged data set: input checks past the images are reached."""
    return _select(env, "--dataset", str(env.fixture("rigged").dataset), *extra)


def _finetune(env: Env, *extra: str) -> list[str]:
    return ["finetune", "-w", str(env.ws), "--classes", "94", *extra]


def _generate(env: Env, *extra: str) -> list[str]:
    return ["generate", "-w", str(env.ws), "--classes", "94", *extra]


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds none: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _odd_image(kind: str) -> Callable[[Env], list[str]]:
    """A folder of the rigged hummingbird images plus one odd file ``odd.*`` of the given kind."""

    def prepare(env: Env) -> list[str]:
        folder = env.root / "images"
        folder.mkdir()
        sources = env.fixture("rigged").files[94]
        for source in sources:
            shutil.copy(source, folder / source.name)
        picture = Image.open(sources[0]).convert("RGB")
        if kind == "corrupt":
            env.write("images/odd.png", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
        elif kind == "truncated":
            env.write("images/odd.png", sources[0].read_bytes()[:300])
        elif kind == "zero-byte":
            env.write("images/odd.png", b"")
        elif kind == "bomb":
            env.write("images/odd.png", _png_header(100_000, 100_000))
        elif kind == "animated":
            frames = [picture, picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
            frames[0].save(folder / "odd.gif", save_all=True, append_images=frames[1:])
        elif kind == "cmyk":
            picture.convert("CMYK").save(folder / "odd.jpg")
        elif kind == "16-bit":
            grey = np.asarray(picture.convert("L"), dtype=np.uint16) * 257
            Image.fromarray(grey).save(folder / "odd.png")
        elif kind == "palette":
            picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(folder / "odd.png")
        return _select(env, "--images", str(folder), "-k", "2")

    return prepare


def _odd_image_verdict(skipped: bool) -> Callable[[Env], None]:
    """The odd file is listed as unreadable in selection.json (``skipped``), or classified like the others."""

    def check(env: Env) -> None:
        manifest = json.loads((env.ws / "refs" / "94-hummingbird" / "selection.json").read_text())
        unreadable = {Path(entry["file"]).name for entry in manifest["unreadable"]}
        assert any(name.startswith("odd.") for name in unreadable) == skipped, manifest["unreadable"]

    return check


def _dataset(env: Env, *folders: str) -> str:
    """A dataset folder holding the given (empty) class sub-folders."""
    for folder in folders:
        (env.root / "data" / folder).mkdir(parents=True)
    return str(env.root / "data")


def _toml(text: str | bytes, *command: str) -> Callable[[Env], list[str]]:
    def prepare(env: Env) -> list[str]:
        env.write("ws/spurgen.toml", text)
        return [command[0], "-w", str(env.ws), *command[1:]]

    return prepare


def _evil_pickle(root: Path, name: str) -> Path:
    """A weight file whose unpickling would create ``root/executed``."""
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    # Protocol 2 is torch's own: the refusal is about the payload, not the protocol.
    path.write_bytes(pickle.dumps({"fc.weight": _Payload(root / "executed")}, protocol=2))
    return path


class _Payload:
    """Unpickling this calls ``Path.touch`` on the marker: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        return (Path.touch, (self.marker,))


def _not_executed(env: Env) -> None:
    assert not (env.root / "executed").exists(), "the pickle payload ran"


def _write_refs(workspace: Path, images: list[Path]) -> None:
    """refs/94-hummingbird/ as select-refs leaves it: the images and selection.json."""
    folder = workspace / "refs" / "94-hummingbird"
    folder.mkdir(parents=True)
    names = []
    for source in images:
        shutil.copy(source, folder / source.name)
        names.append(source.name)
    (folder / "selection.json").write_text(json.dumps({"selected": names}))


def _lora_on_other_base(env: Env) -> list[str]:
    run = env.ws / "models" / "94-hummingbird" / "lora-x"
    shutil.copytree(env.fixture("tiny_lora_run"), run)
    training = json.loads((run / "training.json").read_text())
    other = env.fixture("other_base")
    training.update(base_model=str(other), base_model_resolved=str(other))
    (run / "training.json").write_text(json.dumps(training))
    return _generate(env, "--runs", "lora-x", "-n", "1", "--steps", "1", "--device", "cpu")


def _full_over_complete_lora(env: Env) -> list[str]:
    """finetune --full where the run of that name is a complete LoRA run."""
    _write_refs(env.ws, env.fixture("rigged").files[94][:2])
    run = env.ws / "models" / "94-hummingbird" / "sfsl"
    shutil.copytree(env.fixture("tiny_lora_run"), run)
    training = json.loads((run / "training.json").read_text())
    training.update(steps=800, settings={"preset": "sfsl", "lora": True, "rank": 16, "steps": 800})
    (run / "training.json").write_text(json.dumps(training))
    return _finetune(env, "--model", str(env.fixture("tiny_sd_dir")), "--full")


def _compile_without_compiler(env: Env) -> list[str]:
    """finetune --compile on, on a CPU where inductor finds no C++ compiler."""
    from torch._inductor import cpp_builder

    def missing() -> None:
        raise RuntimeError("no C++ compiler found")

    _write_refs(env.ws, env.fixture("rigged").files[94][:2])
    env.monkeypatch.setattr(cpp_builder, "get_cpp_compiler", missing)
    return _finetune(env, "--model", str(env.fixture("tiny_sd_dir")), "--compile", "on", "--device", "cpu")


def _lora_run(env: Env) -> Path:
    """A finished LoRA run 'lora-x' of hummingbird (no checkpoints) in the case's workspace."""
    run = env.ws / "models" / "94-hummingbird" / "lora-x"
    shutil.copytree(env.fixture("tiny_lora_run"), run)
    return run


def _resume_pickled_checkpoint(env: Env) -> list[str]:
    shutil.copytree(env.fixture("checkpointed_run"), env.ws)
    for optimizer in (env.ws / "models").rglob("optimizer.bin"):
        _evil_pickle(env.root, str(optimizer.relative_to(env.root)))
    return _finetune(env, "--model", str(env.fixture("tiny_sd_dir")), *CHECKPOINTED_RUN, "--resume", "--steps", "3")


def _failing_writes(code: int, after_probe: bool) -> Callable[[Env], list[str]]:
    """select-refs while every file write in the workspace fails with ``code`` (EROFS, ENOSPC).

    ``after_probe``: the start-up write test passes and later writes fail, as on a disk that fills up
    during the run. The tests run as root, so permissions cannot make a folder read-only; the write
    itself is made to fail instead.
    """

    def prepare(env: Env) -> list[str]:
        real_open = open

        def failing_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            path = Path(file)
            inside = path.resolve().is_relative_to(env.ws.resolve())
            if inside and set(mode) & set("wax") and not (after_probe and ".spurgen-write-test" in path.name):
                raise OSError(code, os.strerror(code), str(path))
            return real_open(file, mode, *args, **kwargs)

        env.monkeypatch.setattr(spurgen.workspace, "open", failing_open, raising=False)
        return _select(env, "--dataset", str(env.fixture("rigged").dataset))

    return prepare


def _disk_full_at_checkpoint(env: Env) -> list[str]:
    """finetune whose first checkpoint meets a full disk inside torch.save (accelerate's optimizer and RNG states)."""
    import torch

    _write_refs(env.ws, env.fixture("rigged").files[94][:2])
    real_save = torch.save

    def full_disk_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if isinstance(f, (str, os.PathLike)) and Path(f).resolve().is_relative_to(env.ws.resolve()):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        real_save(obj, f, *args, **kwargs)

    env.monkeypatch.setattr(torch, "save", full_disk_save)
    return _finetune(env, "--model", str(env.fixture("tiny_sd_dir")), "--steps", "2", *CHECKPOINTED_RUN)


def _checkpoint_write_fails(env: Env) -> list[str]:
    """finetune whose second checkpoint fails inside torch.save with the RuntimeError it raises for a failed write."""
    import torch

    _write_refs(env.ws, env.fixture("rigged").files[94][:2])
    real_save = torch.save

    def failing_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if ".checkpoint-2.tmp" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: "
                               "PytorchStreamWriter failed writing file data/0: file write failed")
        real_save(obj, f, *args, **kwargs)

    env.monkeypatch.setattr(torch, "save", failing_save)
    return _finetune(env, "--model", str(env.fixture("tiny_sd_dir")), "--steps", "2", *CHECKPOINTED_RUN)


def _out_of_memory(target: str, calls_before: int, prepare: Callable[[Env], list[str]]) -> Callable[[Env], list[str]]:
    """``prepare``'s command, where the stage function ``target`` (``module:name``) runs out of GPU memory.

    Args:
        target: What the stage calls; its ``calls_before + 1``-th call raises torch.cuda.OutOfMemoryError, as
            CUDA would on a GPU (the test runs on the CPU).
        calls_before: Calls that succeed first, so that some work is finished before the error.
        prepare: Writes the inputs and returns the command line.
    """

    def inject(env: Env) -> list[str]:
        import torch

        args = prepare(env)
        module, _, name = target.partition(":")
        owner_name, _, attribute = name.rpartition(".")
        owner = pkgutil.resolve_name(f"{module}:{owner_name}") if owner_name else importlib.import_module(module)
        real, calls = getattr(owner, attribute), itertools.count()

        def out_of_memory(*a: Any, **kw: Any) -> Any:
            if next(calls) >= calls_before:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                                  "capacity of 23.64 GiB of which 1.06 GiB is free.")
            return real(*a, **kw)

        env.monkeypatch.setattr(owner, attribute, out_of_memory)
        return args

    return inject


def _refs_and_evaluate(env: Env) -> list[str]:
    _write_refs(env.ws, env.fixture("rigged").files[94][:2])
    return ["evaluate", "-w", str(env.ws), "--classes", "94", *env.res_a()]


def _refs_and_finetune(env: Env) -> list[str]:
    _write_refs(env.ws, env.fixture("rigged").files[94][:2])
    return _finetune(env, "--model", str(env.fixture("tiny_sd_dir")), "--steps", "2", *CHECKPOINTED_RUN)


def _lora_and_generate(env: Env) -> list[str]:
    shutil.copytree(env.fixture("tiny_lora_run"), env.ws / "models" / "94-hummingbird" / "lora-x")
    return _generate(env, "--runs", "lora-x", "-n", "2", "--batch-size", "1", "--steps", "1", "--device", "cpu")


def _kept_checkpoint(env: Env) -> None:
    """The run is unfinished, its first checkpoint kept, and no half-written second one left behind."""
    _unfinished(env)
    checkpoints = env.ws / "models" / "94-hummingbird" / "dreambooth" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-1"]


def _kept_first_image(env: Env) -> None:
    run = env.ws / "generated" / "94-hummingbird" / "lora-x"
    assert sorted(p.name for p in run.glob("*.png")) == ["00000.png"]


def _unfinished(env: Env) -> None:
    manifest = json.loads((env.ws / "models" / "94-hummingbird" / "dreambooth" / "training.json").read_text())
    assert manifest["status"] != "complete"


def _long(text: str) -> str:
    return text * (300 // len(text) + 1)


CHECKPOINTED_RUN = ["--preset", "dreambooth", "--no-prior-preservation", "--num-validation-images", "0",
                    "--validation-steps", "0", "--checkpointing-steps", "1", "--rank", "2", "--device", "cpu"]


# --- The catalogue ------------------------------------------------------------------------------------------------

CASES: list[Case] = [
    # Images: broken files are skipped with a warning, odd formats are converted.
    Case(
        "image-corrupt",
        "a `.png` of random bytes among the images",
        "`warning: skipped unreadable image …/odd.png: cannot identify image file`; the other images are used, the "
        "file is listed under `unreadable` in `selection.json`",
        "skipped unreadable image",
        _odd_image("corrupt"),
        0,
        _odd_image_verdict(True),
    ),
    Case(
        "image-truncated",
        "a PNG cut after 300 bytes",
        "`warning: skipped unreadable image …` (truncated), listed under `unreadable`",
        "skipped unreadable image",
        _odd_image("truncated"),
        0,
        _odd_image_verdict(True),
    ),
    Case(
        "image-zero-byte",
        "an empty image file",
        "`warning: skipped unreadable image …: empty file (0 bytes)`",
        "empty file (0 bytes)",
        _odd_image("zero-byte"),
        0,
        _odd_image_verdict(True),
    ),
    Case(
        "image-bomb",
        "a PNG declaring 100000 x 100000 pixels (decompression bomb)",
        "`warning: skipped unreadable image …: decompression bomb refused` before any pixel is decoded",
        "decompression bomb refused",
        _odd_image("bomb"),
        0,
        _odd_image_verdict(True),
    ),
    Case(
        "image-animated",
        "an animated GIF",
        "fine input: its first frame is used",
        "references written under",
        _odd_image("animated"),
        0,
        _odd_image_verdict(False),
    ),
    Case(
        "image-cmyk",
        "a CMYK JPEG",
        "fine input: converted to RGB",
        "references written under",
        _odd_image("cmyk"),
        0,
        _odd_image_verdict(False),
    ),
    Case(
        "image-16-bit",
        "a 16-bit greyscale PNG",
        "fine input: rescaled to 8 bits (not clipped) and converted to RGB",
        "references written under",
        _odd_image("16-bit"),
        0,
        _odd_image_verdict(False),
    ),
    Case(
        "image-palette",
        "a palette (P mode) PNG",
        "fine input: converted to RGB",
        "references written under",
        _odd_image("palette"),
        0,
        _odd_image_verdict(False),
    ),
    # Folder layouts.
    Case(
        "layout-dataset-missing",
        "`--dataset` that does not exist",
        "`error: dataset folder … does not exist; pass Spurious ImageNet's 'images' folder to --dataset`",
        "does not exist",
        lambda env: _select(env, "--dataset", str(env.root / "missing")),
    ),
    Case(
        "layout-dataset-wrong",
        "`--dataset` with a sub-folder `hummingbird/` instead of `spurious_imagenet_94_hummingbird_1/`",
        "`error: … does not follow Spurious ImageNet's layout (…)`",
        "does not follow Spurious ImageNet's layout",
        lambda env: _select(env, "--dataset", _dataset(env, "hummingbird")),
    ),
    Case(
        "layout-dataset-empty-class",
        "the class's dataset folder holds no image",
        "`error: no image files for hummingbird (94); check that the folder holds .png/.jpg images`",
        "no image files for hummingbird (94)",
        lambda env: _select(env, "--dataset", _dataset(env, "spurious_imagenet_94_hummingbird_0")),
    ),
    Case(
        "layout-dataset-no-class",
        "`--dataset` without a folder for the class",
        "`error: … has no folder for hummingbird (94); check --classes or the --dataset path`",
        "has no folder for",
        lambda env: _select(env, "--dataset", _dataset(env, "spurious_imagenet_105_koala_0")),
    ),
    Case(
        "layout-images-missing",
        "`--images` that does not exist",
        "`error: image folder … does not exist; check the --images path`",
        "image folder",
        lambda env: _select(env, "--images", str(env.root / "missing")),
    ),
    Case(
        "layout-images-two-classes",
        "`--images DIR` with two classes",
        "`error: --images holds one class; pass exactly one class with --classes`",
        "--images holds one class",
        lambda env: _select(env, "--classes", "94,105", "--images", str(env.root)),
    ),
    Case(
        "layout-no-source",
        "select-refs without `--dataset` or `--images`",
        "`error: no images given; pass --dataset SPURIOUS_IMAGENET/images or --images DIR`",
        "no images given",
        lambda env: _select(env),
    ),
    Case(
        "layout-no-refs",
        "finetune before select-refs",
        "`error: no reference images for hummingbird (94): …/selection.json is missing; run spurgen select-refs "
        "--classes 94 first`",
        "no reference images for hummingbird (94)",
        lambda env: _finetune(env, "--model", str(env.fixture("tiny_sd_dir"))),
    ),
    Case(
        "layout-no-models",
        "generate before finetune",
        "`error: no finished fine-tuned model for hummingbird (94) in …; run 'spurgen finetune --classes 94' first, "
        "or pass --base …`",
        "no finished fine-tuned model",
        lambda env: _generate(env),
    ),
    Case(
        "layout-workspace-is-a-file",
        "`--workspace` naming a file",
        "`error: cannot write …/.spurgen-write-test: File exists; free disk space or choose a writable --workspace`",
        "choose a writable --workspace",
        lambda env: [
            "select-refs",
            "-w",
            str(env.write("file", "x")),
            "--classes",
            "94",
            *env.res_a(),
            "--dataset",
            str(env.fixture("rigged").dataset),
        ],
    ),
    # Classes.
    Case(
        "class-typo",
        "`--classes humingbird`",
        "`error: unknown class 'humingbird'; did you mean 'hummingbird' (94)?`",
        "did you mean 'hummingbird' (94)?",
        lambda env: _select_data(env, "--classes", "humingbird"),
    ),
    Case(
        "class-unknown",
        "`--classes xyzzy`",
        "`error: unknown class 'xyzzy'; see the class names of the 'imagenet' label set (spurgen classes)`",
        "see the class names",
        lambda env: _select_data(env, "--classes", "xyzzy"),
    ),
    Case(
        "class-index-range",
        "`--classes 1000`",
        "`error: unknown class index 1000; the 'imagenet' label set has indices 0..999`",
        "unknown class index 1000",
        lambda env: _select_data(env, "--classes", "1000"),
    ),
    Case(
        "class-ambiguous",
        "`--classes crane` (a bird and a machine)",
        "`error: class name 'crane' is ambiguous; use one of the indices 134 (n02012849), 517 (n03126707)`",
        "is ambiguous",
        lambda env: _select_data(env, "--classes", "crane"),
    ),
    Case(
        "class-empty",
        "`run --classes ,`",
        "`error: --classes is empty; pass class names, indices or 'all'`",
        "--classes is empty",
        lambda env: ["run", "-w", str(env.ws), "--classes", ",", "--dry-run"],
    ),
    Case(
        "class-labels-missing",
        "`--labels` naming no registered set and no file",
        "`error: unknown label set '…'; use one of imagenet, world or a TSV file path`",
        "unknown label set",
        lambda env: _select_data(env, "--labels", str(env.root / "labels.tsv")),
    ),
    Case(
        "class-classifier-unknown",
        "`--classifiers nope`",
        "`error: unknown classifier 'nope'; choose from rn50-v1, … or define it with --classifier NAME=ARCH[@PATH]`",
        "unknown classifier 'nope'",
        lambda env: _select_data(env, "--classifiers", "nope"),
    ),
    # spurgen.toml.
    Case(
        "toml-syntax",
        "`k = ` with no value on line 2",
        "`error: …/spurgen.toml: Invalid value (at line 2, column 5); fix the TOML syntax there`",
        "line 2",
        _toml("[select-refs]\nk = \n", "select-refs", "--classes", "94"),
    ),
    Case(
        "toml-unknown-key",
        "`kk = 3` in `[select-refs]`",
        "`error: spurgen.toml: unknown key 'kk' in [select-refs]; known keys: …`",
        "unknown key 'kk' in [select-refs]",
        _toml("[select-refs]\nkk = 3\n", "select-refs", "--classes", "94"),
    ),
    Case(
        "toml-wrong-type",
        '`k = "six"`',
        "`error: spurgen.toml: [select-refs] k: expected a whole number, got 'six'; give an integer such as 6`",
        "[select-refs] k: expected a whole number",
        _toml('[select-refs]\nk = "six"\n', "select-refs", "--classes", "94"),
    ),
    Case(
        "toml-table-not-table",
        "`select-refs = 3` at the top level",
        "`error: spurgen.toml: 'select-refs' must be a table, not a value; put its keys under a [select-refs] header`",
        "must be a table",
        _toml("select-refs = 3\n", "select-refs", "--classes", "94"),
    ),
    Case(
        "toml-nan",
        "`sfsl-weight = nan` in `[finetune]`",
        "`error: spurgen.toml: [finetune] sfsl-weight: expected a finite number, got nan; give a number such as 0.1`",
        "[finetune] sfsl-weight: expected a finite number",
        _toml("[finetune]\nsfsl-weight = nan\n", "finetune", "--classes", "94"),
    ),
    Case(
        "toml-not-utf8",
        "a spurgen.toml in Latin-1",
        "`error: cannot read …/spurgen.toml: 'utf-8' codec can't decode byte 0xe9 …; check its permissions and "
        "encoding`",
        "check its permissions and encoding",
        _toml(b'noun = "caf\xe9"\n', "finetune", "--classes", "94"),
    ),
    Case(
        "toml-kappa-table",
        "`class-sfsl-weight = 3` instead of a table",
        "`error: spurgen.toml: [finetune] class-sfsl-weight: expected a table, got 3; give NAME = VALUE lines under "
        "a [table] header`",
        "class-sfsl-weight: expected a table",
        _toml("[finetune]\nclass-sfsl-weight = 3\n", "finetune", "--classes", "94"),
    ),
    # Contradictory flags.
    Case(
        "flags-full-over-lora",
        "`finetune --full` where the run `sfsl` is a complete LoRA run",
        "`error: …/models/94-hummingbird/sfsl holds a complete run with other settings (--lora in the run, --full "
        "requested); pass --run-name NAME to train a new run beside it, or --overwrite to replace it`",
        "holds a complete run with other settings (--lora in the run, --full requested)",
        _full_over_complete_lora,
    ),
    Case(
        "flags-compile-no-compiler",
        "`finetune --compile on` on a CPU without a C++ compiler",
        "`error: --compile on needs a C++ compiler on a CPU, and none was found; install g++ (or set CXX), or pass "
        "--compile off`, before anything is written",
        "--compile on needs a C++ compiler",
        _compile_without_compiler,
    ),
    Case(
        "flags-resume-overwrite",
        "`finetune --resume --overwrite`",
        "`error: --resume and --overwrite both given; pass one: continue the run or start it over`",
        "--resume and --overwrite both given",
        lambda env: _finetune(env, "--resume", "--overwrite"),
    ),
    Case(
        "flags-report-to-unknown",
        "`finetune --report-to neptune`",
        "`error: --report-to: unknown tracker 'neptune'; use tensorboard, wandb, mlflow, comet_ml, aim or all`",
        "unknown tracker 'neptune'",
        lambda env: _finetune(env, "--report-to", "neptune"),
    ),
    Case(
        "flags-zero-snr-epsilon",
        "`finetune --zero-terminal-snr` on an epsilon-prediction base model",
        "`error: --zero-terminal-snr needs a v-prediction base model; '…' predicts 'epsilon', which has nothing to "
        "predict from pure noise at the last timestep; drop the flag (--noise-offset also widens colour and "
        "brightness)`",
        "--zero-terminal-snr needs a v-prediction base model",
        lambda env: _finetune(env, "--model", str(env.fixture("tiny_sd_dir")), "--zero-terminal-snr"),
    ),
    Case(
        "flags-dataset-images",
        "`--dataset` and `--images` together",
        "`error: --dataset and --images both given; pass only one source of images`",
        "--dataset and --images both given",
        lambda env: _select(env, "--dataset", str(env.root), "--images", str(env.root)),
    ),
    Case(
        "flags-filter-without-until",
        "`generate --filter consistent` without `--until`",
        "`error: --filter and --max-images need --until N; add --until N or drop them`",
        "need --until N",
        lambda env: _generate(env, "--filter", "consistent"),
    ),
    Case(
        "flags-lora-hub-offline",
        "`generate --lora ORG/NAME` offline, or an id the hub does not have",
        "`error: --lora someone/their-lora: not a local file or folder, and the hub gave no "
        "pytorch_lora_weights.safetensors (…); download it and pass its path, or check the id and the network`",
        "the hub gave no pytorch_lora_weights.safetensors",
        lambda env: _generate(env, "--lora", "someone/their-lora"),
    ),
    Case(
        "flags-lora-without-model",
        "`generate --lora DIR` without `--model`",
        "`error: no base model for the LoRA …; pass --model, the Stable Diffusion folder or hub id it was trained on`",
        "no base model for the LoRA",
        lambda env: _generate(
            env,
            "--lora",
            shutil.copytree(env.fixture("tiny_lora_run"), env.root / "their-lora"),
            "--prompt",
            "a photo of sks flowers",
        ),
    ),
    Case(
        "flags-checkpoint-missing",
        "`generate --checkpoint N` of a run without that checkpoint",
        "`error: …/checkpoints/checkpoint-7 does not exist: run 'lora-x' of hummingbird (94) has no checkpoint; "
        "drop --checkpoint to use its final weights`",
        "checkpoint-7 does not exist",
        lambda env: _generate(env, "--runs", _lora_run(env).name, "--checkpoint", "7"),
    ),
    Case(
        "flags-export-lora-no-run",
        "`export-lora` for a class without a finished LoRA run",
        "`error: hummingbird (94) has 0 finished LoRA runs (none); name the one to export with --run`",
        "has 0 finished LoRA runs",
        lambda env: ["export-lora", "-w", str(env.ws), "--classes", "94", "--format", "kohya"],
    ),
    Case(
        "flags-until-without-filter",
        "`generate --until 5` without `--filter`",
        "`error: --until needs --filter; add e.g. --filter consistent`",
        "--until needs --filter",
        lambda env: _generate(env, "--until", "5"),
    ),
    Case(
        "flags-min-quality-without-export",
        "`evaluate --quality topiq --min-quality 0.5` without `--export`",
        "`error: --min-quality filters the --export; add --export DIR`",
        "add --export DIR",
        lambda env: ["evaluate", "-w", str(env.ws), "--quality", "topiq", "--min-quality", "0.5"],
    ),
    Case(
        "flags-text-encoder-vs-preset",
        "`--preset dreambooth --train-text-encoder` without `--run-name`",
        "`error: --train-text-encoder changes what preset 'dreambooth' trains; pass --run-name NAME …`",
        "pass --run-name NAME",
        lambda env: _finetune(env, "--preset", "dreambooth", "--train-text-encoder"),
    ),
    Case(
        "flags-grid-without-sfsl",
        "`run --presets dreambooth --sfsl-weight 0.1`",
        "`error: --sfsl-weight is a grid of the 'sfsl' preset; add sfsl to --presets`",
        "add sfsl to --presets",
        lambda env: ["run", "-w", str(env.ws), "--presets", "dreambooth", "--sfsl-weight", "0.1", "--dry-run"],
    ),
    Case(
        "flags-crop-unknown",
        "`select-refs --crop middle`",
        "`error: --crop must be 'center' or 'none', got 'middle'; change it on the command line or in spurgen.toml`",
        "--crop must be 'center' or 'none'",
        lambda env: _select(env, "--crop", "middle"),
    ),
    Case(
        "flags-rate-path-without-export",
        "`rate out.csv` without `--export`",
        "`error: out.csv is only used with --export; pass --export out.csv, or leave it out to serve`",
        "only used with --export",
        lambda env: ["rate", "out.csv", "-w", str(env.ws)],
    ),
    Case(
        "flags-path-unknown-home",
        "a path flag (or `-w`) starting with `~user` for a user that does not exist: `fit-npca --images ~0`",
        "`error: ~0: its leading '~' names no known home directory; write the path out in full`",
        "names no known home directory",
        lambda env: ["fit-npca", "-w", str(env.ws), "--images", "~0"],
    ),
    # Numbers out of range.
    Case(
        "number-not-a-number",
        "`finetune --steps abc`",
        "the parser's usage box: `Invalid value for '--steps': Input should be a valid integer, …`",
        "Invalid value for '--steps'",
        lambda env: _finetune(env, "--steps", "abc"),
        usage=True,
    ),
    Case(
        "number-steps-negative",
        "`finetune --steps -1`",
        "`error: --steps must be at least 1, got -1; change it on the command line or in spurgen.toml`",
        "--steps must be at least 1",
        lambda env: _finetune(env, "--steps", "-1"),
    ),
    Case(
        "number-rank-zero",
        "`finetune --rank 0`",
        "`error: --rank must be at least 1, got 0; pass e.g. --rank 16`",
        "--rank must be at least 1",
        lambda env: _finetune(env, "--rank", "0"),
    ),
    Case(
        "number-kappa-nan",
        "`finetune --sfsl-weight nan`",
        "`error: --sfsl-weight: expected a finite number, got nan; give a number such as 0.1`",
        "--sfsl-weight: expected a finite number",
        lambda env: _finetune(env, "--sfsl-weight", "nan"),
    ),
    Case(
        "number-kappa-inf",
        "`finetune --sfsl-weight inf`",
        "`error: --sfsl-weight: expected a finite number, got inf; give a number such as 0.1`",
        "--sfsl-weight: expected a finite number",
        lambda env: _finetune(env, "--sfsl-weight", "inf"),
    ),
    Case(
        "number-kappa-negative",
        "`finetune --sfsl-weight -0.1`",
        "`error: --sfsl-weight must be 0 or more, got -0.1; change it on the command line or in spurgen.toml`",
        "--sfsl-weight must be 0 or more",
        lambda env: _finetune(env, "--sfsl-weight", "-0.1"),
    ),
    Case(
        "number-class-kappa-nan",
        "`--class-sfsl-weight hummingbird=nan`",
        "`error: --class-sfsl-weight.hummingbird: expected a finite number, got nan; give a number such as 0.1`",
        "expected a finite number",
        lambda env: _finetune(env, "--class-sfsl-weight", "hummingbird=nan"),
    ),
    Case(
        "number-class-kappa-malformed",
        "`--class-sfsl-weight hummingbird`",
        "`error: --class-sfsl-weight: bad entry 'hummingbird'; write CLASS=KAPPA, e.g. hummingbird=0.2`",
        "write CLASS=KAPPA",
        lambda env: _finetune(env, "--class-sfsl-weight", "hummingbird"),
    ),
    Case(
        "number-lr-zero",
        "`finetune --learning-rate 0`",
        "`error: --learning-rate must be positive, got 0.0; change it on the command line or in spurgen.toml`",
        "--learning-rate must be positive",
        lambda env: _finetune(env, "--learning-rate", "0"),
    ),
    Case(
        "number-grad-norm-inf",
        "`finetune --max-grad-norm inf`",
        "`error: --max-grad-norm: expected a finite number, got inf; give a number such as 0.1`",
        "--max-grad-norm: expected a finite number",
        lambda env: _finetune(env, "--max-grad-norm", "inf"),
    ),
    Case(
        "number-n-negative",
        "`generate -n -3`",
        "`error: -n must be at least 1, got -3; change it on the command line or in spurgen.toml`",
        "-n must be at least 1",
        lambda env: _generate(env, "-n", "-3"),
    ),
    Case(
        "number-guidance-nan",
        "`generate --guidance nan`",
        "`error: --guidance: expected a finite number, got nan; give a number such as 0.1`",
        "--guidance: expected a finite number",
        lambda env: _generate(env, "--guidance", "nan"),
    ),
    Case(
        "number-resolution-odd",
        "`generate --resolution 100`",
        "`error: --resolution must be a positive multiple of 8, got 100; change it on the command line or in "
        "spurgen.toml`",
        "must be a positive multiple of 8",
        lambda env: _generate(env, "--resolution", "100"),
    ),
    Case(
        "number-seed-negative",
        "`generate --seed -1`",
        "`error: --seed must be 0 or more, got -1; change it on the command line or in spurgen.toml`",
        "--seed must be 0 or more",
        lambda env: _generate(env, "--seed", "-1"),
    ),
    Case(
        "number-k-zero",
        "`select-refs -k 0`",
        "`error: -k must be at least 1, got 0; pass -k 6 for the paper's setting`",
        "-k must be at least 1",
        lambda env: _select_data(env, "-k", "0"),
    ),
    Case(
        "number-grid-nan",
        "`run --sfsl-weight 0.1,nan`",
        "`error: --sfsl-weight: expected a finite number, got nan; give a number such as 0.1`",
        "expected a finite number",
        lambda env: ["run", "-w", str(env.ws), "--sfsl-weight", "0.1,nan", "--dry-run"],
    ),
    Case(
        "number-port-range",
        "`rate --port 70000`",
        "`error: --port must be 0 to 65535, got 70000; change it on the command line or in spurgen.toml`",
        "--port must be 0 to 65535",
        lambda env: ["rate", "-w", str(env.ws), "--port", "70000"],
    ),
    # Weight files.
    Case(
        "weights-missing",
        "`--classifier x=ARCH@/does/not/exist.pt`",
        "`error: weight file /does/not/exist.pt does not exist; check the PATH part of NAME=ARCH@PATH`",
        "weight file /does/not/exist.pt does not exist",
        lambda env: _select_data(
            env, "--classifier", "x=test_resnet.r160_in1k@/does/not/exist.pt", "--classifiers", "x"
        ),
    ),
    Case(
        "weights-wrong-architecture",
        "a ResNet's weights given to a ConvNeXt",
        "`error: classifier 'x': … does not fit architecture test_convnext.r160_in1k (missing stem.0.weight, …); "
        "check the ARCH part of NAME=ARCH@PATH`",
        "does not fit architecture test_convnext.r160_in1k",
        lambda env: _select(
            env,
            "--dataset",
            str(env.fixture("rigged").dataset),
            "--classifier",
            f"x=test_convnext.r160_in1k@{env.fixture('rigged').flags['res-a'].split('@', 1)[1]}",
            "--classifiers",
            "x",
        ),
    ),
    Case(
        "weights-zero-byte",
        "an empty `.safetensors` weight file",
        "`error: cannot read weights from …/w.safetensors (SafetensorError: Error while deserializing header: "
        "header too small); give a safetensors file or a torch state dict`",
        "cannot read weights from",
        lambda env: _select(
            env,
            "--dataset",
            str(env.fixture("rigged").dataset),
            "--classifier",
            f"x=test_resnet.r160_in1k@{env.write('w.safetensors', b'')}",
            "--classifiers",
            "x",
        ),
    ),
    Case(
        "weights-pickle",
        "a `.pt` whose pickle would run code",
        "`error: … holds more than tensors and is refused (safe loading: …); convert it to safetensors or a plain "
        "state dict`; the code never runs",
        "holds more than tensors and is refused",
        lambda env: _select(
            env,
            "--dataset",
            str(env.fixture("rigged").dataset),
            "--classifier",
            f"x=test_resnet.r160_in1k@{_evil_pickle(env.root, 'evil.pt')}",
            "--classifiers",
            "x",
        ),
        check=_not_executed,
    ),
    Case(
        "weights-required",
        "`--classifiers all` while robust-rn50 has no weight file",
        "`error: classifier 'robust-rn50' needs its weight file; pass --classifier robust-rn50=ARCH@PATH (…) or "
        "leave it out of --classifiers`",
        "classifier 'robust-rn50' needs its weight file",
        lambda env: _select_data(env, "--classifiers", "all"),
    ),
    Case(
        "weights-spec-malformed",
        "`--classifier broken`",
        "`error: bad classifier 'broken'; write NAME=ARCH or NAME=ARCH@PATH, e.g. "
        "robust-rn50=resnet50@~/weights/l2_improved_3_ep.pt`",
        "bad classifier 'broken'",
        lambda env: _select_data(env, "--classifier", "broken"),
    ),
    Case(
        "weights-spec-no-path",
        "`--classifier x=resnet50@`",
        "`error: bad classifier 'x=resnet50@'; write NAME=ARCH or NAME=ARCH@PATH, e.g. …`",
        "bad classifier 'x=resnet50@'",
        lambda env: _select_data(env, "--classifier", "x=resnet50@"),
    ),
    Case(
        "weights-base-missing",
        "`finetune --model /nope`",
        "`error: base model folder /nope does not exist; check --model (a diffusers folder or a hub id)`",
        "does not exist; check --model",
        lambda env: _finetune(env, "--model", str(env.root / "nope")),
    ),
    Case(
        "weights-base-not-sd",
        "`--model` naming a folder that is not a Stable Diffusion pipeline",
        "`error: base model …/notsd: cannot read …/notsd/model_index.json ([Errno 2] No such file or directory: …); "
        "give a complete diffusers Stable Diffusion folder`",
        "give a complete diffusers Stable Diffusion folder",
        lambda env: _finetune(env, "--model", str(env.write("notsd/readme.txt", "x").parent)),
    ),
    Case(
        "weights-lora-other-base",
        "a LoRA trained on the tiny SD in a run whose base model has another architecture",
        "`error: cannot load the LoRA of run 'lora-x' (…/pytorch_lora_weights.safetensors) onto … (size mismatch "
        "for …attn2.to_k.lora_A…: copying a param with shape torch.Size([2, 32]) from checkpoint, the shape in "
        "current model is torch.Size([2, 48]).); it must be loaded onto the base model it was trained on`, before "
        "anything is written",
        "cannot load the LoRA of run 'lora-x'",
        _lora_on_other_base,
    ),
    Case(
        "weights-checkpoint-pickle",
        "`finetune --resume` from a checkpoint whose `optimizer.bin` holds a pickle payload",
        "`error: cannot resume from …/checkpoints/checkpoint-2: it holds more than tensors and is refused (safe "
        "loading: Weights only load failed. …); delete it to resume from an earlier checkpoint, or pass "
        "--overwrite`; the code never runs, `training.json` is untouched",
        "is refused",
        _resume_pickled_checkpoint,
        check=_not_executed,
    ),
    # A workspace that cannot be written.
    Case(
        "disk-read-only",
        "a read-only workspace (every write fails with EROFS)",
        "`error: cannot write …/.spurgen-write-test: Read-only file system; free disk space or choose a writable "
        "--workspace`, before any work",
        "Read-only file system",
        _failing_writes(errno.EROFS, after_probe=False),
    ),
    Case(
        "disk-full",
        "the disk fills up during select-refs (writes fail with ENOSPC after the start-up check)",
        "`error: cannot write …/cache/predictions/…/….safetensors: No space left on device; free disk space or "
        "choose a writable --workspace`; earlier files intact, no temporary file left",
        "No space left on device",
        _failing_writes(errno.ENOSPC, after_probe=True),
    ),
    Case(
        "disk-full-checkpoint",
        "the disk fills up while finetune writes a checkpoint (inside torch.save)",
        "`error: cannot use …/checkpoints/.checkpoint-1.tmp/optimizer.bin: No space left on device; check the path, "
        "free disk space or choose a writable --workspace`; `training.json` still says the run is unfinished",
        "No space left on device",
        _disk_full_at_checkpoint,
        check=_unfinished,
        keeps_work=True,
    ),
    Case(
        "disk-checkpoint-write-failed",
        "a checkpoint write that fails inside torch.save with a RuntimeError, not an OSError",
        "`error: cannot write a checkpoint in …/checkpoints: … PytorchStreamWriter failed writing file data/0: file "
        "write failed; free disk space or choose a writable --workspace, then continue with --resume (the last good "
        "checkpoint, …/checkpoint-1, is kept)`; no partial checkpoint left",
        "PytorchStreamWriter failed writing file",
        _checkpoint_write_fails,
        check=_kept_checkpoint,
        keeps_work=True,
    ),
    # Running out of GPU memory (CUDA's error, raised on the CPU here): the stage and its remedies in one line.
    Case(
        "oom-select-refs",
        "select-refs runs out of GPU memory",
        "`error: select-refs ran out of GPU memory (CUDA out of memory); lower --batch-size, or pass --device cpu "
        "(finished outputs are kept)`",
        "select-refs ran out of GPU memory",
        _out_of_memory("spurgen.select_refs:predict_files", 0, _select_data),
    ),
    Case(
        "oom-finetune",
        "finetune runs out of GPU memory in its second step",
        "`error: finetune ran out of GPU memory (CUDA out of memory); lower --batch-size or --resolution, switch on "
        "--gradient-checkpointing, --use-8bit-adam or --mixed-precision fp16 (bf16), give SFSL a TAESD "
        "--sfsl-decoder (madebyollin/taesd), lower --sample-batch-size for the class images; then continue from the "
        "last checkpoint with --resume (finished outputs are kept)`; checkpoint-1 kept",
        "finetune ran out of GPU memory",
        _out_of_memory("spurgen.finetune.trainer:Trainer.train_step", 1, _refs_and_finetune),
        check=_kept_checkpoint,
        keeps_work=True,
    ),
    Case(
        "oom-generate",
        "generate runs out of GPU memory after its first image",
        "`error: generate ran out of GPU memory (CUDA out of memory); lower --batch-size or --resolution; the same "
        "command then makes only the missing images (finished outputs are kept)`; the first image kept",
        "generate ran out of GPU memory",
        _out_of_memory("spurgen.generate.sampling:_png_bytes", 1, _lora_and_generate),
        check=_kept_first_image,
        keeps_work=True,
    ),
    Case(
        "oom-evaluate",
        "evaluate runs out of GPU memory",
        "`error: evaluate ran out of GPU memory (CUDA out of memory); lower --batch-size, evaluate fewer "
        "--classifiers at a time, or pass --device cpu (finished outputs are kept)`",
        "evaluate ran out of GPU memory",
        _out_of_memory("spurgen.evaluate:predict_files", 0, _refs_and_evaluate),
    ),
    # Names that become paths.
    Case(
        "name-run-traversal",
        "`--run-name ../x`",
        "`error: invalid run name '../x'; use 1-100 ASCII letters, digits, '.', '_' or '-', starting with a letter "
        "or digit`",
        "invalid run name '../x'",
        lambda env: _finetune(env, "--run-name", "../x", "--model", str(env.fixture("tiny_sd_dir"))),
    ),
    Case(
        "name-run-absolute",
        "`--run-name /tmp/x`",
        "`error: invalid run name '/tmp/x'; …`",
        "invalid run name '/tmp/x'",
        lambda env: _finetune(env, "--run-name", "/tmp/x", "--model", str(env.fixture("tiny_sd_dir"))),
    ),
    Case(
        "name-run-nul",
        "a run name with a NUL byte",
        "`error: invalid run name 'a\\x00b'; …`",
        "invalid run name 'a\\x00b'",
        lambda env: _finetune(env, "--run-name", "a\x00b", "--model", str(env.fixture("tiny_sd_dir"))),
    ),
    Case(
        "name-run-long",
        "a 300-character run name",
        "`error: invalid run name 'aaa…'; use 1-100 ASCII letters …`",
        "use 1-100 ASCII letters",
        lambda env: _finetune(env, "--run-name", "a" * 300, "--model", str(env.fixture("tiny_sd_dir"))),
    ),
    Case(
        "name-run-unicode",
        "`--run-name kolibrí`",
        "`error: invalid run name 'kolibrí'; …`",
        "invalid run name 'kolibrí'",
        lambda env: _finetune(env, "--run-name", "kolibrí", "--model", str(env.fixture("tiny_sd_dir"))),
    ),
    Case(
        "name-generate-run-traversal",
        "`generate --runs ../../x`",
        "`error: invalid run name '../../x'; …`",
        "invalid run name '../../x'",
        lambda env: _generate(env, "--runs", "../../x"),
    ),
    Case(
        "name-class-traversal",
        "`--classes ../x`",
        "`error: unknown class '../x'; see the class names …`",
        "unknown class '../x'",
        lambda env: _select_data(env, "--classes", "../x"),
    ),
    Case(
        "name-class-absolute",
        "`--classes /etc/passwd`",
        "`error: unknown class '/etc/passwd'; …`",
        "unknown class '/etc/passwd'",
        lambda env: _select_data(env, "--classes", "/etc/passwd"),
    ),
    Case(
        "name-class-nul",
        "a class name with a NUL byte",
        "`error: unknown class 'humming\\x00bird'; …`",
        "unknown class 'humming\\x00bird'",
        lambda env: _select_data(env, "--classes", "humming\x00bird"),
    ),
    Case(
        "name-class-newline",
        "a class name with a line break",
        "one line: `error: unknown class 'humming\\nbird'; …`",
        "unknown class 'humming\\nbird'",
        lambda env: _select_data(env, "--classes", "humming\nbird"),
    ),
    Case(
        "name-class-long",
        "a 300-character class name",
        "`error: unknown class 'xyzxyz…'; …`",
        "unknown class 'xyzxyz",
        lambda env: _select_data(env, "--classes", _long("xyz")),
    ),
    Case(
        "name-class-unicode",
        "`--classes colibrí`",
        "`error: unknown class 'colibrí'; …`",
        "unknown class 'colibrí'",
        lambda env: _select_data(env, "--classes", "colibrí"),
    ),
    Case(
        "name-classifier-traversal",
        "`--classifier ../evil=resnet50`",
        "`error: invalid classifier name '../evil'; …`",
        "invalid classifier name '../evil'",
        lambda env: _select_data(env, "--classifier", "../evil=resnet50"),
    ),
    Case(
        "name-labels-long",
        "`--labels` with a 300-character name",
        "`error: cannot use aaa…: File name too long; check the path, free disk space or choose a writable "
        "--workspace`",
        "File name too long",
        lambda env: ["classes", "--labels", "a" * 300],
    ),
    Case(
        "name-workspace-nul",
        "a `--workspace` path with a NUL byte",
        "the parser's usage box: `Invalid value for '--workspace' / '-w' (…): Value error, embedded null byte`",
        "embedded null byte",
        lambda env: ["generate", "-w", "w\x00s", "--classes", "94"],
        usage=True,
    ),
]


# --- Fixtures of the heavier cases --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_base(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Stable Diffusion with another architecture: wider cross-attention and text encoder."""
    from spurgen.testing import stable_diffusion

    tiny = stable_diffusion.SD_ARCHITECTURES["tiny"]
    wide = replace(tiny, name="tiny-wide", unet={**tiny.unet, "cross_attention_dim": 48},
                   text_encoder={**tiny.text_encoder, "hidden_size": 48, "projection_dim": 48})
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(stable_diffusion.SD_ARCHITECTURES, "tiny-wide", wide)
        return stable_diffusion.build_stable_diffusion(tmp_path_factory.mktemp("wide") / "sd", "tiny-wide", seed=1)


@pytest.fixture(scope="module")
def tiny_lora_run(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished LoRA run folder on the tiny SD, saved by spurgen's own LoRA code."""
    from diffusers import StableDiffusionPipeline

    from spurgen._base_model import resolve_base_model
    from spurgen._lora import TEXT_ENCODER_TARGETS, UNET_TARGETS, add_lora, save_lora

    folder = tmp_path_factory.mktemp("lora") / "run"
    folder.mkdir()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    add_lora(pipe.unet, UNET_TARGETS, 2, 2.0)
    add_lora(pipe.text_encoder, TEXT_ENCODER_TARGETS, 2, 2.0)
    save_lora(folder, StableDiffusionPipeline, {"unet": pipe.unet, "text_encoder": pipe.text_encoder}, "tiny-sd")
    training = {"status": "complete", "base_model": str(tiny_sd_dir), "base_model_resolved": str(tiny_sd_dir),
                "base_model_fingerprint": resolve_base_model(str(tiny_sd_dir)).fingerprint, "weights": "lora",
                "instance_prompt": "a photo of sks red flowers", "class_prompt": "a photo of red flowers",
                "resolution": 64, "prediction_type": "epsilon", "seed": 0,
                "class": {"index": 94, "name": "hummingbird"}}
    (folder / "training.json").write_text(json.dumps(training))
    return folder


@pytest.fixture(scope="module")
def checkpointed_run(tiny_sd_dir: Path, rigged: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace whose dreambooth run of hummingbird trained 2 steps with a checkpoint after each."""
    root = tmp_path_factory.mktemp("checkpointed")
    _write_refs(root / "ws", rigged.files[94][:2])
    done = CliRunner().invoke(app, ["finetune", "-w", str(root / "ws"), "--classes", "94", "--model", str(tiny_sd_dir),
                                    "--steps", "2", *CHECKPOINTED_RUN])
    assert done.exit_code == 0, done.output
    return root / "ws"


# --- The tests ----------------------------------------------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    env = Env(tmp_path, request, monkeypatch)
    args = case.prepare(env)
    env.write(str(SEED_FILE), '{"earlier": "work"}\n')
    monkeypatch.chdir(tmp_path)
    before = _snapshot(tmp_path)
    result = CliRunner().invoke(app, args)
    monkeypatch.undo()  # writes work again for the checks
    output = result.output
    assert result.exit_code == case.code, output
    assert result.exception is None or isinstance(result.exception, SystemExit), output
    assert "Traceback" not in output
    assert case.expect in " ".join(output.split()), output
    after = _snapshot(tmp_path)
    assert {p: b for p, b in after.items() if p in before} == before, "files written before were changed"
    if case.usage:
        assert "Try 'spurgen" in output and "Usage: spurgen" in output, output
    elif case.code == 2:
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and case.expect in errors[0], output
        assert "; " in errors[0], "the message names the problem, then the fix"
    if case.code == 2 and not case.keeps_work:
        assert after == before, f"written despite the error: {sorted(set(after) - set(before))}"
    if case.check:
        case.check(env)


def test_readme_table_is_the_catalogue() -> None:
    """docs/reliability.md's Reliability table lists exactly these cases, in this order, with these messages."""
    text = RELIABILITY.read_text(encoding="utf-8")
    section = text.split("## Reliability", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if re.match(r"\| `[a-z0-9-]+` \|", line)]
    expected = [case.row for case in CASES]
    assert rows == expected, (
        "docs/reliability.md's table differs from tests/test_bad_input.py; the rows should be:\n" + "\n".join(expected)
    )
    assert f"{len(CASES)} bad inputs" in section
    for case in CASES:
        assert case.expect in case.sees or case.code == 0, f"{case.id}: the catalogue row must quote what the user sees"


def test_case_ids_are_unique() -> None:
    assert len({c.id for c in CASES}) == len(CASES)


# --- Untrusted files: every reader of weights refuses a pickle without running it ---------------------------------
# Classifier weights and finetune checkpoints are tried through the CLI above (weights-pickle,
# weights-checkpoint-pickle); these readers are reached through commands whose setup is long.


def _read_quality_weights(path: Path) -> None:
    from spurgen.quality import load_quality_metric

    load_quality_metric("topiq", str(path), device="cpu")


def _read_clip_weights(path: Path) -> None:
    import torch

    from spurgen.generate.filters import load_zero_shot

    load_zero_shot("ViT-B-32", str(path), torch.device("cpu"))


def _read_npca(path: Path) -> None:
    from spurgen.finetune.npca import NeuralPCA

    NeuralPCA.load(path)


@pytest.mark.parametrize("reader, name, refusal", [
    (_read_quality_weights, "topiq.pt", "holds more than tensors and is refused"),
    (_read_clip_weights, "clip.pt", "holds more than tensors and is refused"),
    (_read_npca, "94-hummingbird.safetensors", "is not a neural PCA file"),
], ids=["quality-weights", "clip-weights", "npca"])
def test_weight_readers_refuse_a_pickle_without_running_it(reader: Callable[[Path], None], name: str, refusal: str,
                                                          tmp_path: Path) -> None:
    path = _evil_pickle(tmp_path, name)
    with pytest.raises(SpurgenError, match=refusal):
        reader(path)
    assert not (tmp_path / "executed").exists(), "the pickle payload ran"


# Calls that can run code from a file: torch.load without weights_only=True, pickle's loaders, numpy with
# allow_pickle=True, and the hub's trust_remote_code.
_CALL = r"\((?:[^()]|\([^()]*\))*\)"
UNSAFE = {
    "torch.load without weights_only=True": re.compile(rf"torch\.load{_CALL}"),
    "pickle loading": re.compile(r"\b(?:pickle|cPickle|dill|joblib)\.(?:load|loads|Unpickler)\b"),
    "numpy allow_pickle=True": re.compile(r"allow_pickle\s*=\s*True"),
    "trust_remote_code": re.compile(r"trust_remote_code"),
}


def _unsafe_calls(source: str) -> list[str]:
    found = []
    for what, pattern in UNSAFE.items():
        for match in pattern.finditer(source):
            if what.startswith("torch.load") and re.search(r"weights_only\s*=\s*True", match.group()):
                continue
            found.append(f"{what}: {match.group()[:80]}")
    return found


def test_the_unsafe_call_scan_finds_each_kind() -> None:
    sample = ('torch.load(path, map_location="cpu")\nstate = pickle.loads(data)\nnp.load(f, allow_pickle=True)\n'
              'AutoModel.from_pretrained(name, trust_remote_code=True)\ntorch.load(p, weights_only=True)\n')
    assert [line.split(":")[0] for line in _unsafe_calls(sample)] == list(UNSAFE)


def test_the_package_has_no_unsafe_loading() -> None:
    package = Path(spurgen.workspace.__file__).parent
    found = {str(path.relative_to(package)): calls for path in sorted(package.rglob("*.py"))
             if (calls := _unsafe_calls(path.read_text(encoding="utf-8")))}
    assert not found, f"code that can unpickle or run code from files: {found}"
