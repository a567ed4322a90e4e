"""Benchmark: images/s of ``spurgen evaluate`` against bare classifier forwards on preloaded tensors.

Ours starts from PNG files with an empty prediction cache each time: it decodes the images (on threads or in
DataLoader workers), classifies them, and writes the CSVs, report.html and evaluation.json; the image hashes
are remembered from the call before (as by a command run again on the same images), unless --cold-hashes. The baseline
only runs the same classifiers, batch by batch, on tensors decoded and transformed beforehand. Target: ours
at least 0.8x the baseline.

    python -m bench.evaluate                               # 48 images, a random-weight ResNet-50, CPU
    python -m bench.evaluate --size tiny                   # a small timm ResNet
    python -m bench.evaluate --arch vit_base_patch16_224 --images 256 --device cuda --batch-size 64
    python -m bench.evaluate --decode processes --cold-hashes   # before threads and remembered hashes
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench._common import (  # noqa: E402
    add_classify_arguments,
    add_common_arguments,
    apply_threads,
    compare,
    decoding_on,
    measure_interleaved,
    rerun_workspaces,
    save_run,
)

# run()'s arguments per --size: a ResNet-50 both times (with a tiny classifier the bare forwards are nearly
# free and the ratio would only measure fixed costs), on more images at the full size.
SIZES: dict[str, dict[str, Any]] = {"tiny": {"arch": "resnet50.tv_in1k", "images": 32},
                                    "full": {"arch": "resnet50.tv_in1k", "images": 128}}
GPU_SIZES: dict[str, dict[str, Any]] = {"full": {"images": 4096, "batch_size": 64, "num_workers": 12}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="full", choices=list(SIZES))
    parser.add_argument("--arch", help="timm architecture of the classifier (random weights); default: the size's")
    parser.add_argument("--classifiers", type=int, default=1, help="how many such classifiers (seeded differently)")
    parser.add_argument("--images", type=int, help="default: the size's")
    parser.add_argument("--image-size", type=int, default=256, help="side of the PNG images in pixels")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    add_common_arguments(parser)
    add_classify_arguments(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    size = SIZES[args.size]
    records = run(args.arch or size["arch"], args.classifiers, args.images or size["images"], args.image_size,
                  args.batch_size, args.num_workers, args.repeats, args.device, args.decode, args.cold_hashes)
    save_run(records, args.size, args.device)


def prepare(root: Path, arch: str, classifiers: int, count: int, size: int) -> tuple[Path, list[str]]:
    """Random PNG images in ``root/images`` and random-weight classifiers; returns the folder and --classifier flags."""
    import numpy as np
    import timm
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(images / f"{i:05d}.png")
    flags = []
    for c in range(classifiers):
        torch.manual_seed(c)
        weights = root / f"classifier-{c}.safetensors"
        save_file({k: v.contiguous() for k, v in timm.create_model(arch, pretrained=False).state_dict().items()},
                  str(weights))
        flags.append(f"bench-{c}={arch}@{weights}")
    return images, flags


def run(arch: str = "resnet50.tv_in1k", classifiers: int = 1, images: int = 48, image_size: int = 256,
        batch_size: int = 32, num_workers: int = 2, repeats: int = 3, device: str = "cpu", decode: str = "auto",
        cold_hashes: bool = False) -> list[dict[str, Any]]:
    """Times evaluate against bare forwards in turns; returns the record.

    Args:
        arch: timm architecture of the classifiers (random weights).
        classifiers: How many such classifiers.
        images: PNG images to classify.
        image_size: Their side in pixels.
        batch_size: Classifier batch size of both sides.
        num_workers: evaluate's DataLoader workers.
        repeats: Timed turns of each side, after one warm-up.
        device: Where the classifiers run.
        decode: Where evaluate decodes: ``threads``, ``processes`` or ``auto`` (spurgen's choice).
        cold_hashes: Forget the image hashes between calls.
    """
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as folder:
        return _run(argparse.Namespace(arch=arch, classifiers=classifiers, images=images, size=image_size,
                                       batch_size=batch_size, num_workers=num_workers, repeats=repeats,
                                       device=device, decode=decode, cold_hashes=cold_hashes), Path(folder))


def _run(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    import torch

    from spurgen.classifiers import load_classifiers
    from spurgen.config import EvaluateConfig, resolve_config
    from spurgen.evaluate import evaluate
    from spurgen.images import load_rgb
    from spurgen.labels import get_label_set

    images, flags = prepare(root, args.arch, args.classifiers, args.images, args.size)
    names = [flag.split("=")[0] for flag in flags]
    config = resolve_config(EvaluateConfig, {}, "evaluate", {
        "classes": ["hummingbird"], "images": [f"bench={images}"], "classifiers": names, "batch_size": args.batch_size,
        "num_workers": args.num_workers, "device": args.device})
    workspaces = rerun_workspaces(root, args.cold_hashes)

    def ours() -> None:
        with decoding_on(args.decode):
            evaluate(config, workspaces(), flags)

    classifiers = load_classifiers(names, flags, get_label_set("imagenet"), {}, None, args.device)
    files = sorted(images.iterdir())
    preloaded = [torch.stack([c.transform()(load_rgb(f)) for f in files]) for c in classifiers]

    def baseline() -> None:
        with torch.inference_mode():
            for classifier, tensors in zip(classifiers, preloaded):
                for start in range(0, len(files), args.batch_size):
                    classifier.logits(tensors[start:start + args.batch_size].to(classifier.device))

    # Each side warms up once (lazy imports, kernel selection); then they take turns.
    times = measure_interleaved({"ours": ours, "baseline": baseline}, repeats=args.repeats, device=args.device)
    mine, bare = times["ours"], times["baseline"]
    result = compare(f"evaluate ({args.classifiers} x {args.arch}, {args.images} images of {args.size} px, batch "
                     f"{args.batch_size}, {args.num_workers} workers, {args.device}, decode {args.decode}, hashes "
                     f"{'cold' if args.cold_hashes else 'remembered'})", mine, bare, args.images,
                     "images", target=0.8, paired=True, stage="evaluate")
    return [result]


if __name__ == "__main__":
    main()
