"""Stable Diffusion XL pipelines with random weights, saved as real diffusers folders.

As :mod:`.stable_diffusion` does for SD 1.x/2.x: the configs and classes of ``stabilityai/stable-diffusion-xl-base-1.0``
(``"full"``, for benchmarks) or a few channels of each (``"tiny"``, for tests), with seeded random weights and
the real CLIP tokenizer for both text encoders.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spurgen.errors import SpurgenError
from spurgen.testing.clip_tokenizer import build_clip_tokenizer
from spurgen.testing.stable_diffusion import _FULL, _SD_SCHEDULER, _TINY, CLIP_TEXT_IDS, _seeded, save_pipeline

__all__ = ["SDXL_ARCHITECTURES", "SDXLArchitecture", "build_sdxl", "sdxl_components"]


@dataclass(frozen=True)
class SDXLArchitecture:
    """The configs of one SDXL architecture.

    Args:
        name: Registry key.
        resolution: Image side in pixels the model is trained at.
        unet: Keyword arguments of ``UNet2DConditionModel`` (``addition_embed_type="text_time"``).
        vae: Keyword arguments of ``AutoencoderKL``.
        text_encoder: Keyword arguments of ``CLIPTextConfig`` for ``CLIPTextModel``.
        text_encoder_2: Keyword arguments of ``CLIPTextConfig`` for ``CLIPTextModelWithProjection``.
    """

    name: str
    resolution: int
    unet: dict[str, Any] = field(repr=False)
    vae: dict[str, Any] = field(repr=False)
    text_encoder: dict[str, Any] = field(repr=False)
    text_encoder_2: dict[str, Any] = field(repr=False)


# SDXL's VAE: SD's architecture, another latent scale, and it overflows in float16 (force_upcast).
_SDXL_VAE = {"scaling_factor": 0.13025, "force_upcast": True}

_TINY_XL = SDXLArchitecture(
    name="tiny",
    resolution=64,
    unet={
        **_TINY.unet,
        # Two encoders of 32 features each; the pooled projection (32) plus 6 micro-conditioning values of 8.
        "cross_attention_dim": 64,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 6 * 8 + 32,
    },
    vae={**_TINY.vae, **_SDXL_VAE},
    text_encoder={**_TINY.text_encoder},
    text_encoder_2={**_TINY.text_encoder, "hidden_act": "gelu"},
)

# stabilityai/stable-diffusion-xl-base-1.0: unet/, vae/, text_encoder/ and text_encoder_2/ config.json.
_FULL_XL = SDXLArchitecture(
    name="full",
    resolution=1024,
    unet={
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (320, 640, 1280),
        "layers_per_block": 2,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2, 10),
        "attention_head_dim": (5, 10, 20),
        "cross_attention_dim": 2048,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
        "norm_num_groups": 32,
    },
    vae={**_FULL.vae, "sample_size": 1024, **_SDXL_VAE},
    text_encoder={**CLIP_TEXT_IDS, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                  "num_attention_heads": 12, "projection_dim": 768, "hidden_act": "quick_gelu"},
    text_encoder_2={**CLIP_TEXT_IDS, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                    "num_attention_heads": 20, "projection_dim": 1280, "hidden_act": "gelu"},
)

SDXL_ARCHITECTURES: dict[str, SDXLArchitecture] = {a.name: a for a in (_TINY_XL, _FULL_XL)}

# stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json: SD's betas, Euler with leading spacing.
_SDXL_SCHEDULER = {**_SD_SCHEDULER, "timestep_spacing": "leading", "interpolation_type": "linear",
                   "use_karras_sigmas": False, "prediction_type": "epsilon"}
_SDXL_SCHEDULER.pop("clip_sample")


def _architecture(arch: str) -> SDXLArchitecture:
    if arch not in SDXL_ARCHITECTURES:
        raise SpurgenError(f"unknown SDXL architecture {arch!r}: use one of {', '.join(SDXL_ARCHITECTURES)}")
    return SDXL_ARCHITECTURES[arch]


def sdxl_components(arch: str = "tiny", *, seed: int = 0) -> dict[str, Any]:
    """An SDXL pipeline's components with seeded random weights, in memory.

    Each model is built under its own seed (``seed`` ... ``seed + 3``), the caller's RNG state left as it was.

    Args:
        arch: A key of ``SDXL_ARCHITECTURES``.
        seed: Seed of the weight initialisation.

    Returns:
        The keyword arguments of ``StableDiffusionXLPipeline``.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    a = _architecture(arch)
    tokenizer_2 = build_clip_tokenizer()
    tokenizer_2.pad_token = "!"  # the OpenCLIP tokenizer of SDXL's second encoder pads with "!"
    with _seeded(seed):
        unet = UNet2DConditionModel(**copy.deepcopy(a.unet))
    with _seeded(seed + 1):
        vae = AutoencoderKL(**copy.deepcopy(a.vae))
    with _seeded(seed + 2):
        text_encoder = CLIPTextModel(CLIPTextConfig(**a.text_encoder))
    with _seeded(seed + 3):
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**a.text_encoder_2))
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
            "tokenizer": build_clip_tokenizer(), "tokenizer_2": tokenizer_2,
            "scheduler": EulerDiscreteScheduler(**_SDXL_SCHEDULER)}


def build_sdxl(out_dir: Path, arch: str = "tiny", *, seed: int = 0) -> Path:
    """Write an SDXL pipeline with seeded random weights as a diffusers folder (safetensors).

    The folder loads offline with ``StableDiffusionXLPipeline.from_pretrained(out_dir)``; it is complete or
    absent (:func:`.stable_diffusion.save_pipeline`).

    Args:
        out_dir: Folder to create; must not exist or be empty.
        arch: ``"tiny"`` or ``"full"`` (about 3.5 B parameters, ~14 GB of RAM).
        seed: Seed of the weight initialisation.

    Returns:
        ``out_dir``.

    Raises:
        SpurgenError: unknown ``arch``, or ``out_dir`` already holds files.
    """
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**sdxl_components(arch, seed=seed))
    return save_pipeline(pipe, Path(out_dir), ["tokenizer", "tokenizer_2"])
