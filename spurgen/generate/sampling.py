"""The sampling side of ``spurgen generate``: pipelines, schedulers, LoRA loading and the batch loop."""

from __future__ import annotations

import contextlib
import inspect
import io
import itertools
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Sequence

from .._base_model import _read_config, image_generator
from .._runtime import distributed_state, dtype_argument, library_progress_bars_off
from ..config import MODEL_SCHEDULER, SCHEDULERS, ZERO_SNR_SCHEDULER, GenerateConfig, find_scheduler
from ..errors import SpurgenError
from ..workspace import atomic_write_bytes
from .filters import ImageFilters
from .runs import ModelPlan, RunState, image_name

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

__all__ = ["torch_dtype", "build_scheduler", "PipelineSlot", "fill_run"]

MANIFEST_INTERVAL_S = 10.0
_ADAPTER = "lora"  # the adapter name of the run's LoRA while it is loaded


def torch_dtype(name: str, device: "torch.device") -> "torch.dtype":
    """The precision a --dtype name means on a device ('auto': fp16 on CUDA, fp32 elsewhere)."""
    import torch

    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def build_scheduler(name: str, model_config: Any, schedule: dict[str, Any] | None = None) -> Any:
    """A diffusers scheduler by its user-facing name, built from the model's scheduler config.

    Building from the model's config keeps its noise schedule and prediction type (v-prediction for
    SD 2.x-768); ``"model"`` returns ``None`` (keep the model's own scheduler) unless ``schedule`` asks for
    another schedule, which is then built on the model's own scheduler class.

    Args:
        name: ``--scheduler``, any spelling :func:`~spurgen.config.find_scheduler` knows.
        model_config: The model's scheduler config (its ``_class_name`` is the class of ``"model"``).
        schedule: Scheduler settings the run was trained on (a zero-terminal-SNR run's rescaled betas and trailing
            timesteps), applied over the sampler's own.

    Raises:
        SpurgenError: an unknown name, or a sampler whose class has no such settings (from_config would drop them
            with a warning and sample the schedule the run was not trained on).
    """
    import diffusers

    canonical = find_scheduler(name)
    if canonical is None:
        raise SpurgenError(f"unknown scheduler {name!r}; use one of {', '.join(SCHEDULERS)} or '{MODEL_SCHEDULER}'")
    if canonical == MODEL_SCHEDULER and not schedule:
        return None
    class_name, overrides = ((model_config["_class_name"], {}) if canonical == MODEL_SCHEDULER
                             else SCHEDULERS[canonical])
    if schedule and not _takes(class_name, schedule):
        able = [n for n, (other, _) in SCHEDULERS.items() if _takes(other, schedule)]
        settings = ", ".join(f"{key}={value!r}" for key, value in schedule.items())
        raise SpurgenError(f"--scheduler {name} ({class_name}) cannot sample the schedule this run was trained on "
                           f"({settings}: --zero-terminal-snr); pick one of {', '.join(able)}, or leave --scheduler "
                           f"unset for {ZERO_SNR_SCHEDULER}, the sampler of its validation images")
    return getattr(diffusers, class_name).from_config(model_config, **overrides, **(schedule or {}))


def _takes(class_name: str, schedule: dict[str, Any]) -> bool:
    """Whether the diffusers scheduler class has every setting of ``schedule``."""
    import diffusers

    return set(schedule) <= set(inspect.signature(getattr(diffusers, class_name).__init__).parameters)


def _load_pipeline(folder: Path, dtype: "torch.dtype", device: "torch.device",
                   safety_checker: bool) -> "DiffusionPipeline":
    """The pipeline of the folder's model family (:mod:`spurgen.families`) on ``device``, without progress bars.

    Args:
        folder: A diffusers pipeline folder of a supported family.
        dtype: Precision of its weights.
        device: Where it runs.
        safety_checker: Keep the folder's safety checker, when it has one (``--no-safety-checker``: never).

    Raises:
        SpurgenError: ``folder`` holds no loadable pipeline.
    """
    from ..families import detect_family

    family = detect_family(_read_config(folder / "model_index.json", str(folder)), str(folder))
    # A hub snapshot fetched by finetune lacks the safety checker (its download is skipped for training);
    # a model folder that has one keeps it.
    try:
        with library_progress_bars_off():
            checker = {} if safety_checker and (folder / "safety_checker").is_dir() else family.pipeline_arguments
            pipe = family.pipeline_class().from_pretrained(folder, **dtype_argument(dtype), **checker)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpurgenError(f"cannot load a {family.title} pipeline from {folder} ({first}); give a diffusers "
                           f"{family.title} folder or hub id") from None
    pipe.set_progress_bar_config(disable=True)
    # Attention runs through PyTorch's scaled_dot_product_attention (diffusers' default AttnProcessor2_0),
    # which picks flash / memory-efficient kernels on GPUs.
    return pipe.to(device)


def _png_bytes(image: Any) -> bytes:
    """A PIL image encoded as PNG."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _pil_images(images: "torch.Tensor") -> list[Any]:
    """The pipeline's images (N x C x H x W in [0, 1]) as PIL images, byte for byte those of diffusers'
    ``output_type="pil"``: scaled by 255 in float32, rounded half to even.

    Speed: quantised where they were made; on a GPU only the 8-bit pixels cross to the host, which does no float
    work on them.
    """
    import torch
    from PIL import Image

    pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return [Image.fromarray(image) for image in pixels]


def _write_png(path: Path, image: Any) -> None:
    """Encodes an image as PNG and writes it atomically."""
    atomic_write_bytes(path, _png_bytes(image))


class _ImageWriter:
    """Speed: encodes and writes a run's images on threads (zlib releases the GIL), a batch's images in parallel,
    while the pipeline samples the next batch. An image is recorded in the run once its file exists.

    Args:
        state: The run the images belong to.
    """

    def __init__(self, state: RunState) -> None:
        self.state = state
        self.flagged = 0
        self._pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="spurgen-png")
        self._pending: list[tuple[int, bool | None, Future[None]]] = []

    def put(self, batch: Sequence[int], images: Sequence[Any], flags: Sequence[bool | None]) -> list[int]:
        """Queues a batch's writes, then waits for the batch before it; returns the images recorded."""
        earlier = self._pending
        self._pending = [(i, None if flag is None else bool(flag),
                          self._pool.submit(_write_png, self.state.folder / image_name(i), image))
                         for i, image, flag in zip(batch, images, flags)]
        return self._settle(earlier)

    def flush(self) -> list[int]:
        """Waits for every queued write; returns the images recorded."""
        pending, self._pending = self._pending, []
        return self._settle(pending)

    def _settle(self, pending: list[tuple[int, bool | None, Future[None]]]) -> list[int]:
        """Waits for writes and records each image written.

        Raises:
            The first write's error, once every write has ended (a write is atomic: a failed one leaves no file).
        """
        error: BaseException | None = None
        written = []
        for i, flag, future in pending:
            try:
                future.result()
            except BaseException as exc:  # noqa: BLE001 - raised below, once the other writes are recorded
                error = error or exc
                continue
            self.state.record(i, flag)
            self.flagged += bool(flag)
            written.append(i)
        if error is not None:
            raise error
        return written

    def __enter__(self) -> "_ImageWriter":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if kind is not None:
            # Interrupted or failed: the writes under way still end whole and those that succeeded are recorded,
            # for the manifest that fill_run writes next; the error in flight is the one raised.
            with contextlib.suppress(BaseException):
                self.flush()
        self._pool.shutdown(wait=True)


def _chunks(items: Sequence[int], size: int) -> Iterable[list[int]]:
    """``items`` in consecutive lists of at most ``size``."""
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


def _batches(state: RunState, batch_size: int) -> Iterator[list[int]]:
    """The batches of images to make: the run's share of the missing ones.

    With --until, the images are taken in index order and a batch holds no more than the images still
    wanted, so no more than that many can pass; it ends once enough passed or at the --max-images limit.
    """
    if state.until is None:
        yield from _chunks(state.todo, batch_size)
        return
    remaining = iter(state.todo)
    while not state.finished():
        batch = list(itertools.islice(remaining, min(batch_size, state.until.wanted - state.until.accepted)))
        if not batch:
            return
        yield batch


def _sample(pipe: "DiffusionPipeline", state: RunState, config: GenerateConfig, progress: Any,
            filters: ImageFilters | None) -> int:
    """Makes the run's missing images batch by batch; returns how many the safety checker flagged.

    With --until, each batch is judged by ``filters`` as soon as it is written.
    """
    resolution, guidance = state.header["settings"]["resolution"], state.header["settings"]["guidance"]
    until = state.until
    task = progress.add_task(f"{state.plan.cls.dirname}/{state.plan.run}" + (" accepted" if until else ""),
                             total=until.wanted if until else len(state.todo), completed=until.accepted if until else 0)
    written = time.monotonic()
    main = distributed_state().is_main_process
    with _ImageWriter(state) as writer:
        for batch in _batches(state, config.batch_size):
            # One CPU generator per image: its starting noise and any ancestral noise are drawn from seed + i
            # alone, so neither the batch it falls in nor the device changes it.
            generators = [image_generator(config.seed + i) for i in batch]
            negative = [state.plan.negative_prompt] * len(batch) if state.plan.negative_prompt else None
            output = pipe(prompt=[state.plan.prompt] * len(batch), negative_prompt=negative,
                          num_inference_steps=config.steps, guidance_scale=guidance,
                          height=resolution, width=resolution, generator=generators,
                          output_type="pt")
            # Only SD 1.x/2.x pipelines have a safety checker.
            flags = getattr(output, "nsfw_content_detected", None) or [None] * len(batch)
            done = writer.put(batch, _pil_images(output.images), flags)
            if filters is not None:  # the filters read this batch's files
                done += writer.flush()
                state.judge(filters, batch)
            # The images themselves are the progress a re-run resumes from; the manifest adds only the safety
            # checker's flags, so it is rewritten (a synced file) at most every MANIFEST_INTERVAL_S seconds, once
            # the writes under way have ended (their files would otherwise be listed without their flags).
            if main and time.monotonic() - written >= MANIFEST_INTERVAL_S:
                done += writer.flush()
                state.write()
                written = time.monotonic()
            if until:
                progress.update(task, completed=until.accepted)
            else:
                progress.advance(task, len(done))
        progress.advance(task, len(writer.flush()))
    return writer.flagged


class PipelineSlot:
    """The one pipeline held in memory; loading another folder releases the previous pipeline first."""

    def __init__(self, dtype: "torch.dtype", device: "torch.device", safety_checker: bool) -> None:
        self.dtype, self.device, self.safety_checker = dtype, device, safety_checker
        self.folder: Path | None = None
        self.pipe: Any = None
        self.scheduler: Any = None  # the pipeline's own scheduler, kept while runs swap in others

    def get(self, folder: Path) -> "DiffusionPipeline":
        """The pipeline of ``folder``, loaded unless it is the one held."""
        if folder != self.folder:
            self.folder = self.pipe = self.scheduler = None
            self.pipe = _load_pipeline(folder, self.dtype, self.device, self.safety_checker)
            self.folder, self.scheduler = folder, self.pipe.scheduler
        return self.pipe


def fill_run(pipelines: PipelineSlot, state: RunState, config: GenerateConfig, progress: Any,
             filters: ImageFilters | None) -> int:
    """Loads the run's model (LoRA onto its base) and makes its missing images; returns the flagged count."""
    plan = state.plan
    pipe = pipelines.get(plan.pipeline.path)
    settings = state.header["settings"]
    pipe.scheduler = (build_scheduler(settings["scheduler"], pipelines.scheduler.config, settings.get("schedule"))
                      or pipelines.scheduler)
    if plan.lora_file:
        # Before anything is written: a LoRA of another base model is bad input.
        _load_lora(pipe, plan, config.lora_scale)
    state.folder.mkdir(parents=True, exist_ok=True)
    main = distributed_state().is_main_process
    if main:
        state.write()  # "incomplete" before the first image: a crash leaves a resumable folder
    try:
        return _sample(pipe, state, config, progress, filters)
    except BaseException:
        if main:
            state.write()  # an interrupted run still records the images it made (Ctrl-C, an error in a batch)
        raise
    finally:
        if plan.lora_file:
            pipe.unload_lora_weights()


def _load_lora(pipe: "DiffusionPipeline", plan: ModelPlan, scale: float) -> None:
    """Loads the run's LoRA weights onto the pipeline, their update scaled by ``scale`` (--lora-scale).

    The scale is set on the adapter (UNet and text encoder alike, as diffusers' ``cross_attention_kwargs``
    scale would) rather than passed with every call: scale 0 leaves the base model's outputs exactly.

    Raises:
        SpurgenError: the weights do not fit the pipeline (a LoRA of another base model).
    """
    from diffusers.utils import logging as diffusers_logging

    # A UNet-only run (preset dreambooth) has no text-encoder keys, which diffusers reports as a warning.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        pipe.load_lora_weights(plan.lora_file.parent, weight_name=plan.lora_file.name, adapter_name=_ADAPTER)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        # torch's "Error(s) in loading state_dict for ...:" header says less than the first mismatch under it.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        first = next((line for line in lines if not line.endswith(":")), lines[0] if lines else type(exc).__name__)
        raise SpurgenError(f"cannot load the LoRA of run '{plan.run}' ({plan.lora_file}) onto "
                           f"{plan.base_model} ({first}); it must be loaded onto the base model it was trained "
                           "on") from None
    finally:
        diffusers_logging.set_verbosity(verbosity)
    if scale != 1.0:
        pipe.set_adapters(_ADAPTER, adapter_weights=scale)
