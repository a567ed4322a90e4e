"""Shared run-time helpers: device choice, consoles, progress bars, and quiet, precise loading of diffusers models."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, Task,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

from .errors import SpurgenError

if TYPE_CHECKING:
    import torch
    from accelerate import PartialState



def is_main_process() -> bool:
    """False in the other ranks of ``accelerate launch`` or torchrun, which do their share silently."""
    return os.environ.get("RANK", "0") == "0"


# Tables and summaries go to stdout; progress, warnings and errors to stderr so that stdout can be piped.
console = Console(quiet=not is_main_process())
err_console = Console(stderr=True)


def distributed_state() -> "PartialState":
    """accelerate's view of the processes of this run: one alone, N under ``accelerate launch``/torchrun.

    ``cpu=True`` where no GPU exists lets processes started with ``--multi_gpu`` join over gloo instead of
    each running alone.
    """
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def resolve_device(name: str = "auto") -> "torch.device":
    """``auto`` picks CUDA, then Apple MPS, then the CPU; anything else must exist.

    Raises:
        SpurgenError: the named device is not available.
    """
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SpurgenError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpurgenError(f"--device {name}: no CUDA GPU is available here; use --device cpu or auto")
    return device


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``12.3 images/s``."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} {self.unit}/s" if speed else f"-- {self.unit}/s", style="progress.data.speed")


def progress_bar(unit: str = "images") -> Progress:
    """A rich progress bar with count, rate and time left, drawn on stderr by the main process."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=False,
        disable=not is_main_process(),
    )


def warn(message: str) -> None:
    if not is_main_process():
        return
    err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


@contextmanager
def library_progress_bars_off() -> Iterator[None]:
    """Silences diffusers' and transformers' loading bars, which would tear through our live progress bar."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    previous = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if previous[0]:
            diffusers_logging.enable_progress_bar()
        if previous[1]:
            transformers_logging.enable_progress_bar()


def dtype_argument(dtype: "torch.dtype", package: str = "diffusers") -> dict[str, "torch.dtype"]:
    """from_pretrained's precision argument: ``dtype`` since diffusers 0.42 (transformers 4.56), ``torch_dtype``
    before it. ``package`` is the library whose ``from_pretrained`` is called.

    Loading in the final precision (rather than casting afterwards) keeps the modules that a model marks
    as float32-only in float32.
    """
    from importlib.metadata import version

    major, minor = (int(part) for part in version(package).split(".")[:2])
    since = {"diffusers": (0, 42), "transformers": (4, 56)}[package]
    return {"dtype" if (major, minor) >= since else "torch_dtype": dtype}
