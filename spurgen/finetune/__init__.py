"""Stage 2, ``spurgen finetune``: DreamBooth on Stable Diffusion plus the spurious feature similarity loss.

For each class, the references that select-refs chose (``refs/<class>/``) are the instance images, captioned
"a photo of sks <noun>"; class images that the frozen base model generates for "a photo of <noun>" keep the
model's prior. One micro-step, for b references and b class images (method.md §2):

    z = E(x)                    VAE latents, encoded once per image (the VAE is frozen)
    t ~ U[0, T), eps ~ N(0, I)  z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps
    pred = unet(z_t, t, text_encoder(prompt))
    L_inst  = |target - pred|^2 on the b instance rows      (target: eps, or v for v-prediction models)
    L_prior = |target - pred|^2 on the b class rows
    L_SFSL  = 1 - cos(s_k(decode(z0_hat)), s_k(x_ref)) on the instance rows with t <= bound,
              z0_hat the one-step estimate of z from pred; gradients flow through the decoder (the VAE's, or
              --sfsl-decoder's)
    L = L_inst + lambda L_prior + kappa L_SFSL

Each SFSL row is weighted by its timestep (``--sfsl-row-weighting``, default ``v-profile``: sqrt(abar_t) for
epsilon models), so that SFSL's gradient at the UNet's output has the same profile over t on every kind of model.
``--sfsl-every N`` computes L_SFSL on every N-th optimizer step only, with weight kappa * N, so that its expected
gradient per step stays kappa's; the default N = 1 is the paper's every step.

A step runs without the host waiting for the device: its loss terms and diagnostics stay on the device and are
read in batches (every step on a CPU, every 10 on an accelerator, and before every save), and a step whose loss or
gradient norm is not finite is skipped on the device, then reported at the next read.

Training runs on accelerate: one process, or ``accelerate launch`` for data-parallel training where each
process draws its own batch; mixed precision; gradient accumulation over the UNet and the text encoder.
Every random draw of a micro-step comes from a generator seeded by (seed, process, step, micro-step), so a
run resumed from a checkpoint continues exactly as if it had never stopped.

A run's folder ``models/<class>/<run>/`` holds the weights (``pytorch_lora_weights.safetensors`` or a
complete diffusers pipeline), ``validation/step-N/`` (scored by classifiers, :mod:`.validation`), ``losses.csv``,
``README.md`` (the model card), ``checkpoints/checkpoint-N/``, ``best/`` (``--keep-best``), ``logs/`` (local
trackers, :mod:`.trackers`), and ``training.json``: ``"running"`` while training, ``"failed"`` after a
non-finite loss, and ``"complete"`` only once everything else is written.

This module is the per-class loop; its parts are :mod:`.plan` (what to do with each class, the resume
decision), :mod:`.trainer` (models, adapters, optimizer, the step, checkpoints), :mod:`.diffusion` (targets and
the one-step estimate), :mod:`.sfsl` and :mod:`.npca` (the loss and the neural PCA), :mod:`.class_images` (the
prior-preservation cache) and :mod:`.outputs` (manifest, model card, losses).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .._base_model import BaseModel, resolve_base_model, vae_config
from .._runtime import PROGRESS_INTERVAL_S, console, progress_bar, resolve_device
from ..classifiers import Classifier, load_classifiers
from ..config import FinetuneConfig
from ..errors import SpurgenError
from ..labels import ClassInfo, get_label_set
from ..workspace import (CHECKPOINT_STATE, TRAINING_FILE, Workspace, atomic_write_bytes, atomic_write_json,
                         read_json, utc_now)
from .compile import check_compile
from .diffusion import predicted_original, training_target
from .outputs import loss_summary, noise_record, progress_text, training_manifest, write_final_outputs, write_losses
from .plan import ClassPlan, latest_checkpoint, plan_classes, resume_key
from .sfsl import SpuriousFeature, load_sfsl_decoder, spurious_feature
from .trackers import finish_trackers, log_rows, resolve_trackers, start_trackers
from .trainer import NonFiniteLoss, Trainer, frozen_dtype
from .validation import Validation

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import AutoencoderTiny

__all__ = ["ClassPlan", "FinetuneResult", "FinetuneSetup", "Trainer", "finetune", "prepare_finetune", "plan_classes",
           "predicted_original", "training_target", "print_finetune_table"]

# What spurgen trains: DDPM's three parametrizations, and the velocity of rectified flow (FLUX.1).
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
# losses.csv is rewritten during training at this interval (and at each checkpoint), as often as a batch job's
# log gets a progress line: the file follows the run, not only its end.
LOSSES_INTERVAL_S = PROGRESS_INTERVAL_S


@dataclass
class FinetuneResult:
    """The outcome of finetune for one class."""

    cls: ClassInfo
    run: str
    folder: Path
    status: str
    steps: int
    sfsl_weight: float
    last: dict[str, float | None] = field(default_factory=dict)
    seconds: float = 0.0


def finetune(config: FinetuneConfig, workspace: Workspace,
             classifier_flags: Sequence[str] = ()) -> list[FinetuneResult]:
    """Fine-tunes one model per class of ``config`` and writes ``models/<class>/<run>/``.

    Input is checked first (:func:`prepare_finetune`); classes already complete are skipped.

    Args:
        config: Resolved settings.
        workspace: Where references are read and models, checkpoints and the class image cache go.
        classifier_flags: ``--classifier NAME=ARCH[@PATH]`` values (for ``--sfsl-model``).

    Raises:
        SpurgenError: bad input (nothing is written then), or a non-finite loss (the run's folder keeps
            its last good checkpoint and says ``"failed"``).
    """
    setup = prepare_finetune(config, workspace, classifier_flags)
    results = []
    for plan in setup.plans:
        if plan.action == "skip":
            done = read_json(plan.folder / TRAINING_FILE)
            console.print(f"{plan.cls}: {plan.folder} is already complete ({done.get('steps')} steps); "
                          "--overwrite retrains it, --resume --steps N trains it further", highlight=False)
            results.append(FinetuneResult(plan.cls, plan.run, plan.folder, "skipped", done.get("steps", 0),
                                          plan.sfsl_weight, done.get("loss", {}).get("last", {})))
        else:
            results.append(_train_class(plan, config, workspace, setup))
    return results


# --- Before training: everything that can be checked is checked, nothing is written ---------------------------


@dataclass
class FinetuneSetup:
    """What finetune resolved and checked before training: base model, resolution, the classes' plans, the
    accelerator, the SFSL feature of each class whose kappa is > 0, ``--sfsl-decoder`` when given, and the
    classifiers that score validation images (the SFSL model first when it is one of them)."""

    base: BaseModel
    resolution: int
    plans: list[ClassPlan]
    accelerator: "Accelerator"
    features: dict[int, SpuriousFeature]
    sfsl_decoder: "AutoencoderTiny | None" = None
    classifiers: list[Classifier] = field(default_factory=list)

    def trainer(self, plan: ClassPlan, config: FinetuneConfig, workspace: Workspace) -> Trainer:
        """Sets up the training of one planned class (models, data, optimizer) without taking a step."""
        return Trainer(plan, config, workspace, self.base, self.resolution, self.accelerator,
                       self.features.get(plan.cls.index), self.sfsl_decoder)

    def scorers(self, plan: ClassPlan, config: FinetuneConfig) -> list[Classifier]:
        """The classifiers that score a class's validation images: none when it has no validation images, or
        neither SFSL nor ``--validation-classifiers``."""
        return self.classifiers if _scored(plan, config) else []


def prepare_finetune(config: FinetuneConfig, workspace: Workspace,
                     classifier_flags: Sequence[str] = ()) -> FinetuneSetup:
    """Checks everything that can be checked before training, and writes nothing but a probe file.

    References, base model, resolution, optional packages, the SFSL classifier (loaded only when some class
    has kappa > 0: its last layer, and the neural PCA for ``npca``), the settings of checkpoints to resume,
    and that the workspace and the models' folders are writable.

    The base model's family fills in ``config``'s family defaults (the guidance scale) in place, before the settings
    are compared with a run's or hashed into a resume key: the runs record the value used, and an SD run recorded
    with 7.5 from before these defaults existed still resumes.

    Raises:
        SpurgenError: any of these fails.
    """
    settings = workspace.settings()
    labels = get_label_set(config.labels)
    base = resolve_base_model(config.model, config.family)
    base.family.check_config(config)
    config.guidance_scale = base.family.guidance(config.guidance_scale)
    latent_channels = vae_config(base, config.vae).get("latent_channels", 4)
    if base.prediction_type not in PREDICTION_TYPES:
        raise SpurgenError(f"base model '{config.model}' predicts '{base.prediction_type}'; spurgen trains "
                           f"{', '.join(PREDICTION_TYPES)} models")
    resolution = config.resolution or base.resolution
    if resolution % base.size_multiple:
        nearest = max(base.size_multiple, resolution // base.size_multiple * base.size_multiple)
        raise SpurgenError(f"--resolution {resolution} is not a multiple of {base.size_multiple}, which this "
                           f"base model needs; try {nearest}")
    if config.zero_terminal_snr and base.prediction_type != "v_prediction":
        raise SpurgenError(f"--zero-terminal-snr needs a v-prediction base model; '{config.model}' predicts "
                           f"'{base.prediction_type}', which has nothing to predict from pure noise at the last "
                           "timestep; drop the flag (--noise-offset also widens colour and brightness)")
    plans = plan_classes(config, workspace, labels)
    _check_packages(config)
    trained = [p for p in plans if p.action != "skip"]
    if config.keep_best:
        unscored = [p for p in trained if not _scored(p, config)]
        if unscored:
            raise SpurgenError(f"--keep-best needs classifiers to score the validation images of {unscored[0].cls}; "
                               "pass --validation-classifiers NAMES (runs with SFSL are scored by --sfsl-model)")
    accelerator = _make_accelerator(config, resolve_trackers(config.trackers))
    check_compile(config.compile, accelerator.device)
    sfsl_plans = [p for p in trained if p.sfsl_weight > 0]
    # One load for SFSL and the validation metric: the SFSL model first (it scores with --validation-classifiers).
    scored = any(_scored(p, config) for p in trained)
    names = ([config.sfsl_model] if sfsl_plans or scored else []) + (config.validation_classifiers if scored else [])
    names = list(dict.fromkeys(names))
    classifiers = (load_classifiers(names, classifier_flags, labels, settings, None, str(accelerator.device))
                   if names else [])
    features: dict[int, SpuriousFeature] = {}
    if sfsl_plans:
        features = {p.cls.index: spurious_feature(classifiers[0], p.cls, config, workspace) for p in sfsl_plans}
    sfsl_decoder = None
    if sfsl_plans and config.sfsl_decoder:
        sfsl_decoder = load_sfsl_decoder(config.sfsl_decoder, latent_channels, accelerator.device,
                                         frozen_dtype(accelerator))
    for plan in plans:
        if plan.action == "resume":
            state = read_json(plan.checkpoint / CHECKPOINT_STATE)
            if state.get("key") != resume_key(config, plan, base, resolution, accelerator):
                raise SpurgenError(f"{plan.checkpoint} was saved with other settings (or references, base model, "
                                   "process count); resume with the settings it was started with, or pass --overwrite")
    workspace.ensure_writable(*(plan.folder for plan in plans), workspace.cache_dir())
    for plan in plans:
        if plan.action != "skip":
            _ensure_writable(plan.folder)
    accelerator.wait_for_everyone()  # every process has planned from the folders before training changes them
    return FinetuneSetup(base, resolution, plans, accelerator, features, sfsl_decoder, classifiers if scored else [])


def _scored(plan: ClassPlan, config: FinetuneConfig) -> bool:
    """Whether a class's validation images are scored: it has validation images, and SFSL or
    ``--validation-classifiers``."""
    return bool(config.num_validation_images and (plan.sfsl_weight > 0 or config.validation_classifiers))


def _make_accelerator(config: FinetuneConfig, trackers: list[str]) -> "Accelerator":
    """The accelerator of this command: devices, processes, mixed precision, gradient accumulation, trackers.

    Raises:
        SpurgenError: unusable mixed precision, or processes that accelerate does not join into one run.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps its settings per process: without the reset, an earlier finetune() call in this
    # process (library use, tests, benchmarks) would pin its mixed precision. The process group stays.
    AcceleratorState._reset_state()
    # cpu=True where there is no GPU lets accelerate join processes started by torchrun or
    # `accelerate launch --multi_gpu` into one data-parallel run (gloo) instead of N separate runs.
    cpu = config.device == "cpu" or resolve_device("auto").type == "cpu"
    try:
        # The logging folder is each class's run's, set when its trackers start; accelerate wants one now.
        accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=cpu,
                                  gradient_accumulation_steps=config.gradient_accumulation_steps,
                                  log_with=trackers or None, project_dir="." if trackers else None)
    except (ValueError, RuntimeError) as exc:
        raise SpurgenError(f"cannot set up training: {str(exc).splitlines()[0]}; check --mixed-precision "
                           "(fp16 needs a GPU; bf16 a recent GPU or CPU)") from None
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise SpurgenError(f"{launched} processes were launched but accelerate joined {accelerator.num_processes}; "
                           "launch with accelerate launch or torchrun, one process per GPU (--device cpu without GPUs)")
    return accelerator


def _check_packages(config: FinetuneConfig) -> None:
    """Raises SpurgenError when a flag needs an optional package that is not installed."""
    if config.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise SpurgenError("--use-8bit-adam needs bitsandbytes, which is not installed; pip install bitsandbytes "
                           "(or 'spurgen[bnb]'), or drop the flag")


def _ensure_writable(folder: Path) -> None:
    """Creates ``folder`` and probes that a file can be written in it.

    Raises:
        SpurgenError: it cannot be created or written.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpurgenError(f"cannot write {folder}: {exc.strerror or exc}; choose a writable --workspace") from None
    atomic_write_bytes(folder / ".spurgen-write-test", b"")
    (folder / ".spurgen-write-test").unlink(missing_ok=True)  # another process may have probed it too


# --- Training one class: the loop over steps, checkpoints and the run's folder -------------------------------


def _train_class(plan: ClassPlan, config: FinetuneConfig, workspace: Workspace, setup: FinetuneSetup) -> FinetuneResult:
    """Trains one class from scratch or from its checkpoint, and writes its folder."""
    accelerator = setup.accelerator
    started, clock = utc_now(), time.perf_counter()
    main = accelerator.is_main_process
    if plan.action == "train" and main:
        shutil.rmtree(plan.folder, ignore_errors=True)  # a previous model or unfinished run of this name
    trainer = setup.trainer(plan, config, workspace)
    try:  # before the manifest changes: a refused checkpoint leaves the run's folder as it was
        step, log = trainer.load_checkpoint(plan.checkpoint) if plan.checkpoint else (0, [])
    except BaseException:
        trainer.close()
        raise
    if main:  # from now until the end, the folder says it is not a finished model
        # The noise settings already: generate --checkpoint samples a run still training with its schedule.
        atomic_write_json(plan.folder / TRAINING_FILE, {"stage": "finetune", "status": "running", "started": started,
                                                        "noise": noise_record(config)})
    accelerator.wait_for_everyone()
    validation = Validation(trainer, setup.scorers(plan, config))
    try:
        start_trackers(accelerator, plan, config)
        key = resume_key(config, plan, setup.base, setup.resolution, accelerator)
        last_checkpoint = latest_checkpoint(plan.folder)
        losses_written = -float("inf")  # the file appears after the first step, then at the interval
        with progress_bar("it") as progress:
            task = progress.add_task(progress_text(plan.cls, log) if log else plan.cls.name, total=config.steps,
                                     completed=step)
            while step < config.steps:
                trainer.train_step(step)
                step += 1
                # Validation images before the checkpoint: a run resumed from checkpoint N has those of step N.
                validate = bool(config.validation_steps and step % config.validation_steps == 0
                                and step < config.steps and config.num_validation_images)
                checkpoint = bool(config.checkpointing_steps and step % config.checkpointing_steps == 0)
                # The steps' statistics are read in batches, and always before anything is saved: a non-finite
                # step stops the run before a checkpoint or the weights could hold what followed it.
                description = None  # unchanged until the next read
                if validate or checkpoint or step == config.steps or step % trainer.read_every == 0:
                    _read_log(trainer, log, started, last_checkpoint)
                    description = progress_text(plan.cls, log)
                # One update with the step and its losses, so that a progress line never shows a step without them
                progress.update(task, advance=1, description=description)
                if validate:
                    if main:
                        validation.run(step, log)
                    accelerator.wait_for_everyone()
                if checkpoint:
                    last_checkpoint = trainer.save_checkpoint(step, key, log)
                if main and (checkpoint or time.monotonic() - losses_written >= LOSSES_INTERVAL_S):
                    write_losses(plan.folder, log)
                    losses_written = time.monotonic()

        if main:  # the last validation images (scored), weights, losses and model card, then the manifest last
            validation.run(step, log)
            write_final_outputs(trainer, step, log, started, validation.best_weights(log, step))
        accelerator.wait_for_everyone()
    finally:
        finish_trackers(accelerator)
        trainer.close()
    status = "resumed" if plan.action == "resume" else "trained"
    return FinetuneResult(plan.cls, plan.run, plan.folder, status, step, plan.sfsl_weight, loss_summary(log)["last"],
                          time.perf_counter() - clock)


def _read_log(trainer: Trainer, log: list[dict[str, Any]], started: str, last_checkpoint: Path | None) -> None:
    """Appends the rows of the steps queued since the last read to ``log``, and logs them to the trackers.

    Raises:
        SpurgenError: a step's loss or gradient norm was not finite; the run's manifest then says ``"failed"``
            after the steps before it, and names the last good checkpoint.
    """
    plan, config = trainer.plan, trainer.config
    try:
        rows = trainer.read_rows()
    except NonFiniteLoss as exc:
        log.extend(exc.rows)
        where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
        if trainer.accelerator.is_main_process:
            write_losses(plan.folder, log)
            atomic_write_json(plan.folder / TRAINING_FILE, training_manifest(
                plan, config, trainer, "failed", exc.step, log, started, error=str(exc),
                last_checkpoint=str(last_checkpoint) if last_checkpoint else None))
        raise SpurgenError(f"{plan.cls}: {exc}; stopped, {where}. Lower --learning-rate, use --mixed-precision bf16 "
                           "or no, then --resume (or --overwrite)") from None
    log.extend(rows)
    log_rows(trainer.accelerator, rows)


def print_finetune_table(results: Sequence[FinetuneResult]) -> None:
    """The per-class summary table of finetune."""
    from rich.table import Table

    table = Table(title="finetune")
    for column in ("class", "run", "status", "steps", "kappa", "loss", "inst", "prior", "sfsl", "time"):
        table.add_column(column, justify="left" if column in ("class", "run", "status") else "right")
    for r in results:
        losses = ["" if r.last.get(t) is None else f"{r.last[t]:.4f}" for t in ("loss", "inst", "prior", "sfsl")]
        table.add_row(str(r.cls), r.run, r.status, str(r.steps), f"{r.sfsl_weight:g}", *losses,
                      f"{r.seconds:.0f} s" if r.status != "skipped" else "")
    console.print(table)
