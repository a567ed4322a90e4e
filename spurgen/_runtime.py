"""Shared run-time helpers: device choice, consoles, progress bars, and quiet, precise loading of diffusers models."""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, Iterator

from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, SpinnerColumn, Task, TaskID,
                           TextColumn, TimeElapsedColumn, TimeRemainingColumn)
from rich.text import Text

from .errors import SpurgenError

if TYPE_CHECKING:
    import torch
    from accelerate import PartialState


def is_main_process() -> bool:
    """False in the other ranks of ``accelerate launch`` or torchrun, which do their share silently."""
    return os.environ.get("RANK", "0") == "0"


LOG_WIDTH = 200  # the width of lines off a terminal, unless COLUMNS says otherwise


class _Console(Console):
    """A rich console that, off a terminal (a log file, a pipe), is LOG_WIDTH wide rather than 80.

    Rich falls back to 80 columns there and cuts tables to fit, so that logs read ``dreambo…`` for both
    dreambooth and dreambooth-te; log lines may be long. COLUMNS, or a width set on the console, still wins.
    """

    @property
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self._width is None and "COLUMNS" not in os.environ and not self.is_terminal:
            return ConsoleDimensions(LOG_WIDTH, size.height)
        return size

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)  # type: ignore[attr-defined]


# Tables and summaries go to stdout; progress, warnings and errors to stderr so that stdout can be piped.
console = _Console(quiet=not is_main_process())
err_console = _Console(stderr=True)


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


PROGRESS_INTERVAL_S = 10.0  # off a terminal, the longest time between two progress lines of a running task


class StageProgress(Progress):
    """A live rich progress bar on a terminal; off it (a batch job's log), plain progress lines instead.

    A live bar off a terminal is drawn once, at the end, cut to the console's width. Here each task prints a
    line (description, count, rate, elapsed time, ETA) when it first advances (or has run ``interval`` seconds
    without), whenever ``interval`` seconds have passed since its last line, whenever another tenth of its total
    is done (but not twice within a tenth of the interval), and when it finishes or the bar stops. A thread keeps
    the lines coming during a long step.

    Args:
        columns: The live bar's columns.
        unit: What the count counts, e.g. ``images``.
        plain: Print plain lines instead of the live bar.
        interval: Seconds between two lines of a running task.
        disable: Show nothing, neither bar nor lines (the other processes of a distributed run).
        kwargs: Passed to :class:`rich.progress.Progress` (``get_time`` gives the lines' clock too).
    """

    def __init__(self, *columns: str | ProgressColumn, unit: str, plain: bool, interval: float = PROGRESS_INTERVAL_S,
                 disable: bool = False, **kwargs: Any) -> None:
        super().__init__(*columns, disable=disable or plain, **kwargs)
        self.unit = unit
        self.plain = plain and not disable
        self.interval = interval
        self._last_line: dict[TaskID, tuple[float, float] | None] = {}  # task: (time, completed) of its last line
        self._stopping = threading.Event()
        self._ticker: threading.Thread | None = None

    def start(self) -> None:
        super().start()
        if self.plain and self._ticker is None:
            self._stopping.clear()
            self._ticker = threading.Thread(target=self._tick, name="spurgen-progress-lines", daemon=True)
            self._ticker.start()

    def stop(self) -> None:
        if self._ticker is not None:
            self._stopping.set()
            self._ticker.join()
            self._ticker = None
        for task_id in list(self._last_line):
            self._print_line(task_id, when=lambda task, last: last is None or task.completed != last[1])
        super().stop()

    def add_task(self, description: str, *args: Any, **kwargs: Any) -> TaskID:
        task_id = super().add_task(description, *args, **kwargs)
        if self.plain:
            self._last_line[task_id] = None
        return task_id

    def update(self, task_id: TaskID, **kwargs: Any) -> None:  # type: ignore[override]
        super().update(task_id, **kwargs)
        self._print_line(task_id, when=self._due)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._print_line(task_id, when=self._due)

    def _tick(self) -> None:
        """The ticker thread: the lines of tasks whose step takes longer than the interval."""
        while not self._stopping.wait(min(1.0, self.interval)):
            with self._lock:
                task_ids = list(self._last_line)
            for task_id in task_ids:
                self._print_line(task_id, when=self._due)

    def _due(self, task: Task, last: tuple[float, float] | None) -> bool:
        """Whether a running task's next line is due: see the class."""
        if last is None:  # its first line: at its first step, or after an interval without one
            return task.completed > 0 or task.finished or (task.elapsed or 0) >= self.interval
        if task.completed == last[1] and task.finished:
            return False  # its last line was its final one
        waited = self.get_time() - last[0]
        tenth = (task.total or 0) / 10
        return (waited >= self.interval or task.finished
                or (tenth > 0 and task.completed - last[1] >= tenth and waited >= self.interval / 10))

    def _print_line(self, task_id: TaskID, when: Callable[[Task, tuple[float, float] | None], bool]) -> None:
        """Prints the task's line to stderr if ``when(task, its last line)`` says so."""
        if not self.plain or task_id not in self._last_line:
            return
        with self._lock:
            task = self._tasks[task_id]
            if not when(task, self._last_line[task_id]):
                return
            self._last_line[task_id] = (self.get_time(), task.completed)
            err_console.print(progress_line(task, self.unit), markup=False, highlight=False, soft_wrap=True)


def progress_line(task: Task, unit: str) -> str:
    """A task's progress in one plain line, e.g. ``koala | 120/1000 images (12%) | 3.20 images/s | 0:00:37
    elapsed | ETA 0:04:35``.

    Args:
        task: A task of a progress bar.
        unit: What its count counts.
    """

    def clock(seconds: float | None) -> str:
        return "--" if seconds is None else str(timedelta(seconds=round(seconds)))

    count = f"{task.completed:g}/{task.total:g} {unit}" if task.total else f"{task.completed:g} {unit}"
    if task.total:
        count += f" ({task.percentage:.0f}%)"
    speed = task.finished_speed or task.speed
    rate = f"{speed:.2f} {unit}/s" if speed else f"-- {unit}/s"
    description = Text.from_markup(task.description).plain
    return f"{description} | {count} | {rate} | {clock(task.elapsed)} elapsed | ETA {clock(task.time_remaining)}"


def progress_bar(unit: str = "images", get_time: Callable[[], float] | None = None) -> StageProgress:
    """A rich progress bar with count, rate and time left, drawn on stderr by the main process; plain lines
    instead when stderr is not a terminal (:class:`StageProgress`).

    Args:
        unit: What the count counts.
        get_time: The clock of the rates and the lines' interval (tests pass a fake one); rich's by default.
    """
    return StageProgress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        unit=unit,
        plain=not err_console.is_terminal,
        console=err_console,
        transient=False,
        disable=not is_main_process(),
        get_time=get_time,
    )


def warn(message: str) -> None:
    if not is_main_process():
        return
    err_console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


# bitsandbytes, imported through diffusers, peft and pyiqa, logs on every import on CPUs with AVX512-BF16 that an
# optional kernel package for 4-bit layers on the CPU is missing. spurgen uses no 4-bit layers (only the 8-bit Adam),
# so the line is noise in every run's output; the filter drops that message of that logger only.
_LIBRARY_NOISE = {"bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community"}


def _drop_library_noise() -> None:
    """Installs the filters of _LIBRARY_NOISE; they must be in place before the libraries are imported."""
    for logger, start in _LIBRARY_NOISE.items():
        logging.getLogger(logger).addFilter(lambda record, start=start: not str(record.msg).startswith(start))


_drop_library_noise()


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
