"""Prior-preservation class images: generated once by the frozen base model, cached in the workspace.

The cache folder is keyed by the content that determines the images (base model fingerprint, prompt,
resolution, seed, sampler, steps, guidance), so another class with the same noun, another ablation run, or the
same base model written as another path (relative, absolute, through a link) reuses them. ``cache.json``
records the base model's name as first given, as provenance only. Image ``i`` is always generated from seed
``seed + i``: asking for more images later adds to the folder without changing the ones already there, and
processes of a distributed run split the missing ones.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import TYPE_CHECKING

from .._base_model import BaseModel, Components, image_generator
from .._runtime import progress_bar
from ..workspace import Workspace, atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    from accelerate import Accelerator

__all__ = ["ensure_class_images"]

_META = "cache.json"


def _cache_folder(workspace: Workspace, base: BaseModel, prompt: str, resolution: int, seed: int,
                  sampler: str, steps: int, guidance_scale: float) -> tuple[Path, dict[str, object]]:
    """The cache folder of one set of class images, and its ``cache.json``: the key, plus the base model's name.

    The name is left out of the key: ``fx/tinysd`` and ``/abs/fx/tinysd`` are one model with one fingerprint,
    and would otherwise regenerate identical images (minutes of GPU time per class at 200 images on SD 1.5).
    """
    key = {"base_model_fingerprint": base.fingerprint, "prompt": prompt, "resolution": resolution, "seed": seed,
           "sampler": sampler, "steps": steps, "guidance_scale": guidance_scale}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return workspace.cache_dir("class-images", digest), {**key, "base_model": base.name}


def _image_path(folder: Path, index: int) -> Path:
    return folder / f"{index:05d}.png"


def ensure_class_images(workspace: Workspace, base: BaseModel, components: Components, accelerator: "Accelerator",
                        *, prompt: str, count: int, resolution: int, seed: int, steps: int, guidance_scale: float,
                        batch_size: int) -> tuple[list[Path], int]:
    """Returns ``count`` class images for ``prompt``, generating the missing ones.

    Every process generates its share of the missing images; all return the same list once every process
    is done. The parts are used as loaded (frozen ones may be half precision); mixed precision runs as
    autocast.

    Returns:
        The image files, and how many this call generated (over all processes).
    """
    import torch

    folder, meta = _cache_folder(workspace, base, prompt, resolution, seed, type(components.sampler).__name__,
                                steps, guidance_scale)
    wanted = [_image_path(folder, i) for i in range(count)]
    # Every process must split the same list: all look at the folder before any of them adds to it.
    accelerator.wait_for_everyone()
    missing = [i for i, path in enumerate(wanted) if not path.is_file()]
    accelerator.wait_for_everyone()
    if not missing:
        return wanted, 0
    if accelerator.is_main_process and not (folder / _META).is_file():
        atomic_write_json(folder / _META, meta)
    pipeline = base.family.sampling_pipeline(components)
    pipeline.to(accelerator.device)
    with accelerator.split_between_processes(missing) as mine, progress_bar("images") as progress:
        task = progress.add_task(f"class images '{prompt}'", total=len(mine))
        for start in range(0, len(mine), batch_size):
            indices = mine[start:start + batch_size]
            with torch.no_grad(), accelerator.autocast():
                images = pipeline([prompt] * len(indices), height=resolution, width=resolution,
                                  num_inference_steps=steps, guidance_scale=guidance_scale,
                                  generator=[image_generator(seed + i) for i in indices]).images
            for index, image in zip(indices, images):
                buffer = io.BytesIO()
                image.save(buffer, format="PNG")
                atomic_write_bytes(_image_path(folder, index), buffer.getvalue())
            progress.advance(task, len(indices))
    accelerator.wait_for_everyone()
    return wanted, len(missing)
