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
from safetensors import SafetensorError

from .._base_model import BaseModel, Components, image_generator, load_components, shared_name, vae_config
from .._lora import add_lora
from .._runtime import dtype_argument
from ..config import FinetuneConfig
from ..errors import SpurgenError, out_of_memory_message
from ..images import UnreadableImage, load_rgb
from ..workspace import CHECKPOINT_STATE, CHECKPOINTS, Workspace, atomic_write_json, read_json, remove_tree
from .class_images import ensure_class_images
from .compile import compile_blocks, compiles, eager, mark_step, uses_channels_last
from .diffusion import micro_step_seed
from .noise import diffusion_loss, min_snr_weights, training_noise, zero_terminal_snr
from .plan import ClassPlan, list_checkpoints
from .sfsl import SpuriousFeature, SpuriousFeatureLoss

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import AutoencoderKL, AutoencoderTiny
    from PIL import Image

__all__ = ["Trainer", "Losses", "LatentCache", "NonFiniteLoss", "frozen_dtype", "load_pixels", "encode_latents",
           "t_bucket_names", "DEFAULT_LR", "T_BUCKETS"]

DEFAULT_LR = {"lora": 1e-4, "full": 5e-6}
# SFSL's loss is logged per quarter of the timesteps (t in [0, T/4), ...): where along t it is learnt.
T_BUCKETS = 4
# A step's statistics, summed over its micro-steps on the device and read in batches (Trainer.read_rows): the loss
# terms (sfsl_sum: SFSL's distances summed over its rows), SFSL's rows and distances per t bucket, how many
# micro-steps had a non-finite loss, the gradient norm before clipping, whether it was not finite and whether it
# was clipped, and the squared norms of SFSL's and the whole loss's gradient at the UNet's output.
_STATS = ("loss", "inst", "prior", "sfsl_sum", "sfsl_rows", *(f"t_sum{i}" for i in range(T_BUCKETS)),
          *(f"t_rows{i}" for i in range(T_BUCKETS)), "bad_loss", "grad_norm", "bad_grad", "clipped", "output_sq_sfsl",
          "output_sq")
_AT = {name: i for i, name in enumerate(_STATS)}
_BUCKET_SUMS = slice(_AT["t_sum0"], _AT["t_sum0"] + T_BUCKETS)
_BUCKET_ROWS = slice(_AT["t_rows0"], _AT["t_rows0"] + T_BUCKETS)


def t_bucket_names(num_train_timesteps: int) -> list[str]:
    """The log's columns of SFSL by t: ``sfsl_t0-249``, ... for 1,000 timesteps (row t goes to t * 4 // T)."""
    starts = [-(-i * num_train_timesteps // T_BUCKETS) for i in range(T_BUCKETS + 1)]
    return [f"sfsl_t{lo}-{hi - 1}" for lo, hi in zip(starts, starts[1:])]


def _adds_square_norm(slot: torch.Tensor) -> Any:
    """A tensor hook that adds its gradient's squared norm to ``slot`` on the device and leaves the gradient as is."""
    def hook(grad: torch.Tensor) -> None:
        slot.add_(grad.float().square().sum())
    return hook


def frozen_dtype(accelerator: "Accelerator") -> torch.dtype:
    """The dtype of frozen weights: the mixed precision's half type, float32 without one."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


@dataclass
class Losses:
    """The loss terms of one micro-step (``None``: the term is off, or SFSL had no row with t <= bound).

    ``sfsl`` is the rows' mean distance 1 - cos, unweighted, as logged; ``total`` holds SFSL's weighted loss
    (:meth:`.sfsl.SpuriousFeatureLoss.loss`). ``sfsl_distances`` and ``sfsl_timesteps`` are its rows' distances
    (detached) and timesteps, for the log by t; ``prediction`` is the UNet's output and ``sfsl_output`` the rows
    of it that SFSL reads, whose gradients the step's diagnostics measure.
    """

    total: torch.Tensor
    inst: torch.Tensor
    prior: torch.Tensor | None
    sfsl: torch.Tensor | None
    sfsl_rows: int
    sfsl_distances: torch.Tensor | None = None
    sfsl_timesteps: torch.Tensor | None = None
    prediction: torch.Tensor | None = None
    sfsl_output: torch.Tensor | None = None


@dataclass
class LatentCache:
    """Each training image's VAE latent distribution (mean, std): sampling it is encoding it anew."""

    mean: torch.Tensor
    std: torch.Tensor

    def sample(self, index: torch.Tensor, generator: torch.Generator, scale: float, shift: float = 0.0) -> torch.Tensor:
        """Draws z ~ N(mean, std^2) of the images at ``index`` as the denoiser sees them: (z - ``shift``) times the
        VAE's scaling factor ``scale`` (:meth:`spurgen.families.ModelFamily.latent_shift`)."""
        mean, std = self.mean[index], self.std[index]
        return (mean + std * torch.randn(mean.shape, generator=generator, device=mean.device) - shift) * scale


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
        self.family = base.family
        self.accelerator, self.device = accelerator, accelerator.device
        self.prior = config.prior_preservation
        self.train_text_encoder = config.trains_text_encoder
        # Seeded before anything draws from the global generators: the LoRA initialisation depends on it.
        set_seed(config.seed)
        self.parts = self._load_models()
        instance_pixels = self._cache_latents(workspace)
        if config.zero_terminal_snr:  # after the class images, which are the base model's own samples
            self.parts = zero_terminal_snr(self.parts)
        trained = self._add_adapters()
        self._encode_prompts()
        if config.gradient_checkpointing:
            self._enable_gradient_checkpointing()
        self._build_sfsl(feature, sfsl_decoder, instance_pixels)
        self._build_optimizer(trained)
        self._build_lr_scheduler()
        self._prepare_accelerator(trained)
        # After the references' features and the prompts are computed eagerly: those are one-off calls.
        self.compiled = compiles(config.compile, self.device)
        if self.compiled:
            compile_blocks([model for _, model in trained], config.compile_mode)
        self.t_buckets = t_bucket_names(self.parts.noise_scheduler.config.num_train_timesteps)
        # Steps queued since the last read_rows: (0-based step, learning rate, statistics on the device).
        self._pending: list[tuple[int, float, torch.Tensor]] = []
        # How many steps the loop queues between reads. An accelerator runs behind the host, and a read waits for
        # it to catch up; on a CPU every call has finished when it returns, so reading every step costs nothing.
        self.read_every = 1 if self.device.type == "cpu" else 10

    def _load_models(self) -> Components:
        """The base model's parts on the device, all frozen; :meth:`_add_adapters` makes the trained ones trainable.

        Frozen weights (VAE, the base of LoRA layers, an untrained text encoder) are in the mixed precision's
        dtype; weights that are trained stay float32 (autocast runs the forward pass in half precision).
        """
        config, half = self.config, frozen_dtype(self.accelerator)
        text_encoder_dtype = half if config.lora or not self.train_text_encoder else torch.float32
        parts = load_components(self.base, config.attention, unet_dtype=half if config.lora else torch.float32,
                                text_encoder_dtype=text_encoder_dtype,
                                vae_dtype=self.family.vae_dtype(vae_config(self.base, config.vae), half),
                                vae=config.vae)
        for model in (parts.unet, *parts.text_encoders, parts.vae):
            model.requires_grad_(False).to(self.device)
        self.channels_last = uses_channels_last(config.channels_last, self.device)
        if self.channels_last:
            for model in (parts.unet, parts.vae):
                model.to(memory_format=torch.channels_last)
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
        self.latent_shift = self.family.latent_shift(dict(self.parts.vae.config))
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
            The trained parts by name: the UNet, then the text encoders when they are trained (the family's
            :attr:`~spurgen.families.ModelFamily.trained_text_encoders`).
        """
        config, family = self.config, self.family
        self.unet, self.text_encoders = self.parts.unet, self.parts.text_encoders
        self.text_encoder = self.text_encoders[0]
        encoders = dict(zip(family.text_encoders, self.text_encoders))
        self.trained_text_encoders = [encoders[name] for name in family.trained_text_encoders
                                      if self.train_text_encoder]
        trained = [(family.denoiser, self.unet)]
        if self.train_text_encoder:
            trained += [(name, encoders[name]) for name in family.trained_text_encoders]
        for name, model in trained:
            if config.lora:
                alpha = config.alpha if config.alpha is not None else config.rank
                add_lora(model, family.lora_target_modules(name, model), config.rank, alpha)
                for param in model.parameters():
                    if param.requires_grad:
                        param.data = param.data.float()
            else:
                model.requires_grad_(True)
                for unused in family.unused_modules(name, model):
                    model.get_submodule(unused).requires_grad_(False)
            model.train()
        self.trained_names = [name for name, _ in trained]
        return trained

    def _encode_prompts(self) -> None:
        """Tokenizes the instance prompt (and the class prompt with prior preservation); text encoders that are
        not trained encode them here, once, instead of on every step.

        The family's :attr:`~spurgen.families.ModelFamily.frozen_text_encoders` (FLUX.1's T5) are never trained:
        once their embeddings are computed they move to the CPU, and come back only for validation images.
        """
        family = self.family
        prompts = [self.plan.instance_prompt] + ([self.plan.class_prompt] if self.prior else [])
        self.prompt_ids = [ids.to(self.device) for ids in family.tokenize(self.parts.tokenizers, prompts)]
        # The encoders whose output is computed now: all when none trains, else the never-trained ones (None marks
        # the trained ones, which encode on every step).
        frozen = [None if self.train_text_encoder and name not in family.frozen_text_encoders else encoder
                  for name, encoder in zip(family.text_encoders, self.text_encoders)]
        self.frozen_conditioning: dict[str, torch.Tensor] = {}
        if any(encoder is not None for encoder in frozen):
            with torch.no_grad(), self.accelerator.autocast():
                self.frozen_conditioning = family.encode_prompts(frozen, self.prompt_ids, self.resolution)
        self.offloaded = [encoder for name, encoder in zip(family.text_encoders, self.text_encoders)
                          if name in family.frozen_text_encoders]
        for encoder in self.offloaded:
            encoder.to("cpu")

    def _enable_gradient_checkpointing(self) -> None:
        """``--gradient-checkpointing``: the trained parts recompute their activations in the backward pass."""
        self.unet.enable_gradient_checkpointing()
        for text_encoder in self.trained_text_encoders:
            # Non-reentrant checkpointing passes gradients to LoRA layers whose inputs need none. transformers
            # 5.23 renamed the method; older releases only have the old name.
            enable = getattr(text_encoder, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

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
        # The classifier's convolutions in channels-last whatever --channels-last says: tensor-core kernels on GPUs,
        # and oneDNN's are no slower on CPUs (bench: ResNet-50 forward + backward at 224 px). The decoder follows
        # --channels-last, as the VAE does. The layout is set before the references' features are computed with it.
        if self.config.gradient_checkpointing:
            self.sfsl_decoder.enable_gradient_checkpointing()
        feature.classifier.model.to(memory_format=torch.channels_last)
        if self.channels_last:
            self.sfsl_decoder.to(memory_format=torch.channels_last)
        self.sfsl = self._sfsl_loss = SpuriousFeatureLoss(feature, instance_pixels, self.config.sfsl_max_timestep,
                                                          self.config.sfsl_every, self.config.sfsl_row_weighting)

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
                   "lr": lr if name == self.family.denoiser else (config.text_encoder_lr or lr)}
                  for name, model in trained]
        self.trained_parameters = [p for group in groups for p in group["params"]]
        if config.use_8bit_adam:
            import bitsandbytes

            self.optimizer = bitsandbytes.optim.AdamW8bit(groups, weight_decay=config.adam_weight_decay)
        else:
            # Fused: one kernel, and it can skip a non-finite step on the device (found_inf). torch < 2.4 has no CPU
            # kernel, yet its constructor accepts CPU parameters and the first step fails.
            fused = self.device.type != "cpu" or tuple(int(n) for n in torch.__version__.split(".")[:2]) >= (2, 4)
            try:
                self.optimizer = torch.optim.AdamW(groups, weight_decay=config.adam_weight_decay, fused=fused)
            except RuntimeError:  # a device without the fused kernel
                self.optimizer = torch.optim.AdamW(groups, weight_decay=config.adam_weight_decay)
        # Whether a non-finite step can be skipped without the host reading a flag (see _skip_if_not_finite).
        self.skips_on_device = bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))

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

    def _conditioning(self) -> dict[str, torch.Tensor]:
        """The denoiser's conditioning of the prompts: encoded once when the text encoders are frozen, else by the
        trained encoders as accelerate wrapped them (with the cached output of any encoder that is never trained)."""
        if not self.train_text_encoder:
            return self.frozen_conditioning
        encoders = [self.models[self.trained_names.index(name)] if name in self.trained_names else None
                    for name in self.family.text_encoders]
        return {**self.frozen_conditioning, **self.family.encode_prompts(encoders, self.prompt_ids, self.resolution)}

    def losses(self, step: int, micro: int) -> Losses:
        """Forward pass of one micro-batch: b instance rows, then b class rows with prior preservation.

        The small draws (which images, which timesteps) come from a host generator, so that which rows SFSL
        decodes is known without waiting for the device; the noise comes from a generator on the device.
        """
        config, scheduler, device, family = self.config, self.parts.noise_scheduler, self.device, self.family
        seed = (config.seed, self.accelerator.process_index, step, micro)
        host = torch.Generator().manual_seed(micro_step_seed(*seed, 0))
        generator = torch.Generator(device).manual_seed(micro_step_seed(*seed, 1))
        b = config.batch_size
        picks = [torch.randint(len(self.instance_latents.mean), (b,), generator=host)]
        if self.prior:
            picks.append(torch.randint(len(self.class_latents.mean), (b,), generator=host))
        timesteps_host = torch.randint(0, scheduler.config.num_train_timesteps, (b * len(picks),), generator=host)
        applies = self.sfsl is not None and self.sfsl.applies(step)
        rows = self.sfsl.rows(timesteps_host[:b]) if applies else torch.empty(0, dtype=torch.long)
        # One copy of all the draws; from pinned memory it is asynchronous (from pageable memory it may wait).
        draws = torch.cat([*picks, timesteps_host, rows])
        draws = (draws.pin_memory() if device.type == "cuda" else draws).to(device, non_blocking=True)
        *picked, timesteps, rows = draws.split([b] * len(picks) + [len(timesteps_host), len(rows)])
        instance = picked[0]
        latents = [cache.sample(index, generator, self.scaling_factor, self.latent_shift)
                   for cache, index in zip((self.instance_latents, self.class_latents), picked)]
        latents = torch.cat(latents)
        noise = training_noise(latents.shape, generator, device, config.noise_offset)
        noisy = family.add_noise(scheduler, latents, noise, timesteps)
        # Two prompts are encoded, not 2b rows: the same gradient, a fraction of the text encoder's work.
        conditioning = {name: value.repeat_interleave(b, dim=0) for name, value in self._conditioning().items()}
        prediction = family.predict(self.models[0], noisy, family.denoiser_timesteps(scheduler, timesteps),
                                    conditioning)
        target = family.training_target(scheduler, latents, noise, timesteps)

        weights = min_snr_weights(scheduler, timesteps, config.snr_gamma) if config.snr_gamma else None
        inst = diffusion_loss(prediction, target, weights, slice(None, b))
        prior = diffusion_loss(prediction, target, weights, slice(b, None)) if self.prior else None
        total = inst if prior is None else inst + config.prior_weight * prior
        losses = Losses(total, inst, prior, None, 0, prediction=prediction)
        if len(rows):  # only these rows are decoded and classified
            output, t = prediction[rows], timesteps[rows]
            z0 = family.predicted_original(scheduler, noisy[rows], output, t)
            distances = self.sfsl.distances(family.decode(self.sfsl_decoder, z0), instance[rows])
            sfsl = self.sfsl.loss(distances, scheduler, t, family)
            losses.total = total + self.plan.sfsl_weight * self.sfsl.scale * sfsl
            losses.sfsl, losses.sfsl_rows, losses.sfsl_output = distances.mean(), len(rows), output
            losses.sfsl_distances, losses.sfsl_timesteps = distances.detach(), t
        return losses

    def train_step(self, step: int) -> None:
        """Queues one optimizer step (``gradient_accumulation_steps`` micro-steps) without waiting for the device.

        Its statistics stay on the device until :meth:`read_rows`. A step whose loss or gradient norm is not
        finite is skipped on the device: neither the weights nor AdamW's moments and step count change.
        Optimizers that cannot skip on the device (bitsandbytes') read the flag on the host instead, once per step.
        """
        accelerator, update = self.accelerator, True
        if self.compiled:
            mark_step(self.config.compile_mode)
        stats = torch.zeros(len(_STATS), device=self.device)
        for micro in range(self.config.gradient_accumulation_steps):
            with accelerator.accumulate(*self.models):
                with accelerator.autocast():
                    losses = self.losses(step, micro)
                self._add_losses(stats, losses)
                accelerator.backward(losses.total)
                if accelerator.sync_gradients:
                    norm = accelerator.clip_grad_norm_(self.trained_parameters, self.config.max_grad_norm)
                    if norm is not None:
                        norm = norm.float()
                        stats[_AT["grad_norm"]] += norm
                        stats[_AT["clipped"]] += (norm > self.config.max_grad_norm).float()
                        # fp16's GradScaler skips a step that overflows by itself: for it that is no failure.
                        if accelerator.scaler is None:
                            stats[_AT["bad_grad"]] += (~torch.isfinite(norm)).float()
                    update = self._skip_if_not_finite(stats)
                if update:  # (outside the last micro-step, accelerate makes both calls no-ops)
                    self.optimizer.step()
                    self.lr_scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        self._pending.append((step, self.lr_scheduler.get_last_lr()[0], stats))

    def _add_losses(self, stats: torch.Tensor, losses: Losses) -> None:
        """Adds a micro-step's loss terms to the step's device statistics, and hooks that add SFSL's and the whole
        loss's squared gradient norms at the UNet's output during the backward pass."""
        terms = torch.stack([losses.total.detach(), losses.inst.detach(),
                             losses.prior.detach() if losses.prior is not None else torch.zeros_like(losses.inst),
                             losses.sfsl_distances.sum() if losses.sfsl_distances is not None
                             else torch.zeros_like(losses.inst)]).float()
        stats[:4] += terms
        stats[_AT["bad_loss"]] += (~torch.isfinite(terms).all()).float()
        if losses.sfsl_distances is None:
            return
        stats[_AT["sfsl_rows"]] += losses.sfsl_rows
        bucket = losses.sfsl_timesteps * T_BUCKETS // self.parts.noise_scheduler.config.num_train_timesteps
        stats[_BUCKET_SUMS].index_add_(0, bucket, losses.sfsl_distances.float())
        stats[_BUCKET_ROWS].index_add_(0, bucket, torch.ones_like(losses.sfsl_distances, dtype=torch.float32))
        losses.sfsl_output.register_hook(_adds_square_norm(stats[_AT["output_sq_sfsl"]]))
        losses.prediction.register_hook(_adds_square_norm(stats[_AT["output_sq"]]))

    def _skip_if_not_finite(self, stats: torch.Tensor) -> bool:
        """Makes the next optimizer step a no-op when the step's loss or gradient norm is not finite.

        Fused AdamW reads ``found_inf`` on the device (as GradScaler uses it): when it is 1 the kernel leaves
        weights and moments alone and takes its step count back. With fp16, GradScaler sets ``found_inf`` itself
        from the gradients, which a non-finite loss makes non-finite too (accelerate then cannot tell its overflow
        skips from steps taken, so the learning-rate schedule advances on them). The schedule is host state and
        also advances on a step skipped here; the run stops at the next read, before it is saved.

        Returns:
            Whether to call the optimizer: ``False`` only when the flag had to be read on the host and is set.
        """
        bad = stats[_AT["bad_loss"]] + stats[_AT["bad_grad"]] > 0
        if not self.skips_on_device:
            return not bool(bad)
        if self.accelerator.scaler is None:
            self.optimizer.optimizer.found_inf = bad.float()
        return True

    def read_rows(self) -> list[dict[str, float | int | None]]:
        """The log rows of the steps queued since the last read, in one read from the device (after summing the
        processes' statistics); every process must call it at the same steps.

        Raises:
            NonFiniteLoss: a step's loss or gradient norm was not finite; it carries the good rows before it.
        """
        if not self._pending:
            return []
        pending, self._pending = self._pending, []
        values = self.accelerator.reduce(torch.stack([stats for _, _, stats in pending]), "sum").double().cpu()
        processes = self.accelerator.num_processes
        rows = []
        for (step, lr, _), v in zip(pending, values):
            if v[_AT["bad_loss"]] > 0 or v[_AT["bad_grad"]] > 0:
                raise NonFiniteLoss(step, v[:4], processes, "loss" if v[_AT["bad_loss"]] > 0 else "gradient norm",
                                    rows)
            rows.append(self._row(step, lr, v))
        return rows

    def _row(self, step: int, lr: float, v: torch.Tensor) -> dict[str, float | int | None]:
        """The log row of a step from its statistics summed over micro-steps and processes."""
        processes = self.accelerator.num_processes
        count = self.config.gradient_accumulation_steps * processes
        rows = int(v[_AT["sfsl_rows"]])
        by_t = {name: float(total / n) if n else None
                for name, total, n in zip(self.t_buckets, v[_BUCKET_SUMS], v[_BUCKET_ROWS])}
        share = float((v[_AT["output_sq_sfsl"]] / v[_AT["output_sq"]]).sqrt()) if v[_AT["output_sq"]] > 0 else None
        return {"step": step + 1, "loss": float(v[0]) / count, "inst": float(v[1]) / count,
                "prior": float(v[2]) / count if self.prior else None,
                "sfsl": float(v[3]) / rows if rows else None, "sfsl_rows": rows, **by_t,
                "grad_norm": float(v[_AT["grad_norm"]]) / processes, "sfsl_grad_share": share,
                "clipped": int(v[_AT["clipped"]] > 0), "lr": lr}

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
            if self.config.lora:  # the checkpoint as a model too (generate --checkpoint, export-lora --checkpoint)
                self._save_lora(staging)
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
        """Images of the validation prompt with seeds seed, seed + 1, ... from the model as it is now."""
        pipeline = self.family.sampling_pipeline(self.parts)
        for model in (self.unet, *self.text_encoders):
            model.eval()
        for encoder in self.offloaded:
            encoder.to(self.device)
        images = []
        with self.accelerator.autocast(), eager():
            for i in range(count):
                images.append(pipeline(self.plan.validation_prompt, height=self.resolution, width=self.resolution,
                                       num_inference_steps=self.config.sample_steps,
                                       guidance_scale=self.config.guidance_scale,
                                       generator=image_generator(self.config.seed + i)).images[0])
        for encoder in self.offloaded:
            encoder.to("cpu")
        for model in (self.unet, *self.trained_text_encoders):
            model.train()
        return images

    def save_model(self, folder: Path) -> None:
        """Writes the trained weights into ``folder``: the LoRA file, or a complete diffusers pipeline.

        A full pipeline takes its frozen parts from the base model's files, not from memory, where they may
        have been cast to half precision.
        """
        if self.config.lora:
            self._save_lora(folder)
            return
        from diffusers import AutoencoderKL

        # Frozen parts come from the files: in memory they may have been cast to half precision.
        float32 = dtype_argument(torch.float32)
        trained: dict[str, Any] = dict(zip(self.trained_names, self._trained_models()))
        if self.config.vae:  # the VAE it was trained and sampled with
            trained["vae"] = AutoencoderKL.from_pretrained(self.config.vae, **float32)
        pipeline = self.family.pipeline_class().from_pretrained(self.base.path, **trained,
                                                                **self.family.pipeline_arguments, **float32)
        pipeline.save_pretrained(folder, safe_serialization=True)

    def _trained_models(self) -> list[torch.nn.Module]:
        """The trained parts as the pipeline holds them (not accelerate's wrappers), in ``trained_names`` order."""
        return [self.unet, *self.trained_text_encoders]

    def _save_lora(self, folder: Path) -> None:
        """Writes the adapters as ``pytorch_lora_weights.safetensors`` (the text encoders' only when trained)."""
        self.family.save_lora(folder, dict(zip(self.trained_names, self._trained_models())),
                              shared_name(self.base.name))

    def close(self) -> None:
        """Lets go of the accelerator's references, so the next class starts from a clean accelerator."""
        for hook in self._hooks:
            hook.remove()
        self.accelerator.free_memory()


class NonFiniteLoss(SpurgenError):
    """A loss term or the gradient norm is not finite; the message lists the step's terms, averaged over processes.

    Args:
        step: The 0-based optimizer step.
        terms: The step's summed terms: total, inst, prior, sfsl x rows.
        processes: How many processes the terms are summed over.
        what: What is not finite: ``loss`` or ``gradient norm``.
        rows: The log rows of the good steps read with it, before ``step``.
    """

    def __init__(self, step: int, terms: torch.Tensor, processes: int, what: str = "loss",
                 rows: list[dict[str, Any]] | None = None) -> None:
        self.step, self.rows = step, rows or []
        names = ("loss", "inst", "prior", "sfsl x rows")
        values = ", ".join(f"{n} {float(v):.4g}" for n, v in zip(names, terms[:4] / processes))
        super().__init__(f"the {what} is not finite at step {step + 1} ({values})")
