"""FLUX.1's training step, without and with SFSL, against a step written the way diffusers'
train_dreambooth_lora_flux.py computes it, on the same random FLUX.1 model, batch and precision, in the same
process, in turns.

One ``sfsl`` trainer (LoRA rank 4 on the transformer and CLIP's text encoder, T5 frozen with its embeddings cached,
prior preservation, batch b+b) takes its steps with SFSL switched off (the dreambooth-te step) and on (every
instance row decoded by the VAE and classified, finetune's defaults), in turns with the reference step
(``bench.finetune.reference_step``: the script's encode_prompt, CLIP's pooled output and T5's hidden states from
both encoders every step, as it runs them when CLIP trains; the 2b images encoded by the VAE every step, shifted and
scaled; uniform timesteps and their sigmas; the packed noisy latents with their positions, guidance 3.5, the
transformer, the flow-matching MSE). Three rows, as ``bench.sdxl``'s:

- the dreambooth-te step vs the reference: target at most 0.9x its time, as for SD (``bench.finetune``);
- the SFSL step vs the reference: SFSL's cost, which the script has no counterpart of;
- the SFSL step vs the dreambooth-te step: SFSL's overhead, target at most 1.3x as for SD (``bench.sfsl``).

``--size tiny`` is the tiny random FLUX.1 at 64 px (seconds on a CPU); ``--size full`` FLUX.1-dev's architecture
at 512 px with random weights (a 34 GB bfloat16 folder, built once), on a GPU only (bench/gpu.sh's ``flux``
stage): on a CPU it stops at once. ``python -m bench.sfsl --size full-flux`` measures SFSL's cost-cutting measures
on FLUX.1.

    python -m bench.flux [--size tiny|full] [--steps 2] [--repeats 2] [--batch-size 1] --device cuda
"""

from __future__ import annotations

from typing import Any

from ._common import refuse_full_flux_on_cpu
from .finetune import Bench
from .sdxl import script_cli, script_rows

# run()'s arguments per --size. The tiny FLUX.1's native side is 256 px; 64 px keeps its steps at a fraction of a
# second on a CPU. FLUX.1-dev at 512 px as its script's README trains it with text-encoder training.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"arch": "flux-tiny", "steps": 2, "resolution": 64},
    "full": {"arch": "flux-full", "steps": 1, "gradient_checkpointing": True, "warmup": 0, "resolution": 512},
}
# A GPU takes a FLUX.1 LoRA step at 512 px and batch 1+1 in about a second (~220 TFLOPs of transformer forward
# and backward): several steps per turn and a warm-up turn. Gradient checkpointing stays on (both sides): the two
# models' bf16 weights take ~60 GB of the H200's 139, and the activations of 57 blocks at 3,072 tokens without it,
# with SFSL's decoder on top, are not measured yet; a first run must not be spent on running out of memory.
GPU_SIZES: dict[str, dict[str, Any]] = {"full": {"steps": 3, "warmup": 1}}


def run(arch: str = "flux-tiny", steps: int = 2, repeats: int = 2, batch_size: int = 1,
        mixed_precision: str | None = None, sfsl_arch: str = "resnet50.tv_in1k", gradient_checkpointing: bool = False,
        warmup: int = 1, device: str = "auto", resolution: int | None = None) -> list[dict[str, Any]]:
    """Times the FLUX.1 step without and with SFSL against the reference step, in turns; returns the three records.

    Args:
        arch: Random FLUX.1 architecture (``flux-tiny``, ``flux-full``).
        steps: Steps per timed turn.
        repeats: Timed turns of each side.
        batch_size: Reference images per step (and as many class images).
        mixed_precision: ``no``, ``fp16`` or ``bf16``; default bf16 on a GPU, no on a CPU.
        sfsl_arch: timm architecture of the SFSL classifier.
        gradient_checkpointing: On both sides (and in SFSL's decoder, as finetune does).
        warmup: Untimed turns of each side first.
        device: ``auto`` or ``cpu``.
        resolution: Training image side; ``None``: the model's.

    Raises:
        RuntimeError: FLUX.1 at full size without a GPU.
    """
    refuse_full_flux_on_cpu(arch, device, "--size full")
    return script_rows("flux", "FLUX.1", "train_dreambooth_lora_flux.py", Bench(
        arch, sfsl_arch, batch_size, mixed_precision, gradient_checkpointing, device), steps, repeats, warmup,
        resolution)


def main() -> None:
    script_cli(__doc__, SIZES, run)


if __name__ == "__main__":
    main()
