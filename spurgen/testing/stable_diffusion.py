"""Stable Diffusion pipelines with random weights, saved as real diffusers folders.

No Stable Diffusion weights can be downloaded where spurgen is built and tested, yet every code path must run
on a genuine ``StableDiffusionPipeline`` folder. These builders write one from code: the same file layout,
configs and classes as a hub checkpoint, with seeded random weights. ``"tiny"`` is for tests (a training
step in well under 0.1 s on CPU); ``"full"`` and ``"full-v2"`` reproduce SD 1.5's and SD 2.1's architectures
for benchmarks and memory estimates. The synthetic world builds its text-to-image model's untrained
components here too, from its own :class:`SDArchitecture`.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from spurgen.errors import SpurgenError
from spurgen.testing.clip_tokenizer import CLIP_MAX_LENGTH, CLIP_VOCAB_SIZE, build_clip_tokenizer, write_bpe_files

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

__all__ = [
    "CLIP_TEXT_IDS",
    "PREDICTION_TYPES",
    "SD_ARCHITECTURES",
    "SDArchitecture",
    "build_stable_diffusion",
    "build_tiny_autoencoder",
    "count_parameters",
    "save_pipeline",
    "stable_diffusion_components",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

# SD 1.5's training noise schedule (runwayml/stable-diffusion-v1-5 scheduler_config.json). SD 2.x keeps the
# same betas; only the prediction type changes.
_SD_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "steps_offset": 1,
}

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")


@dataclass(frozen=True)
class SDArchitecture:
    """The configs of one Stable Diffusion architecture.

    Args:
        name: registry key.
        resolution: image side in pixels the model is trained at.
        unet: keyword arguments of ``UNet2DConditionModel``.
        vae: keyword arguments of ``AutoencoderKL``.
        text_encoder: keyword arguments of ``transformers.CLIPTextConfig``.
        scheduler: keyword arguments of ``DDPMScheduler`` but ``prediction_type``; SD's training schedule
            unless given.
        prediction_type: the scheduler's ``prediction_type`` unless overridden at build time.
        pad_token: the tokenizer's pad token; SD 2.x pads with ``"!"`` where SD 1.x pads with end-of-text.
    """

    name: str
    resolution: int
    unet: dict[str, Any] = field(repr=False)
    vae: dict[str, Any] = field(repr=False)
    text_encoder: dict[str, Any] = field(repr=False)
    scheduler: dict[str, Any] = field(default_factory=lambda: dict(_SD_SCHEDULER), repr=False)
    prediction_type: str = "epsilon"
    pad_token: str = "<|endoftext|>"

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (each VAE block but the last halves the image)."""
        return 2 ** (len(self.vae["block_out_channels"]) - 1)

    @property
    def latent_size(self) -> int:
        """Latent side at ``resolution``."""
        return self.resolution // self.vae_scale_factor


# The text encoder's special ids are CLIP's real ones. SD 1.5's own config.json says bos 0 / eos 2, which
# makes transformers fall back to a legacy argmax pooling; SD ignores the pooled output, so nothing else
# changes, and the real ids keep pooling right for anything that does use it.
CLIP_TEXT_IDS: dict[str, Any] = {
    "vocab_size": CLIP_VOCAB_SIZE,
    "max_position_embeddings": CLIP_MAX_LENGTH,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}

_TINY = SDArchitecture(
    name="tiny",
    resolution=64,
    unet={
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        # Cross-attention only on the 16x16 level: at 32x32 self-attention over 1024 tokens would
        # dominate the step time and the tiny model does not need it to learn a prompt.
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "cross_attention_dim": 32,
        "attention_head_dim": 4,
        "norm_num_groups": 32,
    },
    vae={
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (32, 64),
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 64,
    },
    text_encoder={
        **CLIP_TEXT_IDS,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "projection_dim": 32,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    },
)

# runwayml/stable-diffusion-v1-5: unet/, vae/ and text_encoder/ config.json (CLIP ViT-L/14 text tower).
_FULL = SDArchitecture(
    name="full",
    resolution=512,
    unet={
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": (320, 640, 1280, 1280),
        "layers_per_block": 2,
        "down_block_types": _SD_DOWN,
        "up_block_types": _SD_UP,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "act_fn": "silu",
        "center_input_sample": False,
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-5,
        "norm_num_groups": 32,
    },
    vae={
        "in_channels": 3,
        "out_channels": 3,
        "block_out_channels": (128, 256, 512, 512),
        "down_block_types": ("DownEncoderBlock2D",) * 4,
        "up_block_types": ("UpDecoderBlock2D",) * 4,
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "act_fn": "silu",
        "sample_size": 512,
    },
    text_encoder={
        **CLIP_TEXT_IDS,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
    },
)

# stabilityai/stable-diffusion-2-1 (768 px, v-prediction): OpenCLIP ViT-H/14 text tower minus its last
# layer (23 of 24), linear projections in the transformer blocks, fp16-safe upcast attention.
_FULL_V2 = SDArchitecture(
    name="full-v2",
    resolution=768,
    unet={
        **_FULL.unet,
        "sample_size": 96,
        "cross_attention_dim": 1024,
        "attention_head_dim": (5, 10, 20, 20),
        "use_linear_projection": True,
        "upcast_attention": True,
    },
    vae={**_FULL.vae, "sample_size": 768},
    text_encoder={
        **CLIP_TEXT_IDS,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 23,
        "num_attention_heads": 16,
        "projection_dim": 512,
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
    },
    prediction_type="v_prediction",
    pad_token="!",
)

SD_ARCHITECTURES: dict[str, SDArchitecture] = {a.name: a for a in (_TINY, _FULL, _FULL_V2)}


def _architecture(arch: str | SDArchitecture) -> SDArchitecture:
    if isinstance(arch, SDArchitecture):
        return arch
    try:
        return SD_ARCHITECTURES[arch]
    except KeyError:
        raise SpurgenError(
            f"unknown Stable Diffusion architecture {arch!r}: use one of {', '.join(SD_ARCHITECTURES)}"
        ) from None


def _prediction_type(a: SDArchitecture, prediction_type: str | None) -> str:
    prediction_type = prediction_type or a.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise SpurgenError(
            f"unknown prediction type {prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}"
        )
    return prediction_type


# diffusers and transformers are imported in the builders, not at the top: the world's text-to-image module
# imports this one for SDArchitecture, and those two libraries take seconds to import.
def _make_unet(a: SDArchitecture) -> UNet2DConditionModel:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**copy.deepcopy(a.unet))


def _make_vae(a: SDArchitecture) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    return AutoencoderKL(**copy.deepcopy(a.vae))


def _make_text_encoder(a: SDArchitecture) -> CLIPTextModel:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**copy.deepcopy(a.text_encoder)))


def _make_scheduler(a: SDArchitecture, prediction_type: str) -> DDPMScheduler:
    from diffusers import DDPMScheduler

    return DDPMScheduler(**a.scheduler, prediction_type=prediction_type)


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for the block, then restore the caller's RNG state."""
    # devices=[] keeps fork_rng off CUDA: weights are created on CPU, and touching CUDA would initialise it.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def count_parameters(arch: str | SDArchitecture = "full") -> dict[str, int]:
    """Count each component's parameters without allocating weights (built on the meta device).

    Args:
        arch: a key of ``SD_ARCHITECTURES``, or an architecture of one's own.

    Returns:
        ``{"unet": n, "vae": n, "text_encoder": n}``.
    """
    a = _architecture(arch)
    with torch.device("meta"):
        models = {"unet": _make_unet(a), "vae": _make_vae(a), "text_encoder": _make_text_encoder(a)}
    return {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}


def stable_diffusion_components(
    arch: str | SDArchitecture = "tiny",
    *,
    prediction_type: str | None = None,
    seed: int = 0,
    tokenizer: CLIPTokenizer | None = None,
) -> dict[str, Any]:
    """Build a Stable Diffusion pipeline's components with seeded random weights, in memory.

    Each model is built under its own seed (``seed``, ``seed + 1``, ``seed + 2``) with the caller's torch RNG
    state restored afterwards, so building consumes no random numbers of the caller's.

    Args:
        arch: a key of ``SD_ARCHITECTURES``, or an architecture of one's own.
        prediction_type: scheduler prediction type (``"epsilon"``, ``"v_prediction"``, ``"sample"``);
            defaults to the architecture's.
        seed: seed of the weight initialisation; the same seed gives the same weights.
        tokenizer: the tokenizer; defaults to the real CLIP tokenizer with the architecture's pad token.

    Returns:
        ``{"unet", "vae", "text_encoder", "tokenizer", "scheduler"}``: the keyword arguments of
        ``StableDiffusionPipeline`` but its safety checker.

    Raises:
        SpurgenError: unknown ``arch`` or ``prediction_type``.
    """
    a = _architecture(arch)
    prediction_type = _prediction_type(a, prediction_type)
    if tokenizer is None:
        tokenizer = build_clip_tokenizer()
        tokenizer.pad_token = a.pad_token

    # A separate seed per component, so each one's weights do not depend on the order they are built in.
    with _seeded(seed):
        unet = _make_unet(a)
    with _seeded(seed + 1):
        vae = _make_vae(a)
    with _seeded(seed + 2):
        text_encoder = _make_text_encoder(a)
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
            "scheduler": _make_scheduler(a, prediction_type)}


def build_stable_diffusion(
    out_dir: Path,
    arch: str | SDArchitecture = "tiny",
    *,
    prediction_type: str | None = None,
    seed: int = 0,
    tokenizer: CLIPTokenizer | None = None,
) -> Path:
    """Write a Stable Diffusion pipeline with seeded random weights as a diffusers folder (safetensors).

    The folder loads offline with ``StableDiffusionPipeline.from_pretrained(out_dir)``. It is written by
    :func:`save_pipeline`, so ``out_dir`` is either complete or absent.

    Args:
        out_dir: folder to create; must not exist or be empty.
        arch: a key of ``SD_ARCHITECTURES`` (``"tiny"``, ``"full"``, ``"full-v2"``), or an architecture of
            one's own. ``"full"`` allocates about 1 B parameters (~4 GB of RAM).
        prediction_type: scheduler prediction type (``"epsilon"``, ``"v_prediction"``, ``"sample"``);
            defaults to the architecture's.
        seed: seed of the weight initialisation; the same seed gives the same weights.
        tokenizer: tokenizer to save with the pipeline; defaults to the real CLIP tokenizer.

    Returns:
        ``out_dir``.

    Raises:
        SpurgenError: unknown ``arch`` or ``prediction_type``, or ``out_dir`` already holds files.
    """
    from diffusers import StableDiffusionPipeline

    a = _architecture(arch)
    prediction_type = _prediction_type(a, prediction_type)
    own_tokenizer = tokenizer is None
    components = stable_diffusion_components(a, prediction_type=prediction_type, seed=seed, tokenizer=tokenizer)
    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return save_pipeline(pipe, Path(out_dir), ["tokenizer"] if own_tokenizer else [])


def save_pipeline(pipe: Any, out_dir: Path, bpe_folders: list[str]) -> Path:
    """Save a pipeline as a diffusers folder (safetensors), complete or not at all.

    It is written in a sibling temporary folder and renamed into place, so ``out_dir`` is either complete or
    absent.

    Args:
        pipe: The pipeline.
        out_dir: Folder to create; must not exist or be empty.
        bpe_folders: Tokenizer subfolders that also get CLIP's ``vocab.json`` and ``merges.txt`` (the hub layout,
            readable by older transformers too).

    Returns:
        ``out_dir``.

    Raises:
        SpurgenError: ``out_dir`` already holds files.
    """
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise SpurgenError(f"{out_dir} already exists and is not empty: remove it or choose another folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Same parent as out_dir, so the final rename stays on one filesystem and is atomic.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for folder in bpe_folders:
            write_bpe_files(tmp / folder)
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename cannot replace a directory on every OS
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def build_tiny_autoencoder(out_dir: Path, arch: str = "tiny", *, seed: int = 0,
                           latent_channels: int | None = None) -> Path:
    """Write a diffusers ``AutoencoderTiny`` (TAESD) with seeded random weights for ``arch``'s latents.

    ``"full"`` and ``"full-v2"`` get TAESD's own configuration (madebyollin/taesd: 4 blocks of 64 channels,
    8x upsampling); ``"tiny"`` a few channels with the tiny VAE's scale factor. For ``--sfsl-decoder`` in
    tests and benchmarks.

    Args:
        out_dir: folder to write (``AutoencoderTiny.from_pretrained(out_dir)`` loads it).
        arch: a key of ``SD_ARCHITECTURES``.
        seed: seed of the weight initialisation.
        latent_channels: the latents' channels, when not ``arch``'s VAE's (16: FLUX.1's TAEF1).

    Returns:
        ``out_dir``.
    """
    from diffusers import AutoencoderTiny

    a = _architecture(arch)
    levels = len(a.vae["block_out_channels"])
    kwargs: dict[str, Any] = {"latent_channels": latent_channels or a.vae["latent_channels"]}
    if arch == "tiny":
        kwargs.update(encoder_block_out_channels=(16,) * levels, decoder_block_out_channels=(16,) * levels,
                      num_encoder_blocks=(1,) * levels, num_decoder_blocks=(1,) * levels)
    with _seeded(seed):
        model = AutoencoderTiny(**kwargs)
    model.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)
