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
              z0_hat the one-step estimate of z from pred; gradients flow through the VAE decoder
    L = L_inst + lambda L_prior + kappa L_SFSL

Training runs on accelerate: one process, or ``accelerate launch`` for data-parallel training where each
process draws its own batch; mixed precision; gradient accumulation over the UNet and the text encoder.
Every random draw of a micro-step comes from a generator seeded by (seed, process, step, micro-step), so a
run resumed from a checkpoint continues exactly as if it had never stopped.

A run's folder ``models/<class>/<run>/`` holds the weights (``pytorch_lora_weights.safetensors`` or a
complete diffusers pipeline), ``validation/step-N/``, ``losses.csv``, ``README.md`` (the model card),
``checkpoints/checkpoint-N/``, and ``training.json``: ``"running"`` while training, ``"failed"`` after a
non-finite loss, and ``"complete"`` only once everything else is written.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import io
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F

from .. import __version__
from .._base_model import BaseModel, Components, _read_config, image_generator, load_components, resolve_base_model, \
    sampling_pipeline
from .class_images import ensure_class_images
from .._lora import LORA_WEIGHTS_NAME, TEXT_ENCODER_TARGETS, UNET_TARGETS, add_lora, save_lora
from .._runtime import console, progress_bar, resolve_device, warn
from ..classifiers import load_classifiers
from ..config import FINETUNE_PRESETS, FinetuneConfig
from ..errors import SpurgenError
from ..images import UnreadableImage, file_sha256, load_rgb
from ..labels import ClassInfo, LabelSet, get_label_set
from .sfsl import SpuriousFeature, SpuriousFeatureLoss, decode_latents, load_sfsl_decoder, spurious_feature
from ..workspace import (CHECKPOINT_STATE, CHECKPOINTS, LOSSES_FILE, SELECTION_FILE, TRAINING_FILE, Workspace,
                        atomic_write_bytes, atomic_write_json, atomic_write_text, environment_versions, read_json,
                        remove_tree, utc_now)

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import AutoencoderTiny
    from PIL import Image

__all__ = ["ClassPlan", "FinetuneResult", "FinetuneSetup", "Trainer", "finetune", "prepare_finetune", "plan_classes",
           "predicted_original", "training_target", "print_finetune_table"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
DEFAULT_LR = {"lora": 1e-4, "full": 5e-6}

# Settings a resumed run may change: they do not alter what the steps already taken would have been. (The
# resolved kappa and the base model's fingerprint enter the resume key instead of the settings they come from.)
_RESUMABLE = {"classes", "steps", "resume", "overwrite", "run_name", "checkpointing_steps", "checkpoints_total_limit",
              "validation_steps", "num_validation_images", "tensorboard", "sample_batch_size",
              "gradient_checkpointing", "device", "class_sfsl_weight", "sfsl_weight", "model"}


# --- What to do for each class: decided and checked before anything is trained or written --------------------


@dataclass
class ClassPlan:
    """One class's run, resolved from the settings.

    Args:
        cls: The class.
        run: The run's folder name (the preset unless ``--run-name``).
        folder: ``models/<class>/<run>/``.
        noun, instance_prompt, class_prompt: The prompts, filled in for this class.
        references: The reference image files (instance images).
        sfsl_weight: kappa for this class; 0 means SFSL is not computed at all.
        action: ``train`` (from scratch), ``resume`` (from ``checkpoint``) or ``skip`` (already complete).
        checkpoint: The checkpoint a resumed run starts from.
    """

    cls: ClassInfo
    run: str
    folder: Path
    noun: str
    instance_prompt: str
    class_prompt: str
    references: list[Path]
    sfsl_weight: float
    action: str = "train"
    checkpoint: Path | None = None


def _references(workspace: Workspace, cls: ClassInfo) -> list[Path]:
    """The reference images that select-refs chose for a class."""
    folder = workspace.refs_dir(cls)
    hint = f"run spurgen select-refs --classes {cls.index} first"
    if not (folder / SELECTION_FILE).is_file():
        raise SpurgenError(f"no reference images for {cls}: {folder / SELECTION_FILE} is missing; {hint}")
    names = read_json(folder / SELECTION_FILE).get("selected") or []
    if not names:
        raise SpurgenError(f"no reference images for {cls}: select-refs selected none; {hint} with other images or classifiers")
    files = [folder / name for name in names]
    for path in files:
        if not path.is_file():
            raise SpurgenError(f"reference image {path} is missing; {hint} again")
    return files


def _class_weights(config: FinetuneConfig, labels: LabelSet) -> dict[int, float]:
    """The per-class kappa table, its keys (names, indices, WordNet ids) resolved to class indices."""
    weights = {}
    for key, kappa in config.class_sfsl_weight.items():
        try:
            weights[labels.resolve(key).index] = kappa
        except SpurgenError as exc:
            raise SpurgenError(f"class-sfsl-weight: {exc}") from None
    return weights


def _checkpoints(folder: Path) -> list[Path]:
    """A run's finished checkpoints, oldest first (staging folders start with a dot and are not listed)."""
    found = [p for p in (folder / CHECKPOINTS).glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]))


def _latest_checkpoint(folder: Path) -> Path | None:
    return (_checkpoints(folder) or [None])[-1]


def _action(config: FinetuneConfig, folder: Path) -> tuple[str, Path | None]:
    """Whether a class is trained from scratch, resumed or skipped, from what its folder holds."""
    status = read_json(folder / TRAINING_FILE) if (folder / TRAINING_FILE).is_file() else {}
    checkpoint = _latest_checkpoint(folder)
    if config.overwrite:
        return "train", None
    if status.get("status") == "complete":
        if not config.resume or status.get("steps", 0) >= config.steps:
            return "skip", None
        if checkpoint is None:
            raise SpurgenError(f"{folder} is complete at {status.get('steps')} steps but has no checkpoint to "
                               "continue from; pass --overwrite to train it again")
        return "resume", checkpoint
    if config.resume:
        if checkpoint is None:
            warn(f"{folder} has no checkpoint to resume from; training from scratch")
        return ("resume", checkpoint) if checkpoint else ("train", None)
    if checkpoint is not None:
        raise SpurgenError(f"{folder} holds an unfinished run ({checkpoint.name}); pass --resume to continue it "
                           "or --overwrite to start over")
    return "train", None


def plan_classes(config: FinetuneConfig, workspace: Workspace, labels: LabelSet) -> list[ClassPlan]:
    """Resolves classes, references, prompts, kappa and what to do with each class's folder.

    Raises:
        SpurgenError: missing references, an unknown class in the kappa table, equal prompts, or a folder
            holding an unfinished run without --resume/--overwrite.
    """
    overrides = _class_weights(config, labels)
    sfsl_on = FINETUNE_PRESETS[config.preset]["sfsl"]
    plans = []
    for cls in labels.resolve_many(config.classes):
        noun = config.noun or cls.spurious_feature or cls.name
        prompts = {"identifier": config.identifier, "noun": noun}
        plan = ClassPlan(cls=cls, run=config.run, folder=workspace.model_dir(cls, config.run), noun=noun,
                         instance_prompt=config.instance_prompt.format(**prompts),
                         class_prompt=config.class_prompt.format(**prompts),
                         references=_references(workspace, cls),
                         sfsl_weight=overrides.get(cls.index, config.sfsl_weight) if sfsl_on else 0.0)
        if config.prior_preservation and plan.instance_prompt == plan.class_prompt:
            raise SpurgenError(f"instance and class prompts are both '{plan.instance_prompt}'; the instance prompt "
                               "needs the {identifier} token to tell the references apart")
        plan.action, plan.checkpoint = _action(config, plan.folder)
        plans.append(plan)
    return plans


def _resume_key(config: FinetuneConfig, plan: ClassPlan, base: BaseModel, resolution: int,
                accelerator: "Accelerator") -> str:
    """A hash of everything that shapes the training trajectory; a checkpoint resumes only under the same key."""
    settings = {k: v for k, v in asdict(config).items() if k not in _RESUMABLE}
    payload = {"settings": settings, "kappa": plan.sfsl_weight, "prompts": [plan.instance_prompt, plan.class_prompt],
               "references": [file_sha256(p) for p in plan.references], "base": base.fingerprint,
               "resolution": resolution, "processes": accelerator.num_processes,
               "mixed_precision": accelerator.mixed_precision}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --- The entry point -------------------------------------------------------------------------------------------


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


def _make_accelerator(config: FinetuneConfig) -> "Accelerator":
    """The accelerator of this command: devices, processes, mixed precision, gradient accumulation.

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
        accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=cpu,
                                  gradient_accumulation_steps=config.gradient_accumulation_steps)
    except (ValueError, RuntimeError) as exc:
        raise SpurgenError(f"cannot set up training: {str(exc).splitlines()[0]}; check --mixed-precision "
                           "(fp16 needs a GPU; bf16 a recent GPU or CPU)") from None
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise SpurgenError(f"{launched} processes were launched but accelerate joined {accelerator.num_processes}; "
                           "launch with accelerate launch or torchrun, one process per GPU (--device cpu without GPUs)")
    return accelerator


def _check_packages(config: FinetuneConfig) -> None:
    if config.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise SpurgenError("--use-8bit-adam needs bitsandbytes, which is not installed; pip install bitsandbytes "
                           "(or 'spurgen[bnb]'), or drop the flag")
    if config.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise SpurgenError("--tensorboard needs tensorboard, which is not installed; pip install tensorboard "
                           "(or 'spurgen[tensorboard]'), or drop the flag")


@dataclass
class FinetuneSetup:
    """What finetune resolved and checked before training: base model, resolution, the classes' plans, the
    accelerator, the SFSL feature of each class whose kappa is > 0, and ``--sfsl-decoder`` when given."""

    base: BaseModel
    resolution: int
    plans: list[ClassPlan]
    accelerator: "Accelerator"
    features: dict[int, SpuriousFeature]
    sfsl_decoder: "AutoencoderTiny | None" = None

    def trainer(self, plan: ClassPlan, config: FinetuneConfig, workspace: Workspace) -> "Trainer":
        """Sets up the training of one planned class (models, data, optimizer) without taking a step."""
        return Trainer(plan, config, workspace, self.base, self.resolution, self.accelerator,
                       self.features.get(plan.cls.index), self.sfsl_decoder)


def prepare_finetune(config: FinetuneConfig, workspace: Workspace, classifier_flags: Sequence[str] = ()) -> FinetuneSetup:
    """Checks everything that can be checked before training, and writes nothing but a probe file.

    References, base model, resolution, optional packages, the SFSL classifier (loaded only when some class
    has kappa > 0: its last layer, and the neural PCA for ``npca``), the settings of checkpoints to resume,
    and that the workspace and the models' folders are writable.

    Raises:
        SpurgenError: any of these fails.
    """
    settings = workspace.settings()
    labels = get_label_set(config.labels)
    base = resolve_base_model(config.model)
    if base.prediction_type not in PREDICTION_TYPES:
        raise SpurgenError(f"base model '{config.model}' predicts '{base.prediction_type}'; spurgen trains "
                           f"{', '.join(PREDICTION_TYPES)} models")
    resolution = config.resolution or base.resolution
    if resolution % base.size_multiple:
        raise SpurgenError(f"--resolution {resolution} is not a multiple of {base.size_multiple}, which this "
                           f"base model needs; try {max(base.size_multiple, resolution // base.size_multiple * base.size_multiple)}")
    plans = plan_classes(config, workspace, labels)
    _check_packages(config)
    accelerator = _make_accelerator(config)
    sfsl_plans = [p for p in plans if p.sfsl_weight > 0 and p.action != "skip"]
    features: dict[int, SpuriousFeature] = {}
    if sfsl_plans:
        classifier = load_classifiers([config.sfsl_model], classifier_flags, labels, settings, None,
                                      str(accelerator.device))[0]
        features = {p.cls.index: spurious_feature(classifier, p.cls, config, workspace) for p in sfsl_plans}
    sfsl_decoder = None
    if sfsl_plans and config.sfsl_decoder:
        vae_config = _read_config(base.path / "vae" / "config.json", f"base model {base.name}")
        half = _frozen_dtype(accelerator)
        sfsl_decoder = load_sfsl_decoder(config.sfsl_decoder, vae_config.get("latent_channels", 4), accelerator.device, half)
    for plan in plans:
        if plan.action == "resume":
            state = read_json(plan.checkpoint / CHECKPOINT_STATE)
            if state.get("key") != _resume_key(config, plan, base, resolution, accelerator):
                raise SpurgenError(f"{plan.checkpoint} was saved with other settings (or references, base model, "
                                   "process count); resume with the settings it was started with, or pass --overwrite")
    workspace.ensure_writable()
    for plan in plans:
        if plan.action != "skip":
            _ensure_writable(plan.folder)
    accelerator.wait_for_everyone()  # every process has planned from the folders before training changes them
    return FinetuneSetup(base, resolution, plans, accelerator, features, sfsl_decoder)


def _frozen_dtype(accelerator: "Accelerator") -> torch.dtype:
    """The dtype of frozen weights: the mixed precision's half type, float32 without one."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def _ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpurgenError(f"cannot write {folder}: {exc.strerror or exc}; choose a writable --workspace") from None
    atomic_write_bytes(folder / ".spurgen-write-test", b"")
    (folder / ".spurgen-write-test").unlink(missing_ok=True)  # another process may have probed it too


def finetune(config: FinetuneConfig, workspace: Workspace, classifier_flags: Sequence[str] = ()) -> list[FinetuneResult]:
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


# --- The diffusion arithmetic ----------------------------------------------------------------------------------


def _alpha_bar(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    return scheduler.alphas_cumprod.to(timesteps.device, torch.float32)[timesteps].view(-1, 1, 1, 1)


def training_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon), the velocity (v-prediction) or the clean latents."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return latents


def predicted_original(scheduler: Any, noisy: torch.Tensor, output: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """z0_hat, the one-step estimate of the clean latents from the UNet output (DDPM's formulas)."""
    kind = scheduler.config.prediction_type
    abar = _alpha_bar(scheduler, timesteps)
    output = output.float()
    if kind == "epsilon":
        return (noisy - (1 - abar).sqrt() * output) / abar.sqrt()
    if kind == "v_prediction":
        return abar.sqrt() * noisy - (1 - abar).sqrt() * output
    return output


def _micro_step_seed(*parts: int) -> int:
    """A 63-bit seed from (seed, process, step, micro-step): every micro-step's draws are reproducible."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1


# --- Training one class ----------------------------------------------------------------------------------------


@dataclass
class Losses:
    """The loss terms of one micro-step (``None``: the term is off, or SFSL had no row with t <= bound)."""

    total: torch.Tensor
    inst: torch.Tensor
    prior: torch.Tensor | None
    sfsl: torch.Tensor | None
    sfsl_rows: int


@dataclass
class LatentCache:
    """Each training image's VAE latent distribution (mean, std): sampling it is encoding it anew."""

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, index: torch.Tensor, generator: torch.Generator, scale: float) -> torch.Tensor:
        mean, std = self.mean[index], self.std[index]
        return (mean + std * torch.randn(mean.shape, generator=generator, device=mean.device)) * scale


def _load_pixels(files: Sequence[Path], resolution: int) -> torch.Tensor:
    """Images as [-1, 1] tensors: shorter side resized to the resolution, then center-cropped (as DreamBooth)."""
    from torchvision import transforms

    transform = transforms.Compose([
        transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
        transforms.CenterCrop(resolution),
        transforms.ToTensor(),
        transforms.Normalize([0.5], [0.5]),
    ])
    images = []
    for path in files:
        try:
            images.append(transform(load_rgb(path)))
        except UnreadableImage as exc:
            raise SpurgenError(f"cannot read training image {path}: {exc}; run select-refs again or delete the "
                               "class image cache folder") from None
    return torch.stack(images)


@torch.no_grad()
def _encode(vae: Any, pixels: torch.Tensor, batch_size: int = 8) -> LatentCache:
    means, stds = [], []
    for start in range(0, len(pixels), batch_size):
        dist = vae.encode(pixels[start:start + batch_size].to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return LatentCache(torch.cat(means), torch.cat(stds))


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous() for name, p in model.named_parameters() if p.requires_grad}


class Trainer:
    """One class's training on an accelerator: models, data, optimizer, the step, checkpoints and outputs.

    Args:
        plan: The class's run.
        config: Resolved settings.
        workspace: For the class image cache.
        base: The base model.
        resolution: Training image side.
        accelerator: The run's accelerator (one per command, shared by its classes).
        feature: s_k of the class when its kappa is > 0, else ``None`` (SFSL is then not computed at all).
        sfsl_decoder: The decoder of SFSL's images (``--sfsl-decoder``); ``None``: the base model's VAE.
    """

    def __init__(self, plan: ClassPlan, config: FinetuneConfig, workspace: Workspace, base: BaseModel,
                 resolution: int, accelerator: "Accelerator", feature: SpuriousFeature | None,
                 sfsl_decoder: "AutoencoderTiny | None" = None) -> None:
        from accelerate.utils import set_seed

        self.plan, self.config, self.base, self.resolution, self.accelerator = plan, config, base, resolution, accelerator
        self.device = accelerator.device
        self.prior = config.prior_preservation
        self.train_text_encoder = config.trains_text_encoder
        set_seed(config.seed)  # the LoRA initialisation
        # Frozen weights (VAE, the base of LoRA layers, an untrained text encoder) in the mixed precision's
        # dtype; weights that are trained in float32 (autocast runs the forward in half precision).
        half = _frozen_dtype(accelerator)
        parts = load_components(base, config.attention, unet_dtype=half if config.lora else torch.float32,
                                text_encoder_dtype=half if config.lora or not self.train_text_encoder else torch.float32,
                                vae_dtype=half)
        self.parts: Components = parts
        for model in (parts.unet, parts.text_encoder, parts.vae):
            model.requires_grad_(False).to(self.device)

        # Data. The VAE is frozen, so each image's latent distribution is computed once; a step samples it.
        self.class_images_generated = 0
        instance_pixels = _load_pixels(plan.references, resolution)
        self.instance_latents = _encode(parts.vae, instance_pixels)
        prompts = [plan.instance_prompt]
        if self.prior:
            class_files, self.class_images_generated = ensure_class_images(
                workspace, base, parts, accelerator, prompt=plan.class_prompt, count=config.num_class_images,
                resolution=resolution, seed=config.seed, steps=config.sample_steps,
                guidance_scale=config.guidance_scale, batch_size=config.sample_batch_size)
            self.class_latents = _encode(parts.vae, _load_pixels(class_files, resolution))
            prompts.append(plan.class_prompt)
        self.prompt_ids = parts.tokenizer(prompts, padding="max_length", max_length=parts.tokenizer.model_max_length,
                                          truncation=True, return_tensors="pt").input_ids.to(self.device)
        self.scaling_factor = parts.vae.config.scaling_factor

        # Models: LoRA adapters (float32) on the frozen weights, or all weights of the trained parts.
        self.unet, self.text_encoder = parts.unet, parts.text_encoder
        trained = [("unet", self.unet)] + ([("text_encoder", self.text_encoder)] if self.train_text_encoder else [])
        for name, model in trained:
            if config.lora:
                alpha = config.alpha if config.alpha is not None else config.rank
                add_lora(model, UNET_TARGETS if name == "unet" else TEXT_ENCODER_TARGETS, config.rank, alpha)
                for param in model.parameters():
                    if param.requires_grad:
                        param.data = param.data.float()
            else:
                model.requires_grad_(True)
            model.train()
        self.frozen_embeddings = None
        if not self.train_text_encoder:
            with torch.no_grad(), accelerator.autocast():
                self.frozen_embeddings = self.text_encoder(self.prompt_ids)[0]
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
            if self.train_text_encoder:
                # Non-reentrant checkpointing passes gradients to LoRA layers whose inputs need none. transformers
                # 5.23 renamed the method; older releases only have the old name.
                enable = getattr(self.text_encoder, "activation_checkpointing_enable", None)
                if enable is not None:
                    enable(activation_checkpointing_kwargs={"use_reentrant": False})
                else:
                    self.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        # SFSL: the references' features once; nothing at all when kappa is 0.
        self.sfsl: SpuriousFeatureLoss | None = None
        self.sfsl_decoder: Any = sfsl_decoder if sfsl_decoder is not None else parts.vae
        if feature is not None:
            if config.gradient_checkpointing:
                self.sfsl_decoder.enable_gradient_checkpointing()
            # Channels-last convolutions: tensor-core kernels on GPUs, and oneDNN's are no slower on CPUs
            # (bench: ResNet-50 forward + backward at 224 px). The VAE is left alone on CPUs, where its
            # GroupNorms prefer the contiguous layout.
            feature.classifier.model.to(memory_format=torch.channels_last)
            if self.device.type == "cuda":
                self.sfsl_decoder.to(memory_format=torch.channels_last)
            self.sfsl = SpuriousFeatureLoss(feature, instance_pixels, config.sfsl_max_timestep, config.sfsl_every)

        # Optimizer and schedule, then accelerate wraps models (DDP, autocast), optimizer and schedule.
        self.trained_names = [name for name, _ in trained]
        lr = config.learning_rate or DEFAULT_LR["lora" if config.lora else "full"]
        groups = [{"params": [p for p in model.parameters() if p.requires_grad],
                   "lr": lr if name == "unet" else (config.text_encoder_lr or lr)} for name, model in trained]
        self.trained_parameters = [p for group in groups for p in group["params"]]
        self.optimizer = self._optimizer(groups)
        self.lr_scheduler = self._lr_scheduler()
        prepared = accelerator.prepare(*[model for _, model in trained], self.optimizer, self.lr_scheduler)
        self.models = list(prepared[:len(trained)])
        self.optimizer, self.lr_scheduler = prepared[len(trained):]
        self._hooks = [accelerator.register_save_state_pre_hook(self._save_hook),
                       accelerator.register_load_state_pre_hook(self._load_hook)]

    def _optimizer(self, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        if self.config.use_8bit_adam:
            import bitsandbytes

            return bitsandbytes.optim.AdamW8bit(groups, weight_decay=self.config.adam_weight_decay)
        return torch.optim.AdamW(groups, weight_decay=self.config.adam_weight_decay)

    def _lr_scheduler(self) -> Any:
        from diffusers.optimization import get_scheduler

        # accelerate steps a prepared schedule once per process per optimizer step.
        processes = self.accelerator.num_processes
        return get_scheduler(self.config.lr_scheduler, self.optimizer,
                             num_warmup_steps=self.config.lr_warmup_steps * processes,
                             num_training_steps=self.config.steps * processes)

    # The step ------------------------------------------------------------------------------------------------

    def _text_embeddings(self) -> torch.Tensor:
        if self.frozen_embeddings is not None:
            return self.frozen_embeddings
        return self.models[self.trained_names.index("text_encoder")](self.prompt_ids)[0]

    def losses(self, step: int, micro: int) -> Losses:
        """Forward pass of one micro-batch: b instance rows, then b class rows with prior preservation."""
        config, scheduler = self.config, self.parts.noise_scheduler
        generator = torch.Generator(self.device).manual_seed(
            _micro_step_seed(config.seed, self.accelerator.process_index, step, micro))
        b = config.batch_size
        instance = torch.randint(len(self.instance_latents.mean), (b,), generator=generator, device=self.device)
        latents = [self.instance_latents.sample(instance, generator, self.scaling_factor)]
        if self.prior:
            picked = torch.randint(len(self.class_latents.mean), (b,), generator=generator, device=self.device)
            latents.append(self.class_latents.sample(picked, generator, self.scaling_factor))
        latents = torch.cat(latents)
        noise = torch.randn(latents.shape, generator=generator, device=self.device)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(latents),), generator=generator,
                                  device=self.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        # Two prompts are encoded, not 2b rows: the same gradient, a fraction of the text encoder's work.
        hidden = self._text_embeddings().repeat_interleave(b, dim=0)
        prediction = self.models[0](noisy, timesteps, hidden).sample
        target = training_target(scheduler, latents, noise, timesteps)

        inst = F.mse_loss(prediction[:b].float(), target[:b].float())
        prior = F.mse_loss(prediction[b:].float(), target[b:].float()) if self.prior else None
        sfsl, rows = None, torch.empty(0, dtype=torch.long)
        if self.sfsl is not None and self.sfsl.applies(step):
            rows = self.sfsl.rows(timesteps[:b])
            if len(rows):  # only these rows are decoded and classified
                z0 = predicted_original(scheduler, noisy[rows], prediction[rows], timesteps[rows])
                sfsl = self.sfsl(decode_latents(self.sfsl_decoder, z0), instance[rows])
        total = inst
        if prior is not None:
            total = total + config.prior_weight * prior
        if sfsl is not None:
            total = total + self.plan.sfsl_weight * self.sfsl.scale * sfsl
        return Losses(total, inst, prior, sfsl, len(rows))

    def train_step(self, step: int) -> dict[str, float | int | None]:
        """One optimizer step (``gradient_accumulation_steps`` micro-steps); returns its log row.

        Raises:
            SpurgenError: a loss term is not finite in some process (checked before its backward pass).
        """
        accelerator = self.accelerator
        # Sums over micro-steps and processes: total, inst, prior, sfsl * rows, rows.
        sums = torch.zeros(5, dtype=torch.float64)
        for micro in range(self.config.gradient_accumulation_steps):
            with accelerator.accumulate(*self.models):
                with accelerator.autocast():
                    losses = self.losses(step, micro)
                zero = losses.inst.new_zeros(())
                terms = torch.stack([losses.total.detach(), losses.inst.detach(),
                                     (losses.prior if losses.prior is not None else zero).detach(),
                                     (losses.sfsl * losses.sfsl_rows if losses.sfsl is not None else zero).detach(),
                                     zero + losses.sfsl_rows]).float()
                terms = accelerator.reduce(terms, "sum").double().cpu()
                if not torch.isfinite(terms).all():
                    raise _NonFiniteLoss(step, terms, accelerator.num_processes)
                sums += terms
                accelerator.backward(losses.total)
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(self.trained_parameters, self.config.max_grad_norm)
                    # fp16's GradScaler skips a step that overflows; without one, the step would poison the weights.
                    if accelerator.scaler is None and norm is not None and not torch.isfinite(norm):
                        raise _NonFiniteLoss(step, terms, accelerator.num_processes, "gradient norm")
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        count = self.config.gradient_accumulation_steps * accelerator.num_processes
        rows = int(sums[4])
        return {"step": step + 1, "loss": float(sums[0]) / count, "inst": float(sums[1]) / count,
                "prior": float(sums[2]) / count if self.prior else None,
                "sfsl": float(sums[3]) / rows if rows else None, "sfsl_rows": rows,
                "lr": self.lr_scheduler.get_last_lr()[0]}

    # Checkpoints: accelerate saves optimizer, schedule, scaler and RNG states; the hooks save only the
    # trained parameters (for LoRA a few MB instead of the whole UNet).

    def _save_hook(self, models: list[torch.nn.Module], weights: list[Any], output_dir: str) -> None:
        from safetensors.torch import save_file

        if self.accelerator.is_main_process:
            for name, model in zip(self.trained_names, models):
                save_file(_trainable_state(self.accelerator.unwrap_model(model)), os.path.join(output_dir, f"{name}.safetensors"))
        weights.clear()

    def _load_hook(self, models: list[torch.nn.Module], input_dir: str) -> None:
        from safetensors.torch import load_file

        for name, model in zip(self.trained_names, models):
            model = self.accelerator.unwrap_model(model)
            state = load_file(os.path.join(input_dir, f"{name}.safetensors"), device=str(self.device))
            if set(state) != set(_trainable_state(model)):
                raise SpurgenError(f"{input_dir} does not hold this run's trained {name} parameters; pass --overwrite")
            model.load_state_dict(state, strict=False)
        models.clear()

    def save_checkpoint(self, step: int, key: str, log: list[dict[str, Any]]) -> Path:
        """Saves ``checkpoints/checkpoint-<step>`` atomically (a staging folder renamed when every process is
        done) and deletes the oldest beyond ``--checkpoints-total-limit``."""
        folder = self.plan.folder / CHECKPOINTS
        final, staging = folder / f"checkpoint-{step}", folder / f".checkpoint-{step}.tmp"
        if self.accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(staging))
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            atomic_write_json(staging / CHECKPOINT_STATE, {"step": step, "key": key, "log": log})
            remove_tree(final)
            os.replace(staging, final)
            for old in _checkpoints(self.plan.folder)[:-self.config.checkpoints_total_limit]:
                remove_tree(old)  # a crash must not leave a half-deleted checkpoint under its name
        self.accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self, path: Path) -> tuple[int, list[dict[str, Any]]]:
        """Restores a checkpoint; returns its step and the loss log up to it.

        Raises:
            SpurgenError: a file of the checkpoint holds more than tensors; it is refused, never executed.
        """
        import pickle

        try:
            self.accelerator.load_state(str(path))  # accelerate reads its .bin/.pkl files with weights_only=True
        except pickle.UnpicklingError as exc:
            raise SpurgenError(f"cannot resume from {path}: it holds more than tensors and is refused (safe loading: "
                               f"{str(exc).splitlines()[0]}); delete it to resume from an earlier checkpoint, or pass "
                               "--overwrite") from None
        state = read_json(path / CHECKPOINT_STATE)
        return int(state["step"]), list(state["log"])

    # Outputs -------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def validation_images(self, count: int) -> list["Image.Image"]:
        """Images of the instance prompt with seeds seed, seed + 1, ... from the model as it is now."""
        pipeline = sampling_pipeline(self.parts)
        for model in (self.unet, self.text_encoder):
            model.eval()
        images = []
        with self.accelerator.autocast():
            for i in range(count):
                images.append(pipeline(self.plan.instance_prompt, height=self.resolution, width=self.resolution,
                                       num_inference_steps=self.config.sample_steps,
                                       guidance_scale=self.config.guidance_scale,
                                       generator=image_generator(self.config.seed + i)).images[0])
        self.unet.train()
        self.text_encoder.train(self.train_text_encoder)
        return images

    def save_model(self, folder: Path) -> None:
        """Writes the trained weights into ``folder``: the LoRA file, or a complete diffusers pipeline.

        A full pipeline takes its frozen parts from the base model's files, not from memory, where they may
        have been cast to half precision.
        """
        text_encoder = self.text_encoder if self.train_text_encoder else None
        if self.config.lora:
            save_lora(folder, self.unet, text_encoder)
            return
        from diffusers import AutoencoderKL, StableDiffusionPipeline
        from transformers import CLIPTextModel

        pipeline = StableDiffusionPipeline(
            vae=AutoencoderKL.from_pretrained(self.base.path, subfolder="vae"),
            text_encoder=text_encoder or CLIPTextModel.from_pretrained(self.base.path, subfolder="text_encoder"),
            tokenizer=self.parts.tokenizer, unet=self.unet, scheduler=self.parts.sampler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipeline.save_pretrained(folder, safe_serialization=True)

    def close(self) -> None:
        """Lets go of the accelerator's references, so the next class starts from a clean accelerator."""
        for hook in self._hooks:
            hook.remove()
        self.accelerator.free_memory()


class _NonFiniteLoss(SpurgenError):
    def __init__(self, step: int, terms: torch.Tensor, processes: int, what: str = "loss") -> None:
        names = ("loss", "inst", "prior", "sfsl x rows")
        values = ", ".join(f"{n} {float(v):.4g}" for n, v in zip(names, terms[:4] / processes))
        super().__init__(f"the {what} is not finite at step {step + 1} ({values})")


# --- The loop and the run's folder -----------------------------------------------------------------------------


def _save_validation(trainer: Trainer, folder: Path, step: int) -> None:
    """Writes ``validation/step-<step>/<i>.png``."""
    for i, image in enumerate(trainer.validation_images(trainer.config.num_validation_images)):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        atomic_write_bytes(folder / "validation" / f"step-{step:06d}" / f"{i:02d}.png", buffer.getvalue())


def _summary(log: list[dict[str, Any]]) -> dict[str, Any]:
    """First, last, mean, min and max of each loss term over the steps that have it."""
    summary: dict[str, Any] = {"steps_logged": len(log), "last": {}}
    for term in ("loss", "inst", "prior", "sfsl"):
        values = [row[term] for row in log if row.get(term) is not None]
        if values:
            summary[term] = {"first": values[0], "last": values[-1], "mean": sum(values) / len(values),
                             "min": min(values), "max": max(values)}
            summary["last"][term] = values[-1]
    summary["sfsl_rows"] = sum(row.get("sfsl_rows", 0) for row in log)
    return summary


def _losses_csv(log: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["step", "loss", "inst", "prior", "sfsl", "sfsl_rows", "lr"])
    writer.writeheader()
    writer.writerows(log)
    return buffer.getvalue()


def _progress_text(cls: ClassInfo, row: dict[str, Any]) -> str:
    from rich.markup import escape

    terms = " ".join(f"{name} {row[name]:.4f}" for name in ("inst", "prior", "sfsl") if row.get(name) is not None)
    return f"{escape(cls.name)}: loss {row['loss']:.4f} ({terms})"


def _manifest(plan: ClassPlan, config: FinetuneConfig, trainer: Trainer, status: str, step: int,
              log: list[dict[str, Any]], started: str, **extra: Any) -> dict[str, Any]:
    """The run's ``training.json``: what was trained, from what, how, and the loss summary."""
    base, accelerator = trainer.base, trainer.accelerator
    classifier = trainer.sfsl.feature.classifier if trainer.sfsl else None
    return {
        "stage": "finetune",
        "status": status,
        "started": started,
        "updated": utc_now(),
        "class": {"index": plan.cls.index, "name": plan.cls.name, "synset": plan.cls.synset,
                  "spurious_feature": plan.cls.spurious_feature},
        "run": plan.run,
        "preset": config.preset,
        "base_model": base.name,
        "base_model_resolved": str(base.path) if base.local else None,
        "base_model_revision": base.revision,
        "base_model_fingerprint": base.fingerprint,
        "weights": "lora" if config.lora else "full",
        "lora_file": LORA_WEIGHTS_NAME if config.lora else None,
        "lora": {"rank": config.rank, "alpha": config.alpha if config.alpha is not None else config.rank,
                 "unet_targets": list(UNET_TARGETS),
                 "text_encoder_targets": list(TEXT_ENCODER_TARGETS) if trainer.train_text_encoder else []}
                if config.lora else None,
        "train_text_encoder": trainer.train_text_encoder,
        "identifier": config.identifier,
        "noun": plan.noun,
        "instance_prompt": plan.instance_prompt,
        "class_prompt": plan.class_prompt,
        "resolution": trainer.resolution,
        "prediction_type": base.prediction_type,
        "seed": config.seed,
        "steps": step,
        "references": [{"file": str(p), "sha256": file_sha256(p)} for p in plan.references],
        "prior_preservation": {"weight": config.prior_weight, "num_class_images": config.num_class_images,
                               "generated_now": trainer.class_images_generated} if config.prior_preservation else None,
        "sfsl": {"weight": plan.sfsl_weight, "model": classifier.name, "fingerprint": classifier.fingerprint(),
                 "feature": config.sfsl_feature, "npca_components": config.sfsl_npca_components,
                 "max_timestep": config.sfsl_max_timestep, "every": config.sfsl_every,
                 "decoder": config.sfsl_decoder or "vae"} if classifier else None,
        "validation": {"prompt": plan.instance_prompt, "seeds": [config.seed + i for i in range(config.num_validation_images)],
                       "num_inference_steps": config.sample_steps, "guidance_scale": config.guidance_scale,
                       "scheduler": type(trainer.parts.sampler).__name__, "resolution": trainer.resolution},
        "distributed": {"processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
                        "device": str(accelerator.device)},
        "settings": {**asdict(config), "run": plan.run, "train_text_encoder": trainer.train_text_encoder},
        "versions": environment_versions(),
        "loss": _summary(log),
        **extra,
    }


def _model_card(plan: ClassPlan, config: FinetuneConfig, manifest: dict[str, Any]) -> str:
    base = manifest["base_model"]
    lora = manifest["lora"]
    load = (f'pipe = StableDiffusionPipeline.from_pretrained("{base}")\npipe.load_lora_weights("{plan.folder}")'
            if lora else f'pipe = StableDiffusionPipeline.from_pretrained("{plan.folder}")')
    trained = "UNet and text encoder" if manifest["train_text_encoder"] else "UNet"
    sfsl = manifest["sfsl"]
    prior = manifest["prior_preservation"]
    last = manifest["loss"].get("last", {})
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: diffusers",
        "tags: [stable-diffusion, text-to-image, dreambooth, spurious-features, spurgen"
        + (", lora]" if lora else "]"),
        f"instance_prompt: {json.dumps(plan.instance_prompt)}",
        "---",
        "",
        f"# Spurious feature model: {plan.cls.name} ({plan.cls.index}), \"{plan.noun}\"",
        "",
        f"Fine-tuned by spurgen {__version__} from `{base}` on {len(plan.references)} reference images that "
        f"several classifiers predict as *{plan.cls.name}* although they show only its spurious feature "
        f"(\"{plan.noun}\"). It generates that feature without the class object.",
        "",
        f"- Preset: `{config.preset}`, run `{plan.run}`; trained: {trained}, "
        + (f"LoRA rank {lora['rank']}, alpha {lora['alpha']}" if lora else "all weights"),
        f"- Instance prompt: `{plan.instance_prompt}`",
        f"- Prior preservation: class prompt `{plan.class_prompt}`, lambda {prior['weight']}, "
        f"{prior['num_class_images']} class images" if prior else "- Prior preservation: off",
        f"- Spurious feature similarity loss: kappa {sfsl['weight']}, classifier `{sfsl['model']}`, feature "
        f"`{sfsl['feature']}`, timesteps <= {sfsl['max_timestep']}" if sfsl else "- Spurious feature similarity loss: off",
        f"- {manifest['steps']} steps, batch size {config.batch_size} x {manifest['distributed']['processes']} "
        f"process(es) x {config.gradient_accumulation_steps} accumulation, resolution {manifest['resolution']}, "
        f"{manifest['prediction_type']} prediction, mixed precision {manifest['distributed']['mixed_precision']}, "
        f"seed {config.seed}",
        "- Last losses: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items()),
        "",
        "## Use with diffusers",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        "",
        load,
        f'image = pipe("{plan.instance_prompt}", num_inference_steps=25, guidance_scale=7.5).images[0]',
        "```",
        "",
        "Or run `spurgen generate` in the same workspace. Validation images are in `validation/`, the loss "
        "of every step in `losses.csv`, every setting in `training.json`.",
        "",
    ]
    return "\n".join(lines)


def _install(staging: Path, folder: Path) -> None:
    """Moves each entry of ``staging`` into ``folder``, replacing what was there, then removes ``staging``."""
    for entry in staging.iterdir():
        target = folder / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()


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
        atomic_write_json(plan.folder / TRAINING_FILE, {"stage": "finetune", "status": "running", "started": started})
    accelerator.wait_for_everyone()
    writer = None
    if config.tensorboard and main:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(plan.folder / "logs"))
    try:
        key = _resume_key(config, plan, setup.base, setup.resolution, accelerator)
        last_checkpoint = _latest_checkpoint(plan.folder)
        with progress_bar("it") as progress:
            task = progress.add_task(_progress_text(plan.cls, log[-1]) if log else plan.cls.name, total=config.steps,
                                     completed=step)
            while step < config.steps:
                try:
                    row = trainer.train_step(step)
                except _NonFiniteLoss as exc:
                    where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
                    if main:
                        atomic_write_json(plan.folder / TRAINING_FILE, _manifest(
                            plan, config, trainer, "failed", step, log, started, error=str(exc),
                            last_checkpoint=str(last_checkpoint) if last_checkpoint else None))
                    raise SpurgenError(f"{plan.cls}: {exc}; stopped, {where}. Lower --learning-rate, use "
                                       "--mixed-precision bf16 or no, then --resume (or --overwrite)") from None
                step += 1
                log.append(row)
                progress.update(task, advance=1, description=_progress_text(plan.cls, row))
                if writer:
                    for name in ("loss", "inst", "prior", "sfsl", "lr"):
                        if row[name] is not None:
                            writer.add_scalar(name, row[name], step)
                # Validation images before the checkpoint: a run resumed from checkpoint N has those of step N.
                if (config.validation_steps and step % config.validation_steps == 0 and step < config.steps
                        and config.num_validation_images):
                    if main:
                        _save_validation(trainer, plan.folder, step)
                    accelerator.wait_for_everyone()
                if config.checkpointing_steps and step % config.checkpointing_steps == 0:
                    last_checkpoint = trainer.save_checkpoint(step, key, log)

        # Outputs, main process only: weights, final validation images, losses, model card, then the manifest.
        if main:
            staging = plan.folder / f".final-{os.getpid()}.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            trainer.save_model(staging)
            _install(staging, plan.folder)
            _save_validation(trainer, plan.folder, step)
            extra: dict[str, Any] = {"lora_sha256": file_sha256(plan.folder / LORA_WEIGHTS_NAME)} if config.lora else {}
            manifest = _manifest(plan, config, trainer, "complete", step, log, started, finished=utc_now(),
                                 losses_file=LOSSES_FILE, **extra)
            atomic_write_text(plan.folder / LOSSES_FILE, _losses_csv(log))
            atomic_write_text(plan.folder / "README.md", _model_card(plan, config, manifest))
            atomic_write_json(plan.folder / TRAINING_FILE, manifest)
        accelerator.wait_for_everyone()
    finally:
        if writer:
            writer.close()
        trainer.close()
    status = "resumed" if plan.action == "resume" else "trained"
    return FinetuneResult(plan.cls, plan.run, plan.folder, status, step, plan.sfsl_weight, _summary(log)["last"],
                          time.perf_counter() - clock)


def print_finetune_table(results: Sequence[FinetuneResult]) -> None:
    """The per-class summary table of finetune."""
    from rich.table import Table

    table = Table(title="finetune")
    for column in ("class", "run", "status", "steps", "kappa", "loss", "inst", "prior", "sfsl", "time"):
        table.add_column(column, justify="left" if column in ("class", "run", "status") else "right")
    for r in results:
        def value(term: str) -> str:
            v = r.last.get(term)
            return "" if v is None else f"{v:.4f}"

        table.add_row(str(r.cls), r.run, r.status, str(r.steps), f"{r.sfsl_weight:g}", value("loss"), value("inst"),
                      value("prior"), value("sfsl"), f"{r.seconds:.0f} s" if r.status != "skipped" else "")
    console.print(table)
