"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, a UNet on DDPM's schedule (epsilon, v or sample)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from .._lora import TEXT_ENCODER_TARGETS, UNET_TARGETS
from ..finetune.diffusion import predicted_original, sfsl_row_weight, training_target
from .base import ModelFamily

if TYPE_CHECKING:
    import torch

__all__ = ["StableDiffusion"]


class StableDiffusion(ModelFamily):
    """``StableDiffusionPipeline``: SD 1.x (CLIP ViT-L/14) and SD 2.x (OpenCLIP ViT-H/14), 512 or 768 px.

    The diffusion arithmetic is DDPM's (:mod:`spurgen.finetune.diffusion`); SDXL shares it.
    """

    name = "sd"
    title = "Stable Diffusion 1.x/2.x"
    pipeline_class_name = "StableDiffusionPipeline"
    tokenizers = ("tokenizer",)
    text_encoders = ("text_encoder",)
    # diffusers' train_dreambooth_lora.py: the attention projections (add_k/v_proj where a UNet has them).
    lora_targets: ClassVar[dict[str, tuple[str, ...]]] = {"unet": UNET_TARGETS, "text_encoder": TEXT_ENCODER_TARGETS}
    noise_scheduler_class = "DDPMScheduler"
    default_guidance = 7.5  # StableDiffusionPipeline's classifier-free guidance
    # The safety checker (1.2 GB) only blanks images: training never loads it.
    pipeline_arguments: ClassVar[dict[str, Any]] = {"safety_checker": None, "feature_extractor": None,
                                                    "requires_safety_checker": False}

    def encode_prompts(self, text_encoders: list["torch.nn.Module"], ids: list["torch.Tensor"],
                       resolution: int) -> dict[str, "torch.Tensor"]:
        """The text encoder's last hidden states (SD has no micro-conditioning: ``resolution`` is unused)."""
        return {"prompt_embeds": text_encoders[0](ids[0])[0]}

    def predict(self, denoiser: "torch.nn.Module", noisy: "torch.Tensor", timesteps: "torch.Tensor",
                conditioning: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        return denoiser(noisy, timesteps, conditioning["prompt_embeds"]).sample

    def add_noise(self, scheduler: Any, latents: "torch.Tensor", noise: "torch.Tensor",
                  timesteps: "torch.Tensor") -> "torch.Tensor":
        return scheduler.add_noise(latents, noise, timesteps)

    def training_target(self, scheduler: Any, latents: "torch.Tensor", noise: "torch.Tensor",
                        timesteps: "torch.Tensor") -> "torch.Tensor":
        return training_target(scheduler, latents, noise, timesteps)

    def predicted_original(self, scheduler: Any, noisy: "torch.Tensor", output: "torch.Tensor",
                           timesteps: "torch.Tensor") -> "torch.Tensor":
        return predicted_original(scheduler, noisy, output, timesteps)

    def sfsl_row_weight(self, scheduler: Any, timesteps: "torch.Tensor", weighting: str) -> "torch.Tensor":
        return sfsl_row_weight(scheduler, timesteps, weighting)

    def decode(self, decoder: "torch.nn.Module", latents: "torch.Tensor") -> "torch.Tensor":
        """``decoder.decode(latents / scaling_factor)``, as diffusers' pipelines call ``pipe.vae``: that undoes the
        SD VAE's 0.18215; AutoencoderTiny's (TAESD's) factor is 1.0, since it was distilled on the scaled latents,
        and its DecoderTiny maps its [0, 1] output to [-1, 1] itself."""
        return decoder.decode(latents.to(decoder.dtype) / decoder.config.scaling_factor).sample
