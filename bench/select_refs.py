"""select-refs throughput against the bare classifier forwards on preloaded tensors.

A Spurious-ImageNet-layout folder of N JPEG images (default 300) and two ResNet-50-size classifiers with
random weights saved as safetensors. Ours: ``select_refs`` end to end in a fresh workspace each
repetition (decoding, hashing, caching, selection, copying, manifests). Baseline: the same two models'
forward passes over the same images already decoded and preprocessed in memory. Target: ratio >= 0.8.

    python -m bench.select_refs [--images 300] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ._common import compare, measure, save_result

ARCH = "resnet50.tv_in1k"


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


def _make_classifiers(root: Path) -> list[str]:
    import timm
    import torch
    from safetensors.torch import save_file

    flags = []
    for seed in range(2):
        torch.manual_seed(seed)
        model = timm.create_model(ARCH, pretrained=False)
        path = root / f"rn50-{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        flags.append(f"rn50-{seed}={ARCH}@{path}")
    return flags


def run(images: int = 300, repeats: int = 3, batch_size: int = 32, num_workers: int = 2) -> dict[str, Any]:
    import torch

    from spurgen.classifiers import load_classifier, parse_classifier
    from spurgen.config import SelectRefsConfig
    from spurgen.images import load_rgb
    from spurgen.select_refs import select_refs
    from spurgen.workspace import Workspace

    root = Path(tempfile.mkdtemp(prefix="spurgen-bench-select-"))
    dataset = _make_dataset(root, images)
    flags = _make_classifiers(root)
    names = [f.split("=", 1)[0] for f in flags]
    config = SelectRefsConfig(classes=["94", "95", "96"], dataset=str(dataset), classifiers=names, k=6,
                              batch_size=batch_size, num_workers=num_workers)
    runs = iter(range(10_000))

    def ours() -> None:
        select_refs(config, Workspace(root / f"ws-{next(runs)}"), flags)  # fresh workspace: nothing cached

    classifiers = [load_classifier(parse_classifier(f, {})) for f in flags]
    files = sorted(dataset.rglob("*.jpg"))
    tensors = [torch.stack([c.transform()(load_rgb(f)) for f in files]) for c in classifiers]

    def baseline() -> None:
        with torch.inference_mode():
            for classifier, batch in zip(classifiers, tensors):
                for start in range(0, len(files), batch_size):
                    classifier.model(classifier.normalize(batch[start:start + batch_size]))

    baseline_m = measure(baseline, repeats=repeats)
    ours_m = measure(ours, repeats=repeats)
    result = compare("select-refs", ours_m, baseline_m, items=len(files), unit="images", target=0.8)
    save_result("select_refs", result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    args = parser.parse_args()
    run(args.images, args.repeats, args.batch_size, args.num_workers)


if __name__ == "__main__":
    main()
