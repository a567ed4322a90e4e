"""Benchmark: images/s of ``spurgen generate`` against a bare diffusers loop with the same model and settings.

Both sides load the pipeline from disk and sample the same number of images with the same steps, guidance,
scheduler and batch size; ours also writes PNGs and generation.json, in one workspace whose cache remembers the
weights' SHA-256 after the warm-up call (a workspace's first generate hashes the model: about 4 s for SD 1.5 in
fp32 on a GPU host, 13 s on a 2-core machine). Target: ours at least 1.0x the baseline.

    python -m bench.generate                      # tiny random SD at 64 px on the CPU
    python -m bench.generate --size full --device cuda --images 32 --batch-size 8   # SD 1.5's architecture
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench._common import (add_common_arguments, apply_threads, compare, measure_interleaved,  # noqa: E402
                           random_stable_diffusion, save_run)

# run()'s arguments per --size: the full size samples few images (an SD 1.5 image takes minutes on a CPU).
SIZES: dict[str, dict[str, Any]] = {"tiny": {"arch": "tiny", "images": 16, "steps": 25, "batch_size": 4},
                                    "full": {"arch": "full", "images": 2, "steps": 10, "batch_size": 1}}
GPU_SIZES: dict[str, dict[str, Any]] = {"full": {"images": 8, "steps": 25, "batch_size": 8}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=list(SIZES))
    parser.add_argument("--arch", help="random Stable Diffusion architecture: tiny, full, full-v2; default: the size's")
    parser.add_argument("--images", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--scheduler", default="DPM-Solver++")
    add_common_arguments(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    given = {k: getattr(args, k) for k in ("arch", "images", "steps", "batch_size") if getattr(args, k) is not None}
    records = run(**{**SIZES[args.size], **given}, scheduler=args.scheduler, repeats=args.repeats, device=args.device)
    save_run(records, args.size, args.device)


def run(arch: str = "tiny", images: int = 16, steps: int = 25, batch_size: int = 4, scheduler: str = "DPM-Solver++",
        repeats: int = 3, device: str = "cpu") -> list[dict[str, Any]]:
    """Times generate against a bare diffusers loop in turns; returns the record.

    Args:
        arch: Random Stable Diffusion architecture (``spurgen.testing``).
        images: Images per call.
        steps: Denoising steps.
        batch_size: Images per pipeline call.
        scheduler: Sampler of both sides.
        repeats: Timed turns of each side, after one warm-up.
        device: Where both run.
    """
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as folder:
        return _run(argparse.Namespace(arch=arch, images=images, steps=steps, batch_size=batch_size,
                                       scheduler=scheduler, repeats=repeats, device=device), Path(folder))


def _run(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    import torch
    from diffusers import StableDiffusionPipeline

    from spurgen.config import GenerateConfig, resolve_config
    from spurgen.generate import build_scheduler, generate, torch_dtype
    from spurgen.workspace import Workspace

    model = random_stable_diffusion(args.arch, root)
    prompt = "a photo of red flowers"
    config = resolve_config(GenerateConfig, {}, "generate", {
        "classes": ["hummingbird"], "base": True, "model": str(model), "prompt": prompt, "num_images": args.images,
        "steps": args.steps, "batch_size": args.batch_size, "scheduler": args.scheduler, "device": args.device})
    workspace = Workspace(root / "ws")

    def ours() -> None:
        # One workspace, as a user's: its cache remembers the weights' SHA-256 after the warm-up call (the first
        # generate in a workspace hashes the model once). The last call's images go, so every image is made.
        shutil.rmtree(workspace.root / "generated", ignore_errors=True)
        generate(config, workspace)

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
                     f"{args.device})", mine, bare, args.images, "images", target=1.0, paired=True, stage="generate")
    return [result]


if __name__ == "__main__":
    main()
