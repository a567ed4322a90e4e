"""Peak GPU memory of a finetune step per preset, with and without gradient checkpointing and 8-bit Adam: the
table in docs/performance.md ("GPU memory").

Each variant gets a fresh trainer on SD 1.5's architecture with random weights (``--arch full``, 512 px, LoRA
rank 4, batch 1+1, bf16 autocast) and runs ``--steps`` optimizer steps after the allocator's peak is reset; the
figure is ``torch.cuda.max_memory_allocated()`` over those steps, weights, optimizer state and activations
included. Only a CUDA device gives a figure; 8-bit Adam needs bitsandbytes.

    python -m bench.memory [--arch full|full-v2] [--steps 3] [--presets dreambooth,dreambooth-te,sfsl]
"""

from __future__ import annotations

import argparse
import itertools
import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench._common import save_run  # noqa: E402
from bench.finetune import PRESETS, Bench, release  # noqa: E402


def peak_allocated(bench: Bench, preset: str, use_8bit_adam: bool, steps: int) -> dict[str, Any]:
    """One variant's record: the peak allocated memory over ``steps`` steps of a fresh trainer.

    Args:
        bench: The model, workspace and SFSL classifier (its ``gradient_checkpointing`` is the variant's).
        preset: finetune's preset.
        use_8bit_adam: finetune's --use-8bit-adam.
        steps: Optimizer steps measured.
    """
    import torch

    trainer, _ = bench.trainer(preset, use_8bit_adam=use_8bit_adam)
    try:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for step in range(steps):
            trainer.train_step(step)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    finally:
        release(trainer)
    return {"stage": "memory", "benchmark": f"finetune {preset} step, peak allocated", "preset": preset,
            "arch": bench.arch, "gradient_checkpointing": bench.gradient_checkpointing,
            "use_8bit_adam": use_8bit_adam, "steps": steps, "mixed_precision": bench.mixed_precision,
            "peak_allocated_mb": round(peak / 2**20), "device_name": torch.cuda.get_device_name()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="full", choices=["tiny", "full", "full-v2"])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--presets", default=",".join(PRESETS))
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench.memory measures CUDA's allocator: no CUDA device here")
    records = []
    bench = Bench(args.arch)  # one model for every variant: a trainer reads the switch when it is built
    for checkpointing, use_8bit_adam in itertools.product((False, True), repeat=2):
        bench.gradient_checkpointing = checkpointing
        for preset in args.presets.split(","):
            records.append(peak_allocated(bench, preset, use_8bit_adam, args.steps))
            print(f"{preset:14} checkpointing {checkpointing!s:5} 8-bit Adam {use_8bit_adam!s:5} "
                  f"peak allocated {records[-1]['peak_allocated_mb']} MB", flush=True)
    save_run(records, args.arch, "cuda")


if __name__ == "__main__":
    main()
