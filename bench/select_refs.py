"""select-refs throughput against the bare classifier forwards on preloaded tensors.

A Spurious-ImageNet-layout folder of N JPEG images (default 300) and two ResNet-50-size classifiers with
random weights saved as safetensors. Ours: ``select_refs`` end to end in a fresh workspace each
repetition (decoding, caching, selection, copying, manifests; the image hashes remembered by the call
before, unless --cold-hashes). Baseline: the same two models' forward passes over the same images already
decoded and preprocessed in memory, in turns with ours. Target: ratio >= 0.8.

    python -m bench.select_refs [--size tiny|full] [--images 300] [--repeats 3] [--arch resnet50.tv_in1k]
                                [--decode auto|threads|processes] [--cold-hashes]
"""

from __future__ import annotations

import argparse
import atexit
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ._common import (
    add_classify_arguments,
    add_common_arguments,
    apply_threads,
    compare,
    decoding_on,
    measure_interleaved,
    rerun_workspaces,
    save_run,
)

ARCH = "resnet50.tv_in1k"
# run()'s arguments per --size: two ResNet-50 (the paper's classifiers' size) on 24 or 300 images. A tiny
# classifier would make the bare forwards nearly free, and the ratio would only measure fixed costs.
SIZES: dict[str, dict[str, Any]] = {"tiny": {"images": 24, "arch": ARCH}, "full": {"images": 300, "arch": ARCH}}
GPU_SIZES: dict[str, dict[str, Any]] = {"full": {"images": 4096, "batch_size": 64, "num_workers": 12}}


def _make_dataset(root: Path, count: int) -> Path:
    images = root / "images"
    rng = np.random.default_rng(0)
    for i in range(count):
        folder = images / f"spurious_imagenet_{94 + i % 3}_bench_0"
        folder.mkdir(parents=True, exist_ok=True)
        # Smooth random images at Spurious ImageNet's size compress and decode like photos, not like noise.
        small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((256, 256), Image.BICUBIC).save(folder / f"{i:04d}.jpg", quality=90)
    (images / "timestamp.txt").write_text("benchmark\n")
    return images


def _make_classifiers(root: Path, arch: str) -> list[str]:
    import timm
    import torch
    from safetensors.torch import save_file

    flags = []
    for seed in range(2):
        torch.manual_seed(seed)
        model = timm.create_model(arch, pretrained=False)
        path = root / f"rn50-{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        flags.append(f"rn50-{seed}={arch}@{path}")
    return flags


def run(images: int = 300, repeats: int = 3, batch_size: int = 32, num_workers: int = 2, arch: str = ARCH,
        device: str = "cpu", decode: str = "auto", cold_hashes: bool = False) -> list[dict[str, Any]]:
    """Times select-refs end to end against bare forwards of its two classifiers; returns the record.

    Args:
        images: JPEG images in the dataset (3 classes).
        repeats: Timed turns of each side, after one warm-up.
        batch_size: Classifier batch size of both sides.
        num_workers: select-refs' DataLoader workers.
        arch: timm architecture of the two classifiers (random weights).
        device: Where both sides' classifiers run (``cpu``, ``cuda``).
        decode: Where select-refs decodes: ``threads``, ``processes`` or ``auto`` (spurgen's choice).
        cold_hashes: Forget the image hashes between calls.
    """
    import torch

    from spurgen.classifiers import load_classifier, parse_classifier
    from spurgen.config import SelectRefsConfig
    from spurgen.images import load_rgb
    from spurgen.select_refs import select_refs

    root = Path(tempfile.mkdtemp(prefix="spurgen-bench-select-"))
    atexit.register(shutil.rmtree, root, True)
    dataset = _make_dataset(root, images)
    flags = _make_classifiers(root, arch)
    names = [f.split("=", 1)[0] for f in flags]
    config = SelectRefsConfig(classes=["94", "95", "96"], dataset=str(dataset), classifiers=names, k=6,
                              batch_size=batch_size, num_workers=num_workers, device=device)
    workspaces = rerun_workspaces(root, cold_hashes)

    def ours() -> None:
        with decoding_on(decode):
            select_refs(config, workspaces(), flags)

    classifiers = [load_classifier(parse_classifier(f, {}), device=device) for f in flags]
    files = sorted(dataset.rglob("*.jpg"))
    tensors = [torch.stack([c.transform()(load_rgb(f)) for f in files]) for c in classifiers]

    def baseline() -> None:
        with torch.inference_mode():
            for classifier, batch in zip(classifiers, tensors):
                for start in range(0, len(files), batch_size):
                    classifier.logits(batch[start:start + batch_size].to(device))

    times = measure_interleaved({"ours": ours, "baseline": baseline}, repeats=repeats, device=device)
    hashes = "cold" if cold_hashes else "remembered"
    return [compare(f"select-refs (2 x {arch}, {len(files)} JPEGs, batch {batch_size}, {num_workers} workers, "
                    f"decode {decode}, hashes {hashes})", times["ours"],
                    times["baseline"], items=len(files), unit="images", target=0.8, paired=True, stage="select-refs")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="full", choices=list(SIZES))
    parser.add_argument("--images", type=int, help="default: the size's")
    parser.add_argument("--arch", help="timm architecture of the classifiers; default: the size's")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    add_common_arguments(parser)
    add_classify_arguments(parser)
    args = parser.parse_args()
    apply_threads(args.threads)
    size = SIZES[args.size]
    records = run(args.images or size["images"], args.repeats, args.batch_size, args.num_workers,
                  args.arch or size["arch"], args.device, args.decode, args.cold_hashes)
    save_run(records, args.size, args.device)


if __name__ == "__main__":
    main()
