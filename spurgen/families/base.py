"""The family interface: what spurgen must know about a family of text-to-image models (see :mod:`spurgen.families`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from ..config import ZERO_SNR_SCHEDULER, find_scheduler

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from .._base_model import Components
    from ..config import FinetuneConfig

__all__ = ["ModelFamily"]


class ModelFamily(ABC):
    """What spurgen must know about one family of text-to-image models to fine-tune and sample it.

    The class attributes describe the family's folder and adapters; the methods are the family's arithmetic.
    Every method takes what it works on as arguments: a family holds no state and one instance serves all runs.
    """

    name: ClassVar[str]
    """The ``--family`` value: ``sd``, ``sdxl``."""
    title: ClassVar[str]
    """How users call it: ``Stable Diffusion 1.x/2.x``."""
    pipeline_class_name: ClassVar[str]
    """The diffusers pipeline class, as ``model_index.json``'s ``_class_name`` writes it."""
    tokenizers: ClassVar[tuple[str, ...]]
    """The folder's tokenizer parts, in the order of :attr:`text_encoders`."""
    text_encoders: ClassVar[tuple[str, ...]]
    """The folder's text encoder parts; their names are also the trained parts' names (checkpoints, LoRA keys)."""
    denoiser: ClassVar[str] = "unet"
    """The folder's denoiser part."""
    noise_scheduler_class: ClassVar[str]
    """The diffusers scheduler class that adds training noise, built from the folder's scheduler config."""
    lora_targets: ClassVar[dict[str, tuple[str, ...]]]
    """LoRA's target modules per trained part, those of the family's diffusers DreamBooth-LoRA script."""
    pipeline_arguments: ClassVar[dict[str, Any]] = {}
    """Keyword arguments the family's pipeline needs beyond its parts (no safety checker, ...)."""
    frozen_text_encoders: ClassVar[tuple[str, ...]] = ()
    """Text encoders that text-encoder training leaves frozen (FLUX.1's T5): their prompt embeddings are computed
    once, and they wait on the CPU while the others train."""
    swaps_samplers: ClassVar[bool] = True
    """Whether ``generate --scheduler`` may swap in another sampler (the DDPM-family ones of
    :data:`spurgen.config.SCHEDULERS`); ``False``: the model samples with its own scheduler only."""
    default_scheduler: ClassVar[str] = "DPM-Solver++"
    """The sampler of ``generate --scheduler`` when not given, by its canonical name (a key of
    :data:`spurgen.config.SCHEDULERS`, or ``"model"``)."""
    negative_prompts: ClassVar[bool] = True
    """Whether the family's pipeline samples with ``generate --negative-prompt``; ``False``: it would ignore it."""
    default_guidance: ClassVar[float]
    """The guidance scale of ``generate --guidance`` and ``finetune --guidance-scale`` when not given: the family's
    pipeline default (``guidance_scale`` of its ``__call__``)."""

    @property
    def trained_text_encoders(self) -> tuple[str, ...]:
        """The text encoders that text-encoder training adapts, in :attr:`text_encoders` order."""
        return tuple(name for name in self.text_encoders if name not in self.frozen_text_encoders)

    def guidance(self, requested: float | None) -> float:
        """The guidance scale to sample with: ``requested`` when given, else :attr:`default_guidance`.

        Args:
            requested: ``--guidance`` / ``--guidance-scale``; ``None`` when not given.
        """
        return self.default_guidance if requested is None else requested

    def scheduler(self, requested: str | None, schedule: dict[str, Any] | None = None) -> str | None:
        """The sampler to sample with, by its canonical name: ``requested``'s when given, else the one a run trained
        on a rescaled schedule was sampled with during training (:data:`~spurgen.config.ZERO_SNR_SCHEDULER`), else
        :attr:`default_scheduler`; ``None`` for a name :func:`~spurgen.config.find_scheduler` does not know (which
        :class:`~spurgen.config.GenerateConfig` refuses).

        Args:
            requested: ``--scheduler``; ``None`` when not given.
            schedule: The scheduler settings the run was trained to be sampled with (training.json's
                ``noise.sampler``: a zero-terminal-SNR run's); ``None`` for the model's own schedule.
        """
        if requested is None:
            return ZERO_SNR_SCHEDULER if schedule else self.default_scheduler
        return find_scheduler(requested)

    def check_config(self, config: "FinetuneConfig") -> None:
        """Refuses finetune settings the family cannot train with; every family takes all of them by default.

        Raises:
            SpurgenError: a setting the family does not support, named with the fix.
        """

    def prediction_type(self, scheduler_config: dict[str, Any]) -> str:
        """What the denoiser predicts, from the folder's scheduler config (``epsilon``, ``v_prediction``, ...)."""
        return scheduler_config.get("prediction_type", "epsilon")

    def geometry(self, denoiser_config: dict[str, Any], vae_config: dict[str, Any]) -> tuple[int, int]:
        """The native image side and the multiple that image sides must be, from the folder's configs: the UNet's
        sample size x the VAE's downscaling, and that downscaling x the UNet's (every level halves the latent)."""
        vae_scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
        size = denoiser_config["sample_size"]
        size = size if isinstance(size, int) else size[0]
        return size * vae_scale, vae_scale * 2 ** (len(denoiser_config["block_out_channels"]) - 1)

    def latent_shift(self, vae_config: dict[str, Any]) -> float:
        """What is subtracted from the VAE's latents before they are scaled by its ``scaling_factor``: 0 but for
        families whose VAE has a ``shift_factor`` that the pipeline adds back before decoding."""
        return 0.0

    def denoiser_timesteps(self, scheduler: Any, timesteps: "torch.Tensor") -> "torch.Tensor":
        """The timestep input of the denoiser for spurgen's integer timesteps (t in [0, num_train_timesteps), 0 the
        least noisy, as the trainer draws them uniformly and SFSL bounds them): t itself on DDPM's schedule."""
        return timesteps

    def unused_modules(self, part: str, model: "torch.nn.Module") -> tuple[str, ...]:
        """The modules of ``part`` (names in ``model``) outside the training graph: they get no adapter and stay
        frozen in full fine-tuning, since they would never train and data-parallel training refuses parameters
        that get no gradient.

        Args:
            part: The trained part's name (``unet``, ``text_encoder``, ...).
            model: The part.
        """
        return ()

    def lora_target_modules(self, part: str, model: "torch.nn.Module") -> list[str]:
        """The modules of ``part`` that LoRA adapts: :attr:`lora_targets` (peft matches them as name suffixes),
        outside :meth:`unused_modules`."""
        targets, unused = self.lora_targets[part], self.unused_modules(part, model)
        if not unused:
            return list(targets)
        return [name for name, _ in model.named_modules() if name.rpartition(".")[2] in targets
                and not any(name.startswith(f"{prefix}.") for prefix in unused)]

    @property
    def parts(self) -> tuple[str, ...]:
        """Every part a folder of the family must hold for training."""
        return (*self.tokenizers, *self.text_encoders, "vae", self.denoiser, "scheduler")

    def pipeline_class(self) -> type:
        """The diffusers pipeline class of the family."""
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def sampling_pipeline(self, components: "Components") -> Any:
        """A text-to-image pipeline over loaded parts (no copy: trained adapters sample as they are now).

        Args:
            components: The loaded parts.
        """
        parts = dict(zip(self.tokenizers, components.tokenizers))
        parts.update(zip(self.text_encoders, components.text_encoders))
        parts.update({"vae": components.vae, self.denoiser: components.unet, "scheduler": components.sampler})
        pipeline = self.pipeline_class()(**parts, **self.pipeline_arguments)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    def tokenize(self, tokenizers: list[Any], prompts: list[str]) -> list["torch.Tensor"]:
        """Token ids of ``prompts`` per tokenizer, padded to each tokenizer's length as the pipeline pads them."""
        return [tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids for tokenizer in tokenizers]

    @abstractmethod
    def encode_prompts(self, text_encoders: list["torch.nn.Module"], ids: list["torch.Tensor"],
                       resolution: int) -> dict[str, "torch.Tensor"]:
        """The denoiser's conditioning of each prompt, every tensor with one row per prompt.

        Args:
            text_encoders: The text encoders (trained ones as wrapped for training), in :attr:`text_encoders` order;
                ``None`` for an encoder of :attr:`frozen_text_encoders` whose output is cached: its entries are
                left out.
            ids: :meth:`tokenize`'s ids, on the encoders' device.
            resolution: The training image side (for micro-conditioning).
        """

    @abstractmethod
    def predict(self, denoiser: "torch.nn.Module", noisy: "torch.Tensor", timesteps: "torch.Tensor",
                conditioning: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        """The denoiser's output [N, C, H, W] for noisy latents [N, C, H, W] at :meth:`denoiser_timesteps`, with
        :meth:`encode_prompts`' conditioning (one row per latent)."""

    @abstractmethod
    def add_noise(self, scheduler: Any, latents: "torch.Tensor", noise: "torch.Tensor",
                  timesteps: "torch.Tensor") -> "torch.Tensor":
        """z_t of clean latents z and noise eps at timesteps t."""

    @abstractmethod
    def training_target(self, scheduler: Any, latents: "torch.Tensor", noise: "torch.Tensor",
                        timesteps: "torch.Tensor") -> "torch.Tensor":
        """What the denoiser must predict (epsilon, v or flow)."""

    @abstractmethod
    def predicted_original(self, scheduler: Any, noisy: "torch.Tensor", output: "torch.Tensor",
                           timesteps: "torch.Tensor") -> "torch.Tensor":
        """z0_hat, the one-step estimate of the clean latents from the denoiser's output, float32."""

    @abstractmethod
    def sfsl_row_weight(self, scheduler: Any, timesteps: "torch.Tensor", weighting: str) -> "torch.Tensor":
        """SFSL's weight of each row, [N], by ``--sfsl-row-weighting``: with ``v-profile`` weight x the estimate's
        gain equals v-prediction's sqrt(1 - abar_t), whatever the family predicts."""

    @abstractmethod
    def decode(self, decoder: "torch.nn.Module", latents: "torch.Tensor") -> "torch.Tensor":
        """Latents as the denoiser sees them -> [-1, 1] images, with gradients."""

    def vae_dtype(self, vae_config: dict[str, Any], half: "torch.dtype") -> "torch.dtype":
        """The frozen VAE's dtype under mixed precision ``half``: ``half`` unless the family's VAE overflows in it."""
        return half

    def save_lora(self, folder: "Path", models: dict[str, "torch.nn.Module"], base_model: str) -> "Path":
        """Writes the adapters as the file the family's plain diffusers pipeline loads with ``load_lora_weights``.

        Args:
            folder: Where the file goes.
            models: The adapted parts by name (the denoiser, and the text encoders when trained).
            base_model: The base model as a shared file may name it.
        """
        from .._lora import save_lora

        return save_lora(folder, self.pipeline_class(), models, base_model)
