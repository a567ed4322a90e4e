"""Benchmark: images/s of ``spurgen generate`` and ``spurgen evaluate`` with 2 processes against 1.

Both sides run the command as a user does, start to finish in a fresh workspace (so process start-up, model
loading and writing count): 1 process is ``python -m spurgen``, 2 are ``accelerate launch --num_processes 2``
(``--multi_gpu``: one GPU each where there are GPUs, gloo CPU processes otherwise). Each process gets
``--threads`` CPU threads. The ratio is the speed-up; target: at least 1.2x.

    python -m bench.scaling                          # tiny SD and a ResNet-50 on the CPU, 1 thread per process
    python -m bench.scaling --arch full --device cuda --images 32 --steps 25
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench._common import add_common_arguments, compare, measure_interleaved, random_stable_diffusion, save_run  # noqa: E402
from bench.evaluate import prepare  # noqa: E402


def _command(processes: int, threads: int) -> Callable[[list[str]], None]:
    """Runs ``spurgen ARGS`` in ``processes`` processes; a failure stops the benchmark with its output."""
    launcher = [sys.executable, "-m", "spurgen"] if processes == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "spurgen"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}

    def run(args: list[str]) -> None:
        done = subprocess.run([*launcher, *args], capture_output=True, text=True, env=env, check=False)
        if done.returncode:
            raise SystemExit(f"{' '.join(launcher + args)} failed:\n{done.stderr[-3000:]}")

    return run


def _scaling(name: str, args: list[str], root: Path, items: int, repeats: int, threads: int) -> dict[str, Any]:
    """Times ARGS with 1 and 2 processes, each in a fresh workspace, in turns."""
    workspaces = itertools.count()
    sides = {processes: _command(processes, threads) for processes in (1, 2)}

    def timed(processes: int) -> Callable[[], None]:
        return lambda: sides[processes]([*args, "-w", str(root / f"ws-{next(workspaces)}")])

    times = measure_interleaved({"2 processes": timed(2), "1 process": timed(1)}, repeats=repeats, warmup=0)
    for measurement in times.values():
        measurement.peak_memory_mb = None  # sampled in this process, while the work runs in child processes
    return compare(name, times["2 processes"], times["1 process"], items, "images", target=1.2, paired=True,
                   stage="scaling")


# run()'s arguments per --size.
SIZES: dict[str, dict[str, Any]] = {"tiny": {"arch": "tiny", "classifier_arch": "resnet50.tv_in1k", "images": 8},
                                    "full": {"arch": "full", "classifier_arch": "resnet50.tv_in1k", "images": 2,
                                             "steps": 10}}


def run(arch: str = "tiny", classifier_arch: str = "resnet50.tv_in1k", images: int = 16, steps: int = 25,
        repeats: int = 3, threads: int = 1, device: str = "cpu") -> list[dict[str, Any]]:
    """Times generate and evaluate commands with 2 processes against 1; returns their two records.

    Args:
        arch: Random Stable Diffusion architecture of generate.
        classifier_arch: timm architecture of evaluate's classifier.
        images: Images generated; evaluate classifies 4x as many.
        steps: Denoising steps.
        repeats: Timed turns of each side.
        threads: CPU threads per process.
        device: ``cpu`` or ``cuda``.
    """
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as folder:
        root = Path(folder)
        model = random_stable_diffusion(arch, root)
        generate = ["generate", "--base", "--model", str(model), "--classes", "hummingbird", "--num-images",
                    str(images), "--steps", str(steps), "--batch-size", "4", "--device", device]
        records = [_scaling(f"generate scaling ({arch}, {images} images, {steps} steps, {device}): 2 processes vs 1",
                            generate, root, images, repeats, threads)]
        count = 4 * images
        folder_images, flags = prepare(root, classifier_arch, 1, count, 256)
        evaluate = ["evaluate", "--classes", "hummingbird", "--images", f"bench={folder_images}", "--classifiers",
                    "bench-0", "--num-workers", "1", "--device", device, *(f"--classifier={flag}" for flag in flags)]
        records.append(_scaling(f"evaluate scaling ({classifier_arch}, {count} images, {device}): 2 processes vs 1",
                                evaluate, root, count, repeats, threads))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=list(SIZES))
    parser.add_argument("--arch", help="random Stable Diffusion architecture: tiny, full, full-v2; default: the size's")
    parser.add_argument("--classifier-arch", help="timm architecture for evaluate; default: the size's")
    parser.add_argument("--images", type=int, help="images generated; evaluate classifies 4x as many")
    parser.add_argument("--steps", type=int)
    add_common_arguments(parser, threads=1)
    args = parser.parse_args()
    given = {
        k: getattr(args, k) for k in ("arch", "classifier_arch", "images", "steps") if getattr(args, k) is not None
    }
    records = run(**{**SIZES[args.size], **given}, repeats=args.repeats, threads=args.threads, device=args.device)
    save_run(records, args.size, args.device)


if __name__ == "__main__":
    main()
