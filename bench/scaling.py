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
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench._common import add_common_arguments, compare, measure_interleaved, save_result  # noqa: E402
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


def _scaling(name: str, args: list[str], root: Path, items: int, repeats: int, threads: int) -> dict:
    """Times ARGS with 1 and 2 processes, each in a fresh workspace, in turns."""
    workspaces = itertools.count()
    sides = {processes: _command(processes, threads) for processes in (1, 2)}

    def timed(processes: int) -> Callable[[], None]:
        return lambda: sides[processes]([*args, "-w", str(root / f"ws-{next(workspaces)}")])

    times = measure_interleaved({"2 processes": timed(2), "1 process": timed(1)}, repeats=repeats, warmup=0)
    for measurement in times.values():
        measurement.peak_memory_mb = None  # sampled in this process, while the work runs in child processes
    return compare(name, times["2 processes"], times["1 process"], items, "images", target=1.2, paired=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="tiny", help="random Stable Diffusion architecture: tiny, full, full-v2")
    parser.add_argument("--classifier-arch", default="resnet50.tv_in1k", help="timm architecture for evaluate")
    parser.add_argument("--images", type=int, default=16, help="images generated; evaluate classifies 4x as many")
    parser.add_argument("--steps", type=int, default=25)
    add_common_arguments(parser, threads=1)
    args = parser.parse_args()
    from spurgen._sd_builders import build_stable_diffusion

    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as folder:
        root = Path(folder)
        model = build_stable_diffusion(root / "model", args.arch)
        generate = ["generate", "--base", "--model", str(model), "--classes", "hummingbird", "--num-images",
                    str(args.images), "--steps", str(args.steps), "--batch-size", "4", "--device", args.device]
        result = {"generate": _scaling(f"generate scaling ({args.arch}, {args.images} images, {args.steps} steps, "
                                       f"{args.device}): 2 processes vs 1", generate, root, args.images, args.repeats,
                                       args.threads)}
        count = 4 * args.images
        images, flags = prepare(root, args.classifier_arch, 1, count, 256)
        evaluate = ["evaluate", "--classes", "hummingbird", "--images", f"bench={images}", "--classifiers", "bench-0",
                    "--num-workers", "1", "--device", args.device, *(f"--classifier={flag}" for flag in flags)]
        result["evaluate"] = _scaling(f"evaluate scaling ({args.classifier_arch}, {count} images, {args.device}): "
                                      "2 processes vs 1", evaluate, root, count, args.repeats, args.threads)
    save_result("scaling", result)


if __name__ == "__main__":
    main()
