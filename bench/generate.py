"""Benchmark: images/s of ``spurgen generate`` against a bare diffusers loop with the same model and settings.

Both sides load the pipeline from disk and sample the same number of images with the same steps, guidance,
scheduler and batch size; ours also hashes the weights, writes PNGs and generation.json. Target: ours at
least 0.95x the baseline.

    python -m bench.generate                      # tiny random SD at 64 px on the CPU
    python -m bench.generate --arch full --device cuda --images 32 --steps 25 --batch-size 8
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench._common import add_common_arguments, apply_threads, compare, measure_interleaved, save_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="tiny", help="random Stable Diffusion architecture: tiny, full, full-v2")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--scheduler", default="DPM-Solver++")
    add_common_arguments(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as folder:
        run(args, Path(folder))


def run(args: argparse.Namespace, root: Path) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    from spurgen._sd_builders import build_stable_diffusion
    from spurgen.config import GenerateConfig, resolve_config
    from spurgen.generate import build_scheduler, generate, torch_dtype
    from spurgen.workspace import Workspace

    model = build_stable_diffusion(root / "model", args.arch)
    prompt = "a photo of red flowers"
    config = resolve_config(GenerateConfig, {}, "generate", {
        "classes": ["hummingbird"], "base": True, "model": str(model), "prompt": prompt, "num_images": args.images,
        "steps": args.steps, "batch_size": args.batch_size, "scheduler": args.scheduler, "device": args.device})
    runs = itertools.count()

    def ours() -> None:
        # A fresh workspace each time, so that every image is made (a re-run would only skip them).
        generate(config, Workspace(root / f"ws-{next(runs)}"))

    device = torch.device(args.device)
    dtype = torch_dtype("auto", device)

    def baseline() -> None:
        pipe = StableDiffusionPipeline.from_pretrained(model, dtype=dtype).to(device)
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = build_scheduler(args.scheduler, pipe.scheduler.config)
        for start in range(0, args.images, args.batch_size):
            count = min(args.batch_size, args.images - start)
            pipe([prompt] * count, num_inference_steps=args.steps, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(start))

    # Each side warms up once (lazy imports, kernel selection); then they take turns.
    times = measure_interleaved({"ours": ours, "baseline": baseline}, repeats=args.repeats, device=args.device)
    mine, bare = times["ours"], times["baseline"]
    result = compare(f"generate ({args.arch}, {args.images} images, {args.steps} steps, batch {args.batch_size}, "
                     f"{args.device})", mine, bare, args.images, "images", target=0.95, paired=True)
    save_result("generate", result)


if __name__ == "__main__":
    main()
