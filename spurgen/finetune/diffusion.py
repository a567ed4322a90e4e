"""The diffusion arithmetic of a training step: what the UNet must predict, the one-step clean-latent estimate
that SFSL decodes, and the seeds that make every micro-step's random draws reproducible.

With abar_t the scheduler's cumulative product of alphas and z_t = sqrt(abar_t) z + sqrt(1 - abar_t) eps
(DDPM), the UNet predicts eps, v = sqrt(abar_t) eps - sqrt(1 - abar_t) z, or z itself; each inverts to z0_hat.
How much of a gradient at z0_hat reaches the UNet's output depends on that choice (:func:`estimate_gain`), and
SFSL's per-row weight (:func:`sfsl_row_weight`) evens it out (method.md §2.5).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

__all__ = ["alpha_bar", "training_target", "predicted_original", "estimate_gain", "sfsl_row_weight",
           "ROW_WEIGHT_FORMULAS", "micro_step_seed"]

# sfsl_row_weight's weight per --sfsl-row-weighting and prediction type, written out for training.json.
# "flow": FLUX.1's rectified flow (spurgen.families.flux).
ROW_WEIGHT_FORMULAS = {"v-profile": {"epsilon": "sqrt(abar_t)", "v_prediction": "1", "sample": "sqrt(1 - abar_t)",
                                     "flow": "1 / sqrt((1 - sigma_t)^2 + sigma_t^2)"},
                       "none": {"epsilon": "1", "v_prediction": "1", "sample": "1", "flow": "1"}}


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


def estimate_gain(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    """|d z0_hat / d output| of each row, [N]: the factor by which a gradient at the one-step estimate reaches the
    UNet's output. sqrt((1 - abar_t) / abar_t) for epsilon (about 0.03 at t = 0 and 14.6 at t = 999 on SD's
    schedule), sqrt(1 - abar_t) <= 1 for v-prediction, 1 for sample prediction.

    Args:
        scheduler: The noise scheduler; its ``prediction_type`` says what the UNet predicts.
        timesteps: t of each row.
    """
    kind = scheduler.config.prediction_type
    abar = alpha_bar(scheduler, timesteps).flatten()
    if kind == "epsilon":
        return ((1 - abar) / abar).sqrt()
    if kind == "v_prediction":
        return (1 - abar).sqrt()
    return torch.ones_like(abar)


def sfsl_row_weight(scheduler: Any, timesteps: torch.Tensor, weighting: str) -> torch.Tensor:
    """SFSL's weight of each row, [N], by ``--sfsl-row-weighting``.

    ``v-profile`` makes weight x :func:`estimate_gain` equal v-prediction's sqrt(1 - abar_t) whatever the model
    predicts: sqrt(abar_t) for epsilon, 1 for v-prediction (where it changes nothing), sqrt(1 - abar_t) for sample
    prediction. SFSL's push on the UNet's output then has the same profile over t, bounded by 1, on every kind of
    model; the defaults (kappa, bound) were chosen on a v-prediction model. ``none`` is Eq. 6 as written (1 per row).

    Args:
        scheduler: The noise scheduler; its ``prediction_type`` says what the UNet predicts.
        timesteps: t of each row.
        weighting: ``v-profile`` or ``none``.
    """
    kind = scheduler.config.prediction_type
    abar = alpha_bar(scheduler, timesteps).flatten()
    if weighting == "none" or kind == "v_prediction":
        return torch.ones_like(abar)
    return abar.sqrt() if kind == "epsilon" else (1 - abar).sqrt()


def micro_step_seed(*parts: int) -> int:
    """A 63-bit seed from (seed, process, step, micro-step, stream): every micro-step's draws are reproducible, so
    a run resumed from a checkpoint draws what the uninterrupted run would have drawn; the stream tells apart the
    generators of one micro-step (on the host and on the device)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1
