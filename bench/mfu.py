"""Model-FLOPs utilisation of finetune's UNet training step at batch 1+1 and 8+8.

finetune's ``dreambooth`` step (LoRA rank 4 on the UNet, prior preservation: b reference and b class images) is
timed alone, a few steps per turn after a warm-up turn, at each batch size. Its model FLOPs are one UNet forward +
backward with LoRA, counted by ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (recomputation not
counted; the text encoder's forward of two prompts is left out, a fraction of a percent), over the step's time and
the card's dense bf16 peak. At batch 1+1 the step is bound by kernel launches and host work; 8+8 shows how much of
the card the same code reaches when each kernel has more work. No baseline and no target: the issue asks for the
figure. On a CPU the record has the step time and TFLOPs, and no MFU.

    python -m bench.mfu [--size tiny|full] [--device cuda] [--steps 5] [--repeats 3] [--batch-size 8]
"""

from __future__ import annotations

import argparse
from typing import Any, Sequence

from ._common import add_common_arguments, add_training_arguments, apply_threads, measure_interleaved, save_run
from .finetune import Bench, _steps, release
from .sfsl import _gpu_figures, _unet_tflops

# run()'s arguments per --size: at the full size a CPU takes about a minute per SD 1.5 step at batch 1+1, so only
# that batch, with gradient checkpointing (as bench.finetune's full size).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"arch": "tiny", "steps": 2, "batch_sizes": (1, 8)},
    "full": {"arch": "full", "steps": 1, "batch_sizes": (1,), "gradient_checkpointing": True},
}
# A GPU: several steps per turn, both batch sizes, no gradient checkpointing (SD 1.5 at 8+8 fits in bf16).
GPU_SIZES: dict[str, dict[str, Any]] = {"full": {"steps": 5, "batch_sizes": (1, 8), "gradient_checkpointing": False}}

PRESET = "dreambooth"


def run(arch: str = "tiny", steps: int = 2, repeats: int = 3, batch_sizes: Sequence[int] = (1, 8),
        mixed_precision: str | None = None, gradient_checkpointing: bool = False,
        device: str = "auto") -> list[dict[str, Any]]:
    """Times the dreambooth step at each batch size; returns one record each with its TFLOPs and MFU.

    Args:
        arch: Random Stable Diffusion architecture.
        steps: Steps per timed turn.
        repeats: Timed turns per batch size, after one warm-up turn.
        batch_sizes: Reference images per step (and as many class images), one record each.
        mixed_precision: ``no``, ``fp16`` or ``bf16``; default bf16 on a GPU, no on a CPU.
        gradient_checkpointing: finetune's --gradient-checkpointing.
        device: ``auto`` or ``cpu``.
    """
    return [_batch(arch, steps, repeats, b, mixed_precision, gradient_checkpointing, device) for b in batch_sizes]


def _batch(arch: str, steps: int, repeats: int, batch_size: int, mixed_precision: str | None,
           gradient_checkpointing: bool, device: str) -> dict[str, Any]:
    """One batch size's record; its trainer is freed on return (one full-size model at a time)."""
    setup = Bench(arch, batch_size=batch_size, mixed_precision=mixed_precision,
                  gradient_checkpointing=gradient_checkpointing, device=device)
    trainer, _ = setup.trainer(PRESET)
    where = trainer.accelerator.device.type
    times = measure_interleaved({"step": _steps(trainer.train_step, steps)}, repeats=repeats, device=where,
                                relative_memory=True)["step"]
    seconds = times.median / steps
    figures = (_gpu_figures(trainer, batch_size, seconds) if where == "cuda"
               else {"unet_step_tflops": _unet_tflops(trainer, batch_size), "mfu": "n/a on CPU"})
    label = f"{PRESET} step, batch {batch_size}+{batch_size}"
    print(f"{label} ({arch}, {where}, {trainer.accelerator.mixed_precision}): {seconds:.3f} s/step, "
          f"{figures['unet_step_tflops']:.3f} UNet TFLOPs per step, "
          f"{figures['unet_step_tflops'] / seconds:.2f} TFLOP/s, MFU {figures['mfu']}")
    release(trainer)
    return {"stage": "mfu", "name": f"{label} ({arch}, {where}, {trainer.accelerator.mixed_precision})",
            "label": label, "unit": "s/step", "ours": seconds, "baseline": None, "ratio": None,
            "target_text": "reported", "verdict": f"MFU {figures['mfu']}", "steps": steps, "batch_size": batch_size,
            "ours_seconds": times.seconds, "ours_peak_mb": times.peak_memory_mb,
            "achieved_tflops_per_s": figures["unet_step_tflops"] / seconds,
            "images_per_s": 2 * batch_size / seconds, **figures}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(parser, list(SIZES))
    parser.set_defaults(batch_size=None)  # --batch-size B: that one batch size instead of the size's
    add_common_arguments(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    sizes = {**SIZES[args.size], **(GPU_SIZES.get(args.size, {}) if args.device != "cpu" else {})}
    given = {k: getattr(args, k) for k in ("arch", "steps") if getattr(args, k) is not None}
    if args.batch_size:
        given["batch_sizes"] = (args.batch_size,)
    records = run(**{**sizes, **given, "repeats": args.repeats}, mixed_precision=args.mixed_precision,
                  device="cpu" if args.device == "cpu" else "auto")
    save_run(records, args.size, args.device)


if __name__ == "__main__":
    main()
