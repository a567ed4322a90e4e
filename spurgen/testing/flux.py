"""FLUX.1 pipelines with random weights, saved as real diffusers folders.

``black-forest-labs/FLUX.1-dev``'s layout: ``FluxTransformer2DModel`` (with FLUX.1-dev's guidance embedding), CLIP's
text encoder with the real CLIP tokenizer, a T5 encoder with an offline T5 tokenizer (:mod:`.t5_tokenizer`), a VAE
with FLUX.1's latent shift and scale, and ``FlowMatchEulerDiscreteScheduler``. ``tiny`` has a few channels of each
part (for tests); ``full`` FLUX.1-dev's sizes (a 12 B transformer, T5-XXL: for GPU benchmarks, stored in bfloat16,
34 GB).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from spurgen.errors import SpurgenError
from spurgen.testing.clip_tokenizer import build_clip_tokenizer
from spurgen.testing.stable_diffusion import _FULL, _TINY, _seeded, save_pipeline
from spurgen.testing.t5_tokenizer import T5_VOCAB_SIZE, build_t5_tokenizer

__all__ = ["FLUX_ARCHITECTURES", "build_flux", "flux_components"]

# FLUX.1's VAE latents are shifted, then scaled (ae.safetensors' config); 16 channels in the real model.
_LATENT = {"use_quant_conv": False, "use_post_quant_conv": False, "shift_factor": 0.1159, "scaling_factor": 0.3611}
# Per architecture: the transformer's, VAE's, CLIP's and T5's configs, and the scheduler's.
FLUX_ARCHITECTURES: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        # in_channels: the VAE's 4 latent channels packed 2 x 2; the rotary axes add up to the head dimension.
        "transformer": {"patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 1,
                        "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
                        "pooled_projection_dim": 32, "axes_dims_rope": (4, 4, 8), "guidance_embeds": True},
        "vae": {**_TINY.vae, **_LATENT},
        "clip": dict(_TINY.text_encoder),
        "t5": {"vocab_size": T5_VOCAB_SIZE, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
               "relative_attention_num_buckets": 8, "decoder_start_token_id": 0, "pad_token_id": 0,
               "eos_token_id": 1},
        "scheduler": {"shift": 3.0},
    },
    # black-forest-labs/FLUX.1-dev's configs.
    "full": {
        "transformer": {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
                        "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
                        "pooled_projection_dim": 768, "axes_dims_rope": (16, 56, 56), "guidance_embeds": True},
        "vae": {**_FULL.vae, **_LATENT, "latent_channels": 16, "sample_size": 1024, "force_upcast": True},
        "clip": dict(_FULL.text_encoder),
        "t5": {"vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64,
               "relative_attention_num_buckets": 32, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
               "is_gated_act": True, "tie_word_embeddings": False, "decoder_start_token_id": 0, "pad_token_id": 0,
               "eos_token_id": 1},
        "scheduler": {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
                      "base_image_seq_len": 256, "max_image_seq_len": 4096},
    },
}


def flux_components(arch: str = "tiny", *, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A FLUX.1 pipeline's components with seeded random weights, in memory (each part its own seed).

    Args:
        arch: A key of :data:`FLUX_ARCHITECTURES`.
        seed: Seed of the weight initialisation.
        dtype: The weights' dtype; each part is cast as soon as it is made, so that ``full`` never holds more
            than one part in float32.

    Returns:
        The keyword arguments of ``FluxPipeline``.

    Raises:
        SpurgenError: unknown ``arch``.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    if arch not in FLUX_ARCHITECTURES:
        raise SpurgenError(f"unknown FLUX.1 architecture {arch!r}: use one of {', '.join(FLUX_ARCHITECTURES)}")
    a = FLUX_ARCHITECTURES[arch]
    makers = {"transformer": lambda: FluxTransformer2DModel(**a["transformer"]),
              "vae": lambda: AutoencoderKL(**a["vae"]),
              "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**a["clip"])),
              "text_encoder_2": lambda: T5EncoderModel(T5Config(**a["t5"]))}
    parts: dict[str, Any] = {}
    for offset, (name, make) in enumerate(makers.items()):
        with _seeded(seed + offset):
            parts[name] = make().to(dtype)
    return {**parts, "tokenizer": build_clip_tokenizer(), "tokenizer_2": build_t5_tokenizer(),
            "scheduler": FlowMatchEulerDiscreteScheduler(**a["scheduler"])}


def build_flux(out_dir: Path, arch: str = "tiny", *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Path:
    """Write a FLUX.1 pipeline with seeded random weights as a diffusers folder (safetensors).

    The folder loads offline with ``FluxPipeline.from_pretrained(out_dir)``; it is complete or absent
    (:func:`.stable_diffusion.save_pipeline`).

    Args:
        out_dir: Folder to create; must not exist or be empty.
        arch: A key of :data:`FLUX_ARCHITECTURES`.
        seed: Seed of the weight initialisation.
        dtype: The stored weights' dtype (``full`` in bfloat16: 34 GB instead of 67).

    Returns:
        ``out_dir``.
    """
    from diffusers import FluxPipeline

    return save_pipeline(FluxPipeline(**flux_components(arch, seed=seed, dtype=dtype)), Path(out_dir), ["tokenizer"])
