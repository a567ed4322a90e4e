"""Stable Diffusion XL: two CLIP text encoders with a pooled embedding, micro-conditioning, DDPM's arithmetic."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from .._lora import TEXT_ENCODER_TARGETS
from .sd import StableDiffusion

if TYPE_CHECKING:
    import torch

__all__ = ["StableDiffusionXL"]

# diffusers' train_dreambooth_lora_sdxl.py adapts the UNet's attention projections (SDXL has no add_k/v_proj).
_UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


class StableDiffusionXL(StableDiffusion):
    """``StableDiffusionXLPipeline``: SDXL base (1024 px), CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text encoders.

    Noise, targets, the one-step estimate and SFSL's row weights are SD's (DDPM on the same kind of schedule);
    what differs is the conditioning and the VAE's precision.
    """

    name = "sdxl"
    title = "Stable Diffusion XL"
    pipeline_class_name = "StableDiffusionXLPipeline"
    tokenizers = ("tokenizer", "tokenizer_2")
    text_encoders = ("text_encoder", "text_encoder_2")
    lora_targets: ClassVar[dict[str, tuple[str, ...]]] = {
        "unet": _UNET_TARGETS, "text_encoder": TEXT_ENCODER_TARGETS, "text_encoder_2": TEXT_ENCODER_TARGETS}
    pipeline_arguments: ClassVar[dict[str, Any]] = {}
    default_guidance = 5.0  # StableDiffusionXLPipeline's classifier-free guidance

    def unused_modules(self, part: str, model: "torch.nn.Module") -> tuple[str, ...]:
        """The first text encoder's last layer and final norm: SDXL conditions on that encoder's penultimate
        hidden states (diffusers' SDXL script adapts them anyway and finds unused parameters on every step)."""
        if part != "text_encoder":
            return ()
        last = f"layers.{model.config.num_hidden_layers - 1}"
        return tuple(name for name, _ in model.named_modules() if name.endswith((last, "final_layer_norm")))

    def encode_prompts(self, text_encoders: list["torch.nn.Module"], ids: list["torch.Tensor"],
                       resolution: int) -> dict[str, "torch.Tensor"]:
        """As ``StableDiffusionXLPipeline.encode_prompt``: each encoder's penultimate hidden states, concatenated
        over features; the second encoder's projected pooled output; and the micro-conditioning.

        The micro-conditioning (original size, crop's top left, target size) is what the pipeline samples with
        by default, (resolution, resolution), (0, 0), (resolution, resolution): training images are resized and
        center-cropped to the resolution, and conditioning them as the pipeline later asks keeps the LoRA's
        images where generation looks for them.
        """
        import torch

        hidden, pooled = [], None
        for encoder, tokens in zip(text_encoders, ids):
            output = encoder(tokens, output_hidden_states=True)
            hidden.append(output.hidden_states[-2])
            pooled = output[0]  # CLIPTextModelWithProjection's text_embeds (the last encoder's)
        rows = len(ids[0])
        size = [resolution, resolution, 0, 0, resolution, resolution]
        time_ids = torch.tensor([size] * rows, dtype=hidden[-1].dtype, device=ids[0].device)
        return {"prompt_embeds": torch.cat(hidden, dim=-1), "pooled_prompt_embeds": pooled, "time_ids": time_ids}

    def predict(self, denoiser: "torch.nn.Module", noisy: "torch.Tensor", timesteps: "torch.Tensor",
                conditioning: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        added = {"text_embeds": conditioning["pooled_prompt_embeds"], "time_ids": conditioning["time_ids"]}
        return denoiser(noisy, timesteps, conditioning["prompt_embeds"], added_cond_kwargs=added).sample

    def vae_dtype(self, vae_config: dict[str, Any], half: "torch.dtype") -> "torch.dtype":
        """float32 under fp16 for a VAE that says it overflows there (``force_upcast``, SDXL's own VAE), as the
        pipeline upcasts it; ``--vae madebyollin/sdxl-vae-fp16-fix`` says it does not."""
        import torch

        return torch.float32 if half == torch.float16 and vae_config.get("force_upcast", True) else half

    def decode(self, decoder: "torch.nn.Module", latents: "torch.Tensor") -> "torch.Tensor":
        """SD's decoding; a float32 VAE (see :meth:`vae_dtype`) decodes outside autocast, which would run its
        convolutions in float16 again."""
        import torch

        if decoder.dtype != torch.float32:
            return super().decode(decoder, latents)
        with torch.autocast(latents.device.type, enabled=False):
            return super().decode(decoder, latents.float())
