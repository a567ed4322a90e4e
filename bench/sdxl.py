"""SDXL's training step, without and with SFSL, against a step written the way diffusers'
train_dreambooth_lora_sdxl.py computes it, on the same random SDXL model, batch and precision, in the same process,
in turns.

One ``sfsl`` trainer (LoRA rank 4 on the UNet and both text encoders, prior preservation, batch b+b) takes its
steps with SFSL switched off (the dreambooth-te step) and on (every instance row decoded by the VAE and classified,
finetune's defaults), in turns with the reference step (``bench.finetune.reference_step``: the script's
encode_prompt with both encoders' penultimate hidden states and the pooled embedding, add_time_ids, the 2b images
encoded by its float32 VAE every step, noise, the UNet, MSE). Three rows:

- the dreambooth-te step vs the reference: target at most 0.9x its time, as for SD (``bench.finetune``);
- the SFSL step vs the reference: SFSL's cost, which the script has no counterpart of;
- the SFSL step vs the dreambooth-te step: SFSL's overhead, target at most 1.3x as for SD (``bench.sfsl``).

``--size tiny`` is the tiny random SDXL (seconds on a CPU); ``--size full`` SDXL base's architecture at 1024 px
with random weights (a 14 GB folder, built once): a CPU takes minutes per step, so it runs on a GPU (bench/gpu.sh's
``sdxl`` stage). ``python -m bench.sfsl --size full-sdxl`` measures SFSL's cost-cutting measures on SDXL.

    python -m bench.sdxl [--size tiny|full] [--steps 3] [--repeats 2] [--batch-size 1]
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from ._common import add_common_arguments, add_training_arguments, apply_threads, measure_interleaved, save_run
from .finetune import TIME_TARGET_RATE, Bench, reference_step, _steps, release, step_record, trainer_steps
from .sfsl import TARGET as SFSL_TARGET

# run()'s arguments per --size. No warm-up turn at the full size on a CPU: a step takes minutes there.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"arch": "sdxl-tiny", "steps": 2},
    "full": {"arch": "sdxl-full", "steps": 1, "gradient_checkpointing": True, "warmup": 0},
}
# A GPU takes an SDXL step in about a second: several steps per turn and a warm-up turn; an H200 holds SDXL and
# its reference at batch 1+1 without gradient checkpointing.
GPU_SIZES: dict[str, dict[str, Any]] = {"full": {"steps": 3, "warmup": 1, "gradient_checkpointing": False}}


def run(arch: str = "sdxl-tiny", steps: int = 2, repeats: int = 2, batch_size: int = 1,
        mixed_precision: str | None = None, sfsl_arch: str = "resnet50.tv_in1k", gradient_checkpointing: bool = False,
        warmup: int = 1, device: str = "auto") -> list[dict[str, Any]]:
    """Times the SDXL step without and with SFSL against the reference step, in turns; returns the three records.

    Args:
        arch: Random SDXL architecture (``sdxl-tiny``, ``sdxl-full``).
        steps: Steps per timed turn.
        repeats: Timed turns of each side.
        batch_size: Reference images per step (and as many class images).
        mixed_precision: ``no``, ``fp16`` or ``bf16``; default bf16 on a GPU, no on a CPU.
        sfsl_arch: timm architecture of the SFSL classifier.
        gradient_checkpointing: On both sides (and in SFSL's decoder, as finetune does).
        warmup: Untimed turns of each side first.
        device: ``auto`` or ``cpu``.
    """
    return script_rows("sdxl", "SDXL", "train_dreambooth_lora_sdxl.py", Bench(
        arch, sfsl_arch, batch_size, mixed_precision, gradient_checkpointing, device), steps, repeats, warmup)


def script_rows(stage: str, title: str, script: str, setup: Bench, steps: int, repeats: int, warmup: int,
                resolution: int | None = None) -> list[dict[str, Any]]:
    """The three rows of a family's step without and with SFSL against its diffusers script's step, timed in turns
    (``bench.sdxl``'s and ``bench.flux``'s).

    Args:
        stage: The bench stage.
        title: The family as the rows name it.
        script: The diffusers script that :func:`~bench.finetune.reference_step` follows for the family.
        setup: The random model, references and SFSL classifier.
        steps: Steps per timed turn.
        repeats: Timed turns of each side.
        warmup: Untimed turns of each side first.
        resolution: Training image side; ``None``: the model's.
    """
    trainer, config = setup.trainer("sfsl", resolution=resolution)
    where = trainer.accelerator.device.type

    def ours(sfsl: bool) -> Callable[[], None]:
        """The trainer's steps with SFSL switched on or off, set up as finetune sets it up."""
        take = trainer_steps(trainer, steps)
        return lambda: (trainer.set_sfsl(sfsl, decoder_checkpointing=config.gradient_checkpointing,
                                         channels_last=True), take())

    times = measure_interleaved({"reference": _steps(reference_step(trainer, config), steps),
                                 "no SFSL": ours(False), "SFSL": ours(True)},
                                repeats=repeats, warmup=warmup, device=where, relative_memory=True, progress=True)
    b = setup.batch_size
    what = f"({setup.arch}, {trainer.resolution} px, {where}, {trainer.accelerator.mixed_precision}, batch {b}+{b})"
    rows = [(f"{title} dreambooth-te step vs {script} {what}", "no SFSL", "reference", TIME_TARGET_RATE),
            (f"{title} sfsl step vs {script} {what}, SFSL {setup.sfsl_arch}", "SFSL", "reference", None),
            (f"{title} sfsl step vs its dreambooth-te step {what}, SFSL {setup.sfsl_arch}", "SFSL", "no SFSL",
             1 / SFSL_TARGET)]
    records = [step_record(label, times[ours_side], times[baseline], steps, b, target, stage, where)
               for label, ours_side, baseline, target in rows]
    release(trainer)
    return records


def script_cli(description: str, sizes: dict[str, dict[str, Any]], run: Callable[..., list[dict[str, Any]]]) -> None:
    """The command line of ``bench.sdxl`` and ``bench.flux``: the size's ``run`` arguments, those given, and the run
    stored.

    Args:
        description: The module's docstring.
        sizes: The module's ``SIZES``.
        run: The module's ``run``.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(parser, list(sizes))
    parser.add_argument("--warmup", type=int, help="untimed turns of each side first; default: the size's")
    add_common_arguments(parser, repeats=2)
    args = parser.parse_args()
    apply_threads(args.threads)
    given = {k: getattr(args, k) for k in ("arch", "steps", "warmup") if getattr(args, k) is not None}
    records = run(**{**sizes[args.size], **given}, repeats=args.repeats, batch_size=args.batch_size,
                  mixed_precision=args.mixed_precision, device="cpu" if args.device == "cpu" else "auto")
    save_run(records, args.size, args.device)


def main() -> None:
    script_cli(__doc__, SIZES, run)


if __name__ == "__main__":
    main()
