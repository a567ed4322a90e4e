"""The world's text-to-image model: a real Stable Diffusion pipeline in miniature, trained from scratch.

Same parts and code paths as Stable Diffusion 1.x — ``AutoencoderKL``, ``UNet2DConditionModel``,
``CLIPTextModel`` with the real CLIP tokenizer, a DDPM scheduler, loaded by the stock
``StableDiffusionPipeline`` — only small enough to train on a laptop CPU:

1. the autoencoder learns to reconstruct 32 px world images from 16x16x4 latents;
2. the UNet and the text encoder learn to denoise those latents given the images' captions, with
   the caption dropped 10% of the time so that classifier-free guidance works.

Both stages checkpoint every few hundred steps and resume from the last checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .._runtime import progress_bar
from ..config import require, setting
from ..testing.stable_diffusion import CLIP_TEXT_IDS, SDArchitecture, stable_diffusion_components
from ..workspace import atomic_directory, atomic_write_json
from .dataset import CAPTIONS_FILE

__all__ = ["WORLD_SD", "TextToImageConfig", "train_text_to_image"]


@dataclass
class TextToImageConfig:
    """Settings of the world's text-to-image training."""

    seed: int = setting(0, "Seed of initialisation, batch order, noise and timesteps.")
    vae_steps: int = setting(800, "Autoencoder training steps.")
    vae_lr: float = setting(1e-3, "Autoencoder learning rate.")
    vae_kl_weight: float = setting(1e-4, "Weight of the KL term that keeps latents close to N(0, I).")
    steps: int = setting(2000, "UNet + text encoder training steps.")
    lr: float = setting(6e-4, "UNet + text encoder learning rate (cosine decay after warm-up).")
    batch_size: int = setting(64, "Images per step.")
    caption_dropout: float = setting(0.1, "Fraction of captions replaced by the empty prompt (classifier-free "
                                          "guidance).")
    short_caption_prob: float = setting(0.5, "Fraction of 'a <object> on <feature>' captions shortened to 'a "
                                             "<object>'.")
    checkpoint_every: int = setting(250, "Steps between resumable checkpoints.")
    threads: int = setting(0, "torch threads (0 = torch's default).")

    def validate(self) -> None:
        require(min(self.vae_steps, self.steps) >= 1 and self.batch_size >= 1, "steps and batch size must be positive")


# The miniature pipeline's architecture, built by the same builder as the test pipelines (spurgen.testing).
WORLD_SD = SDArchitecture(
    name="world",
    resolution=32,
    # Cross-attention only at 8x8 and 4x4, where it is cheap; the 16x16 level only convolves.
    unet={"sample_size": 16, "in_channels": 4, "out_channels": 4, "layers_per_block": 1,
          "block_out_channels": (32, 64, 128),
          "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
          "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
          "cross_attention_dim": 64, "attention_head_dim": 8, "norm_num_groups": 16},
    # One down block pair: 32 px -> 16x16x4 latents. A VAE without downsampling is slower (attention over 1,024
    # tokens), a deeper one loses the thin stripes and dots that make up the spurious features.
    vae={"in_channels": 3, "out_channels": 3, "latent_channels": 4, "sample_size": 32,
         "down_block_types": ("DownEncoderBlock2D",) * 2, "up_block_types": ("UpDecoderBlock2D",) * 2,
         "block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8,
         "mid_block_add_attention": False},
    text_encoder={**CLIP_TEXT_IDS, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 3,
                  "num_attention_heads": 4},
    # The spurious features are mostly colours, and a sample's colour is decided in the first, noisiest
    # denoising steps. Two choices make the prompt decide it, not the noise:
    # - DDPM's linear schedule, not Stable Diffusion's scaled_linear: at t = 999 scaled_linear keeps 6.8% of
    #   the signal, enough on 16x16 latents for the UNet to read each image's mean colour from the "pure"
    #   noise; sampling, which starts from real noise, then draws features at random (measured with an
    #   epsilon model: "a photo of blue waves" gave blue waves 37% of the time, 99% once the start noise
    #   carried the leak). The linear schedule keeps 0.6%, a tenth of the noise's own mean.
    # - v-prediction (as Stable Diffusion 2.x): epsilon's loss hardly weighs the clean image at high t, so
    #   neither training nor DreamBooth fine-tuning taught the model a colour for a prompt there
    #   (fine-tuning on six blue-wave references left "sks blue waves" blue 36% of the time).
    scheduler={"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
               "clip_sample": False, "steps_offset": 1},
    prediction_type="v_prediction",
)


def _load_training_images(world: Path) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Every train and feature image of the world in [-1, 1], with its caption row."""
    from ..images import load_rgb

    rows = [json.loads(line) for line in (world / CAPTIONS_FILE).read_text(encoding="utf-8").splitlines()]
    rows = [row for row in rows if row["split"] in ("train", "features")]
    pixels = np.stack([np.asarray(load_rgb(world / row["file"])) for row in rows])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1.0, rows


def _caption_for(row: dict[str, Any], rng: np.random.Generator, config: TextToImageConfig) -> str:
    if rng.uniform() < config.caption_dropout:
        return ""
    caption = row["caption"]
    if row["kind"] == "object_on_feature" and rng.uniform() < config.short_caption_prob:
        # Like real photo captions, which name the bird and rarely the flowers behind it.
        caption = caption.split(" on ")[0]
    return caption


class _Checkpoints:
    """Resumable state of one training stage under ``folder``: modules, optimizer, step, RNG."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def load(
        self, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer
    ) -> tuple[int, np.random.Generator | None]:
        path = self.folder / "state.pt"
        if not path.is_file():
            return 0, None
        state = torch.load(path, map_location="cpu", weights_only=True)
        for name, module in modules.items():
            module.load_state_dict(state["modules"][name])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        rng = np.random.default_rng()
        rng.bit_generator.state = state["numpy_rng"]
        return state["step"], rng

    def save(self, step: int, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
             rng: np.random.Generator) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / "state.pt.tmp"
        torch.save({"step": step, "modules": {n: m.state_dict() for n, m in modules.items()},
                    "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                    "numpy_rng": rng.bit_generator.state}, tmp)
        tmp.replace(self.folder / "state.pt")


def _train_loop(name: str, steps: int, checkpoints: _Checkpoints, modules: dict[str, torch.nn.Module],
                optimizer: torch.optim.Optimizer, seed: int, every: int,
                step_fn: Callable[[int, np.random.Generator], float]) -> list[float]:
    start, rng = checkpoints.load(modules, optimizer)
    rng = rng or np.random.default_rng(seed)
    losses: list[float] = []
    with progress_bar("steps") as progress:
        task = progress.add_task(name, total=steps, completed=start)
        for step in range(start, steps):
            losses.append(step_fn(step, rng))
            progress.update(task, advance=1, description=f"{name} loss {np.mean(losses[-50:]):.4f}")
            if (step + 1) % every == 0 or step + 1 == steps:
                checkpoints.save(step + 1, modules, optimizer, rng)
    return losses


def _train_vae(vae: torch.nn.Module, images: torch.Tensor, config: TextToImageConfig, work: Path) -> float:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    vae.train()

    def step(_: int, rng: np.random.Generator) -> float:
        batch = images[rng.integers(0, len(images), config.batch_size)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        loss = F.mse_loss(reconstruction, batch) + config.vae_kl_weight * posterior.kl().mean() / batch[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.item()

    _train_loop("autoencoder", config.vae_steps, _Checkpoints(work / "vae"), {"vae": vae}, optimizer,
                         config.seed, config.checkpoint_every, step)
    vae.eval()
    with torch.no_grad():
        sample = images[:512]
        mse = F.mse_loss(vae.decode(vae.encode(sample).latent_dist.mode()).sample.clamp(-1, 1), sample).item()
    return 10 * math.log10(4.0 / mse)  # PSNR of [-1, 1] images: peak-to-peak 2


@torch.no_grad()
def _latent_scale(vae: torch.nn.Module, images: torch.Tensor) -> float:
    """Stable Diffusion's scaling factor: 1 / std of the latents, so the UNet sees unit variance."""
    latents = torch.cat(
        [vae.encode(images[i : i + 256]).latent_dist.mode() for i in range(0, min(len(images), 2048), 256)]
    )
    return float(1.0 / latents.std())


def train_text_to_image(world: Path, output: Path, config: TextToImageConfig, work: Path) -> dict[str, Any]:
    """Trains the miniature Stable Diffusion on a built world and saves it as a diffusers folder.

    Args:
        world: A folder written by :func:`spurgen.world.dataset.build_world`.
        output: Where the pipeline folder goes (replaced atomically when done), stored in fp16.
        config: Training settings.
        work: Folder for resumable checkpoints (kept until the pipeline is saved).

    Returns:
        Training metrics: steps, times, final losses, autoencoder PSNR, latent scaling factor.
    """
    from diffusers import StableDiffusionPipeline

    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    components = stable_diffusion_components(WORLD_SD, seed=config.seed)
    torch.manual_seed(config.seed)  # the builder leaves the global RNG alone; training's noise draws from it
    vae, unet, text_encoder = components["vae"], components["unet"], components["text_encoder"]
    tokenizer, scheduler = components["tokenizer"], components["scheduler"]
    images, rows = _load_training_images(world)

    started = time.perf_counter()
    psnr = _train_vae(vae, images, config, work)
    vae_seconds = time.perf_counter() - started
    vae.requires_grad_(False)
    scale = _latent_scale(vae, images)
    vae.register_to_config(scaling_factor=scale)

    # Latents of the whole data set once: the autoencoder is frozen from here on.
    with torch.no_grad():
        latents = (
            torch.cat([vae.encode(images[i : i + 256]).latent_dist.mode() for i in range(0, len(images), 256)]) * scale
        )
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=1e-2)
    warmup = min(200, config.steps // 10)

    def learning_rate(step: int) -> float:
        if step < warmup:
            return config.lr * (step + 1) / warmup
        return config.lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, config.steps - warmup)))

    unet.train()
    text_encoder.train()

    def step(index: int, rng: np.random.Generator) -> float:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(index)
        rows_idx = rng.integers(0, len(latents), config.batch_size)
        captions = [_caption_for(rows[i], rng, config) for i in rows_idx]
        ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        clean = latents[torch.from_numpy(rows_idx)]
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean),))
        noisy = scheduler.add_noise(clean, noise, timesteps)
        prediction = unet(noisy, timesteps, text_encoder(ids)[0]).sample
        loss = F.mse_loss(prediction, scheduler.get_velocity(clean, noise, timesteps))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        return loss.item()

    started = time.perf_counter()
    losses = _train_loop("text-to-image", config.steps, _Checkpoints(work / "unet"),
                         {"unet": unet, "text_encoder": text_encoder}, optimizer, config.seed + 1,
                         config.checkpoint_every, step)
    unet_seconds = time.perf_counter() - started

    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    metrics = {"config": asdict(config), "autoencoder_psnr_db": psnr, "latent_scaling_factor": scale,
               "autoencoder_seconds": vae_seconds, "text_to_image_seconds": unet_seconds,
               "final_loss": float(np.mean(losses[-100:])) if losses else None,
               "parameters": {name: sum(p.numel() for p in module.parameters())
                              for name, module in (("vae", vae), ("unet", unet), ("text_encoder", text_encoder))}}
    with atomic_directory(output) as staging:
        # fp16 halves what ships in the package; loading upcasts to the pipeline's dtype.
        pipeline.to(torch.float16).save_pretrained(staging, safe_serialization=True)
        atomic_write_json(staging / "training_metrics.json", metrics)
    shutil.rmtree(work, ignore_errors=True)
    return metrics
