"""The training of one class: models, adapters, data, optimizer, the step, checkpoints and the trained weights.

A :class:`Trainer` is built in named steps (load the models, cache the latents, add the adapters, encode the
prompts, build SFSL, the optimizer and its schedule, hand them to accelerate) and then only steps, saves and
restores. The loop over steps and the run's folder are in ``spurgen.finetune``; the arithmetic of a step's
targets and estimates in :mod:`.diffusion`.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from .._base_model import BaseModel, Components, image_generator, load_components, sampling_pipeline
from .._lora import TEXT_ENCODER_TARGETS, UNET_TARGETS, add_lora, save_lora
from ..config import FinetuneConfig
from ..errors import SpurgenError, out_of_memory_message
from ..images import UnreadableImage, load_rgb
from ..workspace import CHECKPOINT_STATE, CHECKPOINTS, Workspace, atomic_write_json, read_json, remove_tree
from .class_images import ensure_class_images
from .diffusion import micro_step_seed, predicted_original, training_target
from .plan import ClassPlan, list_checkpoints
from .sfsl import SpuriousFeature, SpuriousFeatureLoss, decode_latents

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, AutoencoderTiny
    from PIL import Image

__all__ = ["Trainer", "Losses", "LatentCache", "NonFiniteLoss", "frozen_dtype", "load_pixels", "encode_latents",
           "DEFAULT_LR"]

DEFAULT_LR = {"lora": 1e-4, "full": 5e-6}


def frozen_dtype(accelerator: "Accelerator") -> torch.dtype:
    """The dtype of frozen weights: the mixed precision's half type, float32 without one."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


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
        """Draws z ~ N(mean, std^2) of the images at ``index``, times the VAE's scaling factor ``scale``."""
        mean, std = self.mean[index], self.std[index]
        return (mean + std * torch.randn(mean.shape, generator=generator, device=mean.device)) * scale


def load_pixels(files: Sequence[Path], resolution: int) -> torch.Tensor:
    """Images as [-1, 1] tensors: shorter side resized to the resolution, then center-cropped (as DreamBooth).

    Raises:
        SpurgenError: a file cannot be read as an image.
    """
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
def encode_latents(vae: Any, pixels: torch.Tensor, batch_size: int = 8) -> LatentCache:
    """The latent distributions of [-1, 1] images, encoded ``batch_size`` at a time."""
    means, stds = [], []
    for start in range(0, len(pixels), batch_size):
        dist = vae.encode(pixels[start:start + batch_size].to(vae.device, vae.dtype)).latent_dist
        means.append(dist.mean.float())
        stds.append(dist.std.float())
    return LatentCache(torch.cat(means), torch.cat(stds))


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that are trained, by name: what a checkpoint holds of a model."""
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

        self.plan, self.config, self.base, self.resolution = plan, config, base, resolution
        self.accelerator, self.device = accelerator, accelerator.device
        self.prior = config.prior_preservation
        self.train_text_encoder = config.trains_text_encoder
        # Seeded before anything draws from the global generators: the LoRA initialisation depends on it.
        set_seed(config.seed)
        self.parts = self._load_models()
        instance_pixels = self._cache_latents(workspace)
        trained = self._add_adapters()
        self._encode_prompts()
        if config.gradient_checkpointing:
            self._enable_gradient_checkpointing()
        self._build_sfsl(feature, sfsl_decoder, instance_pixels)
        self._build_optimizer(trained)
        self._build_lr_scheduler()
        self._prepare_accelerator(trained)

    def _load_models(self) -> Components:
        """The base model's parts on the device, all frozen; :meth:`_add_adapters` makes the trained ones trainable.

        Frozen weights (VAE, the base of LoRA layers, an untrained text encoder) are in the mixed precision's
        dtype; weights that are trained stay float32 (autocast runs the forward pass in half precision).
        """
        config, half = self.config, frozen_dtype(self.accelerator)
        text_encoder_dtype = half if config.lora or not self.train_text_encoder else torch.float32
        parts = load_components(self.base, config.attention, unet_dtype=half if config.lora else torch.float32,
                                text_encoder_dtype=text_encoder_dtype, vae_dtype=half)
        for model in (parts.unet, parts.text_encoder, parts.vae):
            model.requires_grad_(False).to(self.device)
        return parts

    def _cache_latents(self, workspace: Workspace) -> torch.Tensor:
        """Encodes the references and, with prior preservation, the class images (generated first where missing).

        The VAE is frozen, so each image's latent distribution is computed once; a step samples it.

        Args:
            workspace: Where the class images are cached.

        Returns:
            The references' pixels, for SFSL's reference features.
        """
        plan, config = self.plan, self.config
        self.scaling_factor = self.parts.vae.config.scaling_factor
        self.class_images_generated = 0
        instance_pixels = load_pixels(plan.references, self.resolution)
        self.instance_latents = encode_latents(self.parts.vae, instance_pixels)
        self.class_latents: LatentCache | None = None
        if self.prior:
            class_files, self.class_images_generated = ensure_class_images(
                workspace, self.base, self.parts, self.accelerator, prompt=plan.class_prompt,
                count=config.num_class_images, resolution=self.resolution, seed=config.seed,
                steps=config.sample_steps, guidance_scale=config.guidance_scale, batch_size=config.sample_batch_size)
            self.class_latents = encode_latents(self.parts.vae, load_pixels(class_files, self.resolution))
        return instance_pixels

    def _add_adapters(self) -> list[tuple[str, torch.nn.Module]]:
        """Makes the trained parts trainable: LoRA adapters (float32) on their frozen weights, or all their weights.

        Returns:
            The trained parts by name: the UNet, then the text encoder when it is trained.
        """
        config = self.config
        self.unet, self.text_encoder = self.parts.unet, self.parts.text_encoder
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
        self.trained_names = [name for name, _ in trained]
        return trained

    def _encode_prompts(self) -> None:
        """Tokenizes the instance prompt (and the class prompt with prior preservation); a text encoder that is
        not trained encodes them here, once, instead of on every step."""
        prompts = [self.plan.instance_prompt] + ([self.plan.class_prompt] if self.prior else [])
        tokenizer = self.parts.tokenizer
        self.prompt_ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                                    truncation=True, return_tensors="pt").input_ids.to(self.device)
        self.frozen_embeddings: torch.Tensor | None = None
        if not self.train_text_encoder:
            with torch.no_grad(), self.accelerator.autocast():
                self.frozen_embeddings = self.text_encoder(self.prompt_ids)[0]

    def _enable_gradient_checkpointing(self) -> None:
        """``--gradient-checkpointing``: the trained parts recompute their activations in the backward pass."""
        self.unet.enable_gradient_checkpointing()
        if self.train_text_encoder:
            # Non-reentrant checkpointing passes gradients to LoRA layers whose inputs need none. transformers
            # 5.23 renamed the method; older releases only have the old name.
            enable = getattr(self.text_encoder, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def _build_sfsl(self, feature: SpuriousFeature | None, decoder: "AutoencoderTiny | None",
                    instance_pixels: torch.Tensor) -> None:
        """SFSL's decoder and loss, with the references' features computed once; nothing at all when kappa is 0.

        Args:
            feature: s_k, or ``None`` when the class's kappa is 0.
            decoder: ``--sfsl-decoder``, or ``None`` for the base model's VAE.
            instance_pixels: The references as training sees them.
        """
        self.sfsl_decoder: "AutoencoderKL | AutoencoderTiny" = decoder if decoder is not None else self.parts.vae
        self.sfsl: SpuriousFeatureLoss | None = None
        self._sfsl_loss: SpuriousFeatureLoss | None = None
        if feature is None:
            return
        # Channels-last convolutions: tensor-core kernels on GPUs, and oneDNN's are no slower on CPUs (bench:
        # ResNet-50 forward + backward at 224 px). The VAE is left alone on CPUs, where its GroupNorms prefer the
        # contiguous layout. The layout is set before the references' features are computed with it.
        if self.config.gradient_checkpointing:
            self.sfsl_decoder.enable_gradient_checkpointing()
        feature.classifier.model.to(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            self.sfsl_decoder.to(memory_format=torch.channels_last)
        self.sfsl = self._sfsl_loss = SpuriousFeatureLoss(feature, instance_pixels, self.config.sfsl_max_timestep,
                                                          self.config.sfsl_every)

    def set_sfsl(self, enabled: bool, decoder: "AutoencoderTiny | None" = None, *, decoder_checkpointing: bool,
                 channels_last: bool) -> None:
        """Switches how the next steps compute SFSL, on the models already loaded; training never calls it.

        ``bench.sfsl`` measures SFSL's cost-cutting measures with it: one trainer, switched between steps.

        Args:
            enabled: Whether SFSL is computed; ``False`` takes the steps without it.
            decoder: The decoder of SFSL's images; ``None``: the base model's VAE.
            decoder_checkpointing: Gradient checkpointing in that decoder.
            channels_last: The classifier in the channels-last memory format, else in the contiguous one.

        Raises:
            SpurgenError: the trainer has no SFSL to switch (its class's kappa is 0).
        """
        if self._sfsl_loss is None:
            raise SpurgenError(f"{self.plan.cls} trains without SFSL (kappa 0); there is no SFSL to switch")
        self.sfsl = self._sfsl_loss if enabled else None
        self.sfsl_decoder = decoder if decoder is not None else self.parts.vae
        decoder = self.sfsl_decoder
        (decoder.enable_gradient_checkpointing if decoder_checkpointing else decoder.disable_gradient_checkpointing)()
        self._sfsl_loss.feature.classifier.model.to(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def _build_optimizer(self, trained: list[tuple[str, torch.nn.Module]]) -> None:
        """AdamW (bitsandbytes' 8-bit one with ``--use-8bit-adam``) over the trained parameters; the text
        encoder's group has its own learning rate when ``--text-encoder-lr`` is set."""
        config = self.config
        lr = config.learning_rate or DEFAULT_LR["lora" if config.lora else "full"]
        groups = [{"params": [p for p in model.parameters() if p.requires_grad],
                   "lr": lr if name == "unet" else (config.text_encoder_lr or lr)} for name, model in trained]
        self.trained_parameters = [p for group in groups for p in group["params"]]
        if config.use_8bit_adam:
            import bitsandbytes

            self.optimizer = bitsandbytes.optim.AdamW8bit(groups, weight_decay=config.adam_weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(groups, weight_decay=config.adam_weight_decay)

    def _build_lr_scheduler(self) -> None:
        """``--lr-scheduler`` with its warm-up, over ``--steps``."""
        from diffusers.optimization import get_scheduler

        # accelerate steps a prepared schedule once per process per optimizer step.
        processes = self.accelerator.num_processes
        self.lr_scheduler = get_scheduler(self.config.lr_scheduler, self.optimizer,
                                          num_warmup_steps=self.config.lr_warmup_steps * processes,
                                          num_training_steps=self.config.steps * processes)

    def _prepare_accelerator(self, trained: list[tuple[str, torch.nn.Module]]) -> None:
        """accelerate wraps the trained parts (DDP, autocast), the optimizer and the schedule; its checkpoint hooks
        save and load only the trained parameters."""
        prepared = self.accelerator.prepare(*[model for _, model in trained], self.optimizer, self.lr_scheduler)
        self.models = list(prepared[:len(trained)])
        self.optimizer, self.lr_scheduler = prepared[len(trained):]
        self._hooks = [self.accelerator.register_save_state_pre_hook(self._save_hook),
                       self.accelerator.register_load_state_pre_hook(self._load_hook)]

    # The step ------------------------------------------------------------------------------------------------

    def _text_embeddings(self) -> torch.Tensor:
        if self.frozen_embeddings is not None:
            return self.frozen_embeddings
        return self.models[self.trained_names.index("text_encoder")](self.prompt_ids)[0]

    def losses(self, step: int, micro: int) -> Losses:
        """Forward pass of one micro-batch: b instance rows, then b class rows with prior preservation."""
        config, scheduler = self.config, self.parts.noise_scheduler
        generator = torch.Generator(self.device).manual_seed(
            micro_step_seed(config.seed, self.accelerator.process_index, step, micro))
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
                    raise NonFiniteLoss(step, terms, accelerator.num_processes)
                sums += terms
                accelerator.backward(losses.total)
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(self.trained_parameters, self.config.max_grad_norm)
                    # fp16's GradScaler skips a step that overflows; without one, the step would poison the weights.
                    if accelerator.scaler is None and norm is not None and not torch.isfinite(norm):
                        raise NonFiniteLoss(step, terms, accelerator.num_processes, "gradient norm")
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
                save_file(trainable_state(self.accelerator.unwrap_model(model)),
                          os.path.join(output_dir, f"{name}.safetensors"))
        weights.clear()

    def _load_hook(self, models: list[torch.nn.Module], input_dir: str) -> None:
        from safetensors.torch import load_file

        for name, model in zip(self.trained_names, models):
            model = self.accelerator.unwrap_model(model)
            state = load_file(os.path.join(input_dir, f"{name}.safetensors"), device=str(self.device))
            if set(state) != set(trainable_state(model)):
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
        try:
            self.accelerator.save_state(str(staging))
        except (OSError, RuntimeError, SafetensorError) as exc:
            self._checkpoint_write_failed(staging, exc)
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            atomic_write_json(staging / CHECKPOINT_STATE, {"step": step, "key": key, "log": log})
            remove_tree(final)
            os.replace(staging, final)
            for old in list_checkpoints(self.plan.folder)[:-self.config.checkpoints_total_limit]:
                remove_tree(old)  # a crash must not leave a half-deleted checkpoint under its name
        self.accelerator.wait_for_everyone()
        return final

    def _checkpoint_write_failed(self, staging: Path, exc: BaseException) -> None:
        """Removes a checkpoint's staging folder after a failed write and raises the error for the user.

        torch.save reports a failed write as a RuntimeError ("PytorchStreamWriter failed writing file", "file write
        failed") and safetensors as a SafetensorError, not as an OSError: both become one line here. An OSError and
        running out of GPU memory go on as they are (the command line reports them).

        Raises:
            SpurgenError: always, but for those two.
        """
        if self.accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)  # the last good checkpoint stays the latest
        if isinstance(exc, OSError) or out_of_memory_message(exc):
            raise exc
        last = (list_checkpoints(self.plan.folder) or [None])[-1]
        kept = f"the last good checkpoint, {last}, is kept" if last else "no checkpoint was saved yet"
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise SpurgenError(f"cannot write a checkpoint in {staging.parent}: {detail}; free disk space or choose a "
                           f"writable --workspace, then continue with --resume ({kept})") from None

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


class NonFiniteLoss(SpurgenError):
    """A loss term or the gradient norm is not finite; the message lists the step's terms, averaged over processes.

    Args:
        step: The 0-based optimizer step.
        terms: The step's summed terms: total, inst, prior, sfsl x rows (and rows).
        processes: How many processes the terms are summed over.
        what: What is not finite: ``loss`` or ``gradient norm``.
    """

    def __init__(self, step: int, terms: torch.Tensor, processes: int, what: str = "loss") -> None:
        names = ("loss", "inst", "prior", "sfsl x rows")
        values = ", ".join(f"{n} {float(v):.4g}" for n, v in zip(names, terms[:4] / processes))
        super().__init__(f"the {what} is not finite at step {step + 1} ({values})")
