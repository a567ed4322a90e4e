"""finetune's speed levers one by one: ``--channels-last`` and ``--compile`` (and its CUDA-graph mode) against the
eager, contiguous step of the same preset, in the same process, in turns.

Each variant is a trainer of its own (LoRA rank 4, batch b+b, prior preservation, as ``bench.finetune``). Its first
turn is timed on its own: for a compiled variant it holds the compilation, reported as ``compile_s`` = first turn
minus a steady turn, and the break-even number of steps ``compile_s / (eager step - variant step)`` after which the
compilation has paid for itself (``None``: the variant is not faster, it never does). The ratio of each row is the
eager step's time over the variant's (above 1: the lever wins). Fused AdamW is on in every variant.

    python -m bench.levers [--size tiny|full] [--steps 3] [--repeats 3] [--preset dreambooth]
                           [--variants channels-last,compile]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from ._common import add_common_arguments, add_training_arguments, apply_threads, compare, measure_interleaved, save_run
from .finetune import Bench, release, trainer_steps

# Each variant's finetune settings; "eager" is the baseline of every row.
VARIANTS: dict[str, dict[str, str]] = {
    "eager": {"compile": "off", "channels_last": "off"},
    "channels-last": {"compile": "off", "channels_last": "on"},
    "compile": {"compile": "on", "channels_last": "off"},
    "compile-cudagraphs": {"compile": "on", "compile_mode": "reduce-overhead", "channels_last": "off"},
}
# CUDA graphs only exist on a GPU: on a CPU that variant would be "compile" again.
CPU_VARIANTS = ("channels-last", "compile")
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"arch": "tiny", "steps": 3, "variants": CPU_VARIANTS},
    "full": {"arch": "full", "steps": 1, "gradient_checkpointing": True, "variants": CPU_VARIANTS},
}
GPU_SIZES: dict[str, dict[str, Any]] = {"full": {"steps": 10, "gradient_checkpointing": False,
                                                 "variants": tuple(v for v in VARIANTS if v != "eager")}}


def run(arch: str = "tiny", steps: int = 3, repeats: int = 3, batch_size: int = 1, mixed_precision: str | None = None,
        preset: str = "dreambooth", variants: tuple[str, ...] = CPU_VARIANTS, gradient_checkpointing: bool = False,
        device: str = "auto") -> list[dict[str, Any]]:
    """Times each variant's step against the eager step, in turns; returns one record per variant.

    Args (the others as :func:`bench.finetune.run`'s; ``repeats`` come after each variant's first turn):
        preset: finetune's preset (``dreambooth``, ``dreambooth-te``; ``sfsl`` adds its classifier).
        variants: Names of :data:`VARIANTS` besides ``eager``.
    """
    setup = Bench(arch, batch_size=batch_size, mixed_precision=mixed_precision,
                  gradient_checkpointing=gradient_checkpointing, device=device)
    names = ("eager", *[v for v in variants if v != "eager"])
    trainers = {name: setup.trainer(preset, **VARIANTS[name])[0] for name in names}
    where = trainers["eager"].accelerator.device.type
    turns = {name: trainer_steps(trainer, steps) for name, trainer in trainers.items()}
    first = {name: _first_turn(turn, where) for name, turn in turns.items()}
    times = measure_interleaved(turns, repeats=repeats, warmup=0, device=where, relative_memory=True)
    eager = times["eager"].median / steps
    records = []
    for name in names[1:]:
        label = (f"finetune {preset} step, {name} vs eager ({arch}, {where}, "
                 f"{trainers[name].accelerator.mixed_precision}, batch {batch_size}+{batch_size})")
        record = compare(label, times[name], times["eager"], items=steps, unit="steps", target=0.0, paired=True,
                         stage="levers")
        step = times[name].median / steps
        compile_s = max(0.0, first[name] - times[name].median)
        record.update(target=None, target_text="n/a (a lever's effect)", verdict="", variant=name,
                      settings=VARIANTS[name], seconds_per_step={"variant": step, "eager": eager},
                      first_turn_s=first[name], compile_s=compile_s if trainers[name].compiled else None,
                      break_even_steps=compile_s / (eager - step) if trainers[name].compiled and step < eager else None)
        if where == "cuda":
            import torch

            record["device_name"] = torch.cuda.get_device_name()
        print(f"  {name}: {step:.4f} s/step vs eager {eager:.4f}; first turn {first[name]:.1f} s, compile "
              f"{record['compile_s']} s, break-even {record['break_even_steps']} steps", flush=True)
        records.append(record)
    release(*trainers.values())
    return records


def _first_turn(turn: Any, device: str) -> float:
    """Seconds of a variant's first turn, compilation included (waiting for the GPU at the end)."""
    started = time.perf_counter()
    turn()
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(parser, list(SIZES))
    parser.add_argument("--preset", default="dreambooth")
    parser.add_argument("--variants", help=f"comma-separated, of {', '.join(v for v in VARIANTS if v != 'eager')}; "
                                           "default: the size's")
    add_common_arguments(parser, repeats=3)
    args = parser.parse_args()
    apply_threads(args.threads)
    size = {**SIZES[args.size], **(GPU_SIZES.get(args.size, {}) if args.device != "cpu" else {})}
    given = {k: getattr(args, k) for k in ("arch", "steps") if getattr(args, k) is not None}
    if args.variants:
        given["variants"] = tuple(args.variants.split(","))
    records = run(**{**size, **given}, repeats=args.repeats, batch_size=args.batch_size,
                  mixed_precision=args.mixed_precision, preset=args.preset,
                  device="cpu" if args.device == "cpu" else "auto")
    save_run(records, args.size, args.device)


if __name__ == "__main__":
    main()
