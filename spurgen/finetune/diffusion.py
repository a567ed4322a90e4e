"""The diffusion arithmetic of a training step: what the UNet must predict, the one-step clean-latent estimate
that SFSL decodes, and the seeds that make every micro-step's random draws reproducible.

With abar_t the scheduler's cumulative product of alphas and z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps
(DDPM), the UNet predicts eps, v = sqrt(abar_t) eps - sqrt(1 - abar_t) z, or z itself; each inverts to z0_hat.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

__all__ = ["alpha_bar", "training_target", "predicted_original", "micro_step_seed"]


def alpha_bar(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """abar_t of each row, shaped [N, 1, 1, 1] to broadcast over latents.

    Args:
        scheduler: The diffusers noise scheduler of training.
        timesteps: t of each row, [N].
    """
    return scheduler.alphas_cumprod.to(timesteps.device, torch.float32)[timesteps].view(-1, 1, 1, 1)


def training_target(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor,
                    timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet must predict: the noise (epsilon), the velocity (v-prediction) or the clean latents.

    Args:
        scheduler: The noise scheduler; its ``prediction_type`` chooses the target.
        latents: The clean latents z.
        noise: eps, the noise added to them.
        timesteps: t of each row.
    """
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return latents


def predicted_original(scheduler: Any, noisy: torch.Tensor, output: torch.Tensor,
                       timesteps: torch.Tensor) -> torch.Tensor:
    """z0_hat, the one-step estimate of the clean latents from the UNet output (DDPM's formulas).

    Args:
        scheduler: The noise scheduler; its ``prediction_type`` says what ``output`` is.
        noisy: z_t.
        output: The UNet's prediction for z_t (computed in float32 here, whatever autocast made it).
        timesteps: t of each row.
    """
    kind = scheduler.config.prediction_type
    abar = alpha_bar(scheduler, timesteps)
    output = output.float()
    if kind == "epsilon":
        return (noisy - (1 - abar).sqrt() * output) / abar.sqrt()
    if kind == "v_prediction":
        return abar.sqrt() * noisy - (1 - abar).sqrt() * output
    return output


def micro_step_seed(*parts: int) -> int:
    """A 63-bit seed from (seed, process, step, micro-step): every micro-step's draws are reproducible, so a run
    resumed from a checkpoint draws what the uninterrupted run would have drawn."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1
