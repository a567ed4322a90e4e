"""Cheap training knobs from diffusers' helpers: the noise offset, min-SNR loss weighting and zero-terminal-SNR
schedules (``--noise-offset``, ``--snr-gamma``, ``--zero-terminal-snr``; method.md §2.6 says when to use them).

A model trained on DDPM's usual schedule never sees pure noise (SD 1.5's last timestep keeps sqrt(abar_T) = 0.068
of the image), so the mean colour and brightness of its start noise survive into the sample. Many spurious
features are colours; both the noise offset and a zero-terminal-SNR schedule let the model choose them itself.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..config import SCHEDULERS, ZERO_SNR_SCHEDULE, ZERO_SNR_SCHEDULER

if TYPE_CHECKING:
    from .._base_model import Components

__all__ = ["training_noise", "min_snr_weights", "diffusion_loss", "zero_terminal_snr"]


def training_noise(shape: torch.Size, generator: torch.Generator, device: torch.device,
                   offset: float) -> torch.Tensor:
    """eps ~ N(0, I), plus ``offset`` * N(0, 1) per image and channel when ``offset`` > 0 (diffusers' scripts).

    The offset is drawn after the noise, from the same generator: without it the draws are those of plain noise.

    Args:
        shape: The latents' shape [b, c, h, w].
        generator: The micro-step's device generator.
        device: Where the noise is made.
        offset: ``--noise-offset``.
    """
    noise = torch.randn(shape, generator=generator, device=device)
    if offset:
        noise = noise + offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator, device=device)
    return noise


def min_snr_weights(scheduler: Any, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weight of each row's diffusion loss, [N] (Hang et al. 2023, as diffusers' scripts).

    min(SNR_t, gamma) / SNR_t for epsilon prediction, / (SNR_t + 1) for v-prediction (whose loss already weights
    rows by SNR_t + 1 in epsilon terms), and min(SNR_t, gamma) for sample prediction, with SNR_t = abar_t / (1 - abar_t)
    (:func:`diffusers.training_utils.compute_snr`).

    Args:
        scheduler: The noise scheduler; its ``prediction_type`` chooses the normalisation.
        timesteps: t of each row.
        gamma: ``--snr-gamma``.
    """
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = snr.clamp(max=gamma)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return clipped / snr
    if kind == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def diffusion_loss(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None,
                   rows: slice) -> torch.Tensor:
    """The mean squared error of ``rows``, each row's mean weighted by ``weights`` when given (min-SNR).

    Args:
        prediction: The UNet's output.
        target: What it should predict.
        weights: One weight per row of the whole batch, or ``None`` for the plain mean.
        rows: The rows of this loss term (instance or class rows).
    """
    prediction, target = prediction[rows].float(), target[rows].float()
    if weights is None:
        return F.mse_loss(prediction, target)
    per_row = (prediction - target).square().mean(dim=tuple(range(1, prediction.ndim)))
    return (per_row * weights[rows]).mean()


def zero_terminal_snr(parts: "Components") -> "Components":
    """The parts with both schedules rescaled to zero terminal SNR (Lin et al. 2024, diffusers'
    ``rescale_betas_zero_snr``): the noise scheduler for training, and DDIM with trailing timesteps for the
    validation images, the sampler that paper pairs with it (a leading schedule never starts from pure noise).

    Args:
        parts: The base model's parts, whose schedulers' configurations are kept otherwise.
    """
    import diffusers

    noise = diffusers.DDPMScheduler.from_config(parts.noise_scheduler.config, rescale_betas_zero_snr=True)
    sampler_class = getattr(diffusers, SCHEDULERS[ZERO_SNR_SCHEDULER][0])
    sampler = sampler_class.from_config(parts.sampler.config, **ZERO_SNR_SCHEDULE)
    return dataclasses.replace(parts, noise_scheduler=noise, sampler=sampler)
