"""What SFSL costs in a dreambooth-te training step, and what each of its cost-cutting measures buys.

One ``sfsl`` trainer (LoRA rank 4, batch b+b, prior preservation, gradient checkpointing at the full size)
takes its steps with SFSL switched between these variants, in turns (A B C ... A B C ...), so that a machine
whose load drifts slows them alike:

- ``no SFSL``: the dreambooth-te step, the baseline of every row;
- ``every row decoded``: SFSL on every instance row (timestep bound 999), the VAE decoder without gradient
  checkpointing, the classifier in the contiguous layout;
- ``+ decoder checkpointing``, ``+ channels-last classifier``: each measure added to the one before;
- ``+ TAESD decoder``: ``--sfsl-decoder`` (an AutoencoderTiny with TAESD's architecture, random weights).

The timestep bound and ``--sfsl-every N`` do not change what a step that computes SFSL costs, only how often
SFSL is computed: a row has t <= bound with probability (bound + 1) / T, and the decoded rows' cost is linear
in their number, so their rows' expected step time is ``none + p * (decoded - none)`` with p = (bound + 1) / T
(/ N with ``--sfsl-every N``) — computed from the measured variants, not left to the few timesteps that a
couple of timed steps happen to draw. Each row's ratio is its step time over the no-SFSL step; target: some
combination at most 1.3x.

On a GPU the record also has images/s, the card, peak GPU memory (``torch.cuda.max_memory_allocated``) and
the UNet step's model-FLOPs utilisation: the FLOPs of one UNet forward + backward (LoRA), counted by
``torch.utils.flop_counter.FlopCounterMode`` on the meta device, over the no-SFSL step time and the card's
dense bf16 peak.

    python -m bench.sfsl [--size tiny|full] [--steps 1] [--repeats 2] [--every 4] [--threads 1]
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from ._common import (add_common_arguments, add_training_arguments, apply_threads, measure_interleaved,
                      refuse_full_flux_on_cpu, save_run)
from .finetune import RANK, Bench, release, trainer_steps

# run()'s arguments per --size.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"arch": "tiny", "sfsl_arch": "resnet50.tv_in1k", "steps": 5},
    # No warm-up turn at the full size: a step takes minutes on a CPU, and its one-time costs are a few seconds.
    "full": {"arch": "full", "sfsl_arch": "resnet50.tv_in1k", "steps": 1, "gradient_checkpointing": True, "warmup": 0},
    # SDXL's architecture at 1024 px (python -m bench.sfsl --size full-sdxl); far too slow for a CPU.
    "full-sdxl": {"arch": "sdxl-full", "sfsl_arch": "resnet50.tv_in1k", "steps": 1, "gradient_checkpointing": True,
                  "warmup": 0},
    # FLUX.1-dev's architecture at 512 px (python -m bench.sfsl --size full-flux --device cuda): GPU only.
    "full-flux": {"arch": "flux-full", "sfsl_arch": "resnet50.tv_in1k", "steps": 1, "gradient_checkpointing": True,
                  "warmup": 0, "resolution": 512},
}
# A GPU takes a step in a fraction of a second: several steps per turn and a warm-up turn; and it holds SD 1.5
# at batch 1+1 without gradient checkpointing, as users train it there.
GPU_SIZES: dict[str, dict[str, Any]] = {"full": {"steps": 5, "warmup": 1, "gradient_checkpointing": False},
                                        "full-sdxl": {"steps": 5, "warmup": 1}, "full-flux": {"steps": 5, "warmup": 1}}

TARGET = 1.3

# Dense bf16 tensor-core peaks in TFLOPS (vendor data sheets; SXM parts), matched against the device name.
PEAK_BF16_TFLOPS: dict[str, float] = {"H200": 989.4, "H100 SXM": 989.4, "H100 PCIe": 756.0, "H100": 989.4,
                                      "A100": 312.0, "L40S": 362.1, "A10G": 70.0, "L4": 121.0, "RTX 4090": 165.2}

# Measured variants: (label, SFSL on, decoder checkpointing, channels-last classifier, TAESD decoder). Without a
# warm-up turn the first call pays the process's first allocations: TAESD's, so its figure errs high.
_VARIANTS: tuple[tuple[str, bool, bool, bool, bool], ...] = (
    ("taesd", True, True, True, True),
    ("none", False, False, False, False),
    ("plain", True, False, False, False),
    ("checkpointed", True, True, False, False),
    ("channels-last", True, True, True, False),
)


def peak_tflops(device_name: str) -> float | None:
    """The card's dense bf16 peak from :data:`PEAK_BF16_TFLOPS`, ``None`` for an unknown card."""
    for key, value in PEAK_BF16_TFLOPS.items():
        if key.lower() in device_name.lower():
            return value
    return None


def unet_training_flops(unet_config: dict[str, Any], batch: int, latent_size: int, tokens: int) -> float:
    """FLOPs of one forward + backward of a UNet with LoRA adapters (rank 4), counted on the meta device.

    The count does not depend on the device and allocates no weights; gradient checkpointing's recomputation
    is not counted (model FLOPs, as MFU defines them).

    Args:
        unet_config: The UNet's config (``unet.config``).
        batch: Rows per step (instance + class).
        latent_size: Latent side.
        tokens: Prompt length.
    """
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from spurgen._lora import UNET_TARGETS, add_lora

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(unet_config))
        unet.requires_grad_(False)
        add_lora(unet, UNET_TARGETS, RANK, RANK)
        latents = torch.randn(batch, unet.config.in_channels, latent_size, latent_size)
        timesteps = torch.randint(0, 1000, (batch,))
        hidden = torch.randn(batch, tokens, unet.config.cross_attention_dim)
        added = None
        if unet.config.addition_embed_type == "text_time":  # SDXL: pooled text embedding + 6 micro-conditions
            pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
            added = {"text_embeds": torch.randn(batch, pooled), "time_ids": torch.randn(batch, 6)}
        with FlopCounterMode(display=False) as counter:
            unet(latents, timesteps, hidden, added_cond_kwargs=added).sample.float().pow(2).mean().backward()
    return float(counter.get_total_flops())


def run(arch: str = "tiny", steps: int = 5, repeats: int = 3, batch_size: int = 1, mixed_precision: str | None = None,
        sfsl_arch: str = "resnet50.tv_in1k", gradient_checkpointing: bool = False, every: int = 4, warmup: int = 1,
        device: str = "auto", resolution: int | None = None) -> list[dict[str, Any]]:
    """Measures the SFSL variants in turns and returns one record per row of the table.

    Args:
        arch: Random model architecture (:func:`bench._common.random_stable_diffusion`).
        steps: Steps per timed turn.
        repeats: Timed turns of each variant, after one warm-up turn.
        batch_size: Reference images per step (and as many class images).
        mixed_precision: ``no``, ``fp16`` or ``bf16``; default bf16 on a GPU, no on a CPU.
        sfsl_arch: timm architecture of the SFSL classifier.
        gradient_checkpointing: finetune's --gradient-checkpointing (UNet and text encoder) in every variant.
        every: N of the ``--sfsl-every`` rows.
        warmup: Untimed turns of each variant first.
        device: ``auto`` or ``cpu``.
        resolution: Training image side; ``None``: the model's.

    Raises:
        RuntimeError: FLUX.1 at full size without a GPU.
    """
    from spurgen.config import FinetuneConfig
    from spurgen.finetune.sfsl import load_sfsl_decoder
    from spurgen.finetune.trainer import frozen_dtype
    from spurgen.testing import build_tiny_autoencoder

    refuse_full_flux_on_cpu(arch, device, "--size full-flux")
    setup = Bench(arch, sfsl_arch, batch_size, mixed_precision, gradient_checkpointing, device)
    # Every measured step computes SFSL (bound 999, --sfsl-every 1); the bound's and --sfsl-every's savings are
    # derived from these below. The config's default --sfsl-every (4) would skip SFSL on 3 steps of 4.
    trainer, _ = setup.trainer("sfsl", sfsl_max_timestep=999, sfsl_every=1, resolution=resolution)
    where = trainer.accelerator.device
    # TAESD-XL and TAEF1 have TAESD's architecture: an SDXL or FLUX.1 arch gets the SD decoder of its size, on its
    # VAE's latent channels.
    latent_channels = trainer.parts.vae.config.latent_channels
    decoder = build_tiny_autoencoder(setup.root / "taesd", arch.removeprefix("sdxl-").removeprefix("flux-"),
                                     latent_channels=latent_channels)
    taesd = load_sfsl_decoder(str(decoder), latent_channels, where, frozen_dtype(trainer.accelerator))

    def variant(on: bool, checkpointing: bool, channels_last: bool, tiny_decoder: bool) -> Callable[[], None]:
        """Switches the trainer's SFSL to one variant (the same models, switched between steps), then steps."""
        take = trainer_steps(trainer, steps)
        return lambda: (trainer.set_sfsl(on, taesd if tiny_decoder else None, decoder_checkpointing=checkpointing,
                                         channels_last=channels_last), take())

    # Peak memory: the allocator's peak on a GPU; on a CPU the resident set's growth during the step (its
    # absolute peak is mostly the weights, alike in every variant).
    times = measure_interleaved({label: variant(*switches) for label, *switches in _VARIANTS}, repeats=repeats,
                                warmup=warmup, device=where.type, relative_memory=where.type != "cuda", progress=True)
    bound = FinetuneConfig().sfsl_max_timestep
    p = (bound + 1) / trainer.parts.noise_scheduler.config.num_train_timesteps
    # On a CPU the process's CPU seconds: other jobs on the same cores change a step's wall-clock time by
    # 2x within minutes, not the work it does. On a GPU, wall-clock time.
    cpu = where.type == "cpu"

    def per_step(label: str) -> float:
        return (times[label].cpu_median if cpu else times[label].median) / steps

    none = per_step("none")

    def expected(measured: str, share: float) -> float:
        return none + share * (per_step(measured) - none)

    rows: list[tuple[str, float, str, bool]] = [  # label, s/step, measured variant (memory), expected
        ("dreambooth-te, no SFSL (baseline)", none, "none", False),
        ("SFSL, every row decoded", per_step("plain"), "plain", False),
        (f"+ only rows t<={bound}", expected("plain", p), "plain", True),
        ("+ decoder checkpointing", expected("checkpointed", p), "checkpointed", True),
        ("+ channels-last classifier", expected("channels-last", p), "channels-last", True),
        (f"+ every {every} steps", expected("channels-last", p / every), "channels-last", True),
        ("+ TAESD decoder", expected("taesd", p / every), "taesd", True),
        (f"TAESD + checkpointing + channels-last, t<={bound}, every step", expected("taesd", p), "taesd", True),
    ]
    name = (
        f"({arch}, {where.type}, {trainer.accelerator.mixed_precision}, batch {batch_size}+{batch_size}, {sfsl_arch})"
    )
    unet = trainer.family.denoiser == "unet"
    gpu = _gpu_figures(trainer, batch_size, none) if where.type == "cuda" and unet else {
        "mfu": "n/a on CPU" if unet else "n/a (the FLOP count covers UNets)"}
    if where.type != "cuda" or not unet:
        gpu["unet_step_tflops"] = _unet_tflops(trainer, batch_size) if unet else None
    records = []
    for label, seconds, measured, derived in rows:
        ratio = seconds / none
        records.append({
            "stage": "sfsl", "name": f"{label} {name}", "label": label, "unit": "CPU s/step" if cpu else "s/step",
            "ours": seconds,
            "baseline": none, "ratio": ratio, "target": TARGET, "target_text": f"<= {TARGET}x",
            "verdict": "ok" if ratio <= TARGET else "above", "expected_from": measured if derived else None,
            "ours_peak_mb": times[measured].peak_memory_mb, "baseline_peak_mb": times["none"].peak_memory_mb,
            "ours_seconds": times[measured].seconds, "baseline_seconds": times["none"].seconds, "steps": steps,
            "ours_cpu_seconds": times[measured].cpu_seconds, "baseline_cpu_seconds": times["none"].cpu_seconds,
            "images_per_s": 2 * batch_size / seconds, "every": every if "every" in label else 1, **gpu})
        print(
            f"{label}: {seconds:.3f} {'CPU ' if cpu else ''}s/step{' (expected)' if derived else ''}, {ratio:.3f}x the "
            "no-SFSL step, "
            f"peak {times[measured].peak_memory_mb or 0:.0f} MB"
        )
    if unet:
        print(f"UNet fwd+bwd: {gpu['unet_step_tflops']:.3f} TFLOPs per step; MFU: {gpu['mfu']}")
    release(trainer)
    return records


def _unet_tflops(trainer: Any, batch_size: int) -> float:
    latent = trainer.resolution // 2 ** (len(trainer.parts.vae.config.block_out_channels) - 1)
    return unet_training_flops(trainer.unet.config, 2 * batch_size, latent, trainer.prompt_ids[0].shape[1]) / 1e12


def _gpu_figures(trainer: Any, batch_size: int, seconds: float) -> dict[str, Any]:
    """The card, the UNet step's FLOPs and its model-FLOPs utilisation at the no-SFSL step time."""
    import torch

    card = torch.cuda.get_device_name()
    tflops = _unet_tflops(trainer, batch_size)
    peak = peak_tflops(card)
    mfu = f"{tflops / seconds / peak:.1%}" if peak else f"n/a (no bf16 peak known for {card})"
    return {"device_name": card, "unet_step_tflops": tflops, "peak_bf16_tflops": peak, "mfu": mfu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(parser, list(SIZES))
    parser.add_argument("--every", type=int, default=4, help="N of the --sfsl-every rows")
    parser.add_argument("--warmup", type=int, help="untimed turns of each variant first; default: the size's")
    add_common_arguments(parser, repeats=2)
    args = parser.parse_args()
    apply_threads(args.threads)
    given = {k: getattr(args, k) for k in ("arch", "steps", "warmup") if getattr(args, k) is not None}
    records = run(**{**SIZES[args.size], **given}, repeats=args.repeats, batch_size=args.batch_size,
                  mixed_precision=args.mixed_precision, every=args.every,
                  device="cpu" if args.device == "cpu" else "auto")
    save_run(records, args.size, args.device)


if __name__ == "__main__":
    main()
