"""FLUX.1 pipelines with random weights, saved as real diffusers folders.

A few channels of each part of ``black-forest-labs/FLUX.1-dev``'s layout: ``FluxTransformer2DModel`` (with the
guidance embedding of FLUX.1-dev), CLIP's text encoder with the real CLIP tokenizer, a T5 encoder with an offline
T5 tokenizer (:mod:`.t5_tokenizer`), a VAE with FLUX.1's latent shift and scale, and
``FlowMatchEulerDiscreteScheduler``. spurgen does not train FLUX.1 yet: the folder is for the tests of that
refusal, and for the family when it comes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spurgen.testing.clip_tokenizer import build_clip_tokenizer
from spurgen.testing.stable_diffusion import _TINY, _seeded, save_pipeline
from spurgen.testing.t5_tokenizer import T5_VOCAB_SIZE, build_t5_tokenizer

__all__ = ["build_tiny_flux", "tiny_flux_components"]

# FLUX.1's VAE: 16 latent channels in the real model (4 here), shifted then scaled (ae.safetensors' config).
_VAE = {**_TINY.vae, "use_quant_conv": False, "use_post_quant_conv": False, "shift_factor": 0.1159,
        "scaling_factor": 0.3611}


def tiny_flux_components(*, seed: int = 0) -> dict[str, Any]:
    """A tiny FLUX.1 pipeline's components with seeded random weights, in memory (each part its own seed).

    Args:
        seed: Seed of the weight initialisation.

    Returns:
        The keyword arguments of ``FluxPipeline``.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    with _seeded(seed):
        # in_channels: the VAE's 4 latent channels packed 2 x 2; the rotary axes add up to the head dimension.
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=32, axes_dims_rope=(4, 4, 8), guidance_embeds=True)
    with _seeded(seed + 1):
        vae = AutoencoderKL(**_VAE)
    with _seeded(seed + 2):
        text_encoder = CLIPTextModel(CLIPTextConfig(**_TINY.text_encoder))
    with _seeded(seed + 3):
        text_encoder_2 = T5EncoderModel(T5Config(vocab_size=T5_VOCAB_SIZE, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                 num_heads=4, relative_attention_num_buckets=8,
                                                 decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    return {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
            "tokenizer": build_clip_tokenizer(), "tokenizer_2": build_t5_tokenizer(),
            "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0)}


def build_tiny_flux(out_dir: Path, *, seed: int = 0) -> Path:
    """Write a tiny FLUX.1 pipeline with seeded random weights as a diffusers folder (safetensors).

    The folder loads offline with ``FluxPipeline.from_pretrained(out_dir)``; it is complete or absent
    (:func:`.stable_diffusion.save_pipeline`).

    Args:
        out_dir: Folder to create; must not exist or be empty.
        seed: Seed of the weight initialisation.

    Returns:
        ``out_dir``.
    """
    from diffusers import FluxPipeline

    return save_pipeline(FluxPipeline(**tiny_flux_components(seed=seed)), Path(out_dir), ["tokenizer"])
