"""``spurgen world build``: render the world and train every model it ships, from scratch, seeded.

1. render the world (:mod:`.dataset`), a few seconds;
2. train its classifiers, four standard ones and one adversarially robust (:mod:`.classifiers`);
3. train its text-to-image model (:mod:`.text_to_image`);
4. measure the text-to-image model the way the demo uses it: are "a photo of a <object>" samples
   recognised as the object by the world's classifiers, and "a photo of <feature>" samples as the
   feature's class?

Every stage resumes: the world is kept once rendered, trained classifiers are kept, and the
text-to-image training continues from its last checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .._runtime import dtype_argument, library_progress_bars_off, progress_bar
from ..workspace import atomic_write_json, read_json
from .classifiers import ASSETS_DIR, ClassifierTrainConfig, shipped_classifier_specs, train_world_classifiers
from .dataset import MANIFEST_FILE, WorldConfig, build_world
from .labels import world_label_set
from .text_to_image import TextToImageConfig, train_text_to_image

__all__ = ["WorldBuildConfig", "build_world_models", "measure_text_to_image", "SD_DIR", "RECOGNITION_FILE"]

SD_DIR = ASSETS_DIR.parent / "sd"
RECOGNITION_FILE = "recognition.json"


@dataclass
class WorldBuildConfig:
    """Everything `spurgen world build` does, with each stage's settings."""

    world: WorldConfig = field(default_factory=WorldConfig)
    classifiers: ClassifierTrainConfig = field(default_factory=ClassifierTrainConfig)
    text_to_image: TextToImageConfig = field(default_factory=TextToImageConfig)
    samples_per_prompt: int = 24


def measure_text_to_image(sd_dir: Path, samples_per_prompt: int = 24, seed: int = 0, steps: int = 25,
                          guidance: float = 4.0) -> dict[str, Any]:
    """How recognisable the model's samples are to the world's standard classifiers.

    For each class: the fraction of "a photo of a <object>" samples that each classifier predicts as the
    object, and of "a photo of <feature>" samples predicted as the feature's class.
    """
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ..classifiers import load_classifier

    labels = world_label_set()
    classifiers = [load_classifier(spec) for spec in shipped_classifier_specs() if "robust" not in spec.name]
    with library_progress_bars_off():
        pipe = StableDiffusionPipeline.from_pretrained(sd_dir, **dtype_argument(torch.float32))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    result: dict[str, Any] = {"samples_per_prompt": samples_per_prompt, "steps": steps, "guidance": guidance,
                              "object_prompt": {}, "feature_prompt": {}}
    prompts = [(kind, info, f"a photo of a {info.name}" if kind == "object_prompt" else f"a photo of {info.spurious_feature}")
               for kind in ("object_prompt", "feature_prompt") for info in labels.classes.values()]
    with progress_bar("prompts") as progress:
        task = progress.add_task("measuring samples", total=len(prompts))
        for kind, info, prompt in prompts:
            generator = torch.Generator().manual_seed(seed + info.index)
            images = pipe([prompt] * samples_per_prompt, num_inference_steps=steps, guidance_scale=guidance,
                          generator=generator).images
            rates = {}
            for classifier in classifiers:
                batch = torch.stack([classifier.transform()(image) for image in images])
                with torch.inference_mode():
                    rates[classifier.name] = float((classifier.logits(batch).argmax(1) == info.index).float().mean())
            result[kind][info.name] = {"prompt": prompt, "rate": rates, "mean": float(np.mean(list(rates.values())))}
            progress.advance(task)
    for kind in ("object_prompt", "feature_prompt"):
        result[f"{kind}_mean"] = float(np.mean([v["mean"] for v in result[kind].values()]))
    return result


def build_world_models(work: Path, config: WorldBuildConfig | None = None, *,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    """Builds the world in ``work/world`` and trains the shipped models into the package's assets.

    Args:
        work: Scratch folder for the rendered world and resumable checkpoints.
        config: Settings of every stage.
        log: Receives one-line status messages.

    Returns:
        Timings and metrics of every stage (also written to ``assets/build.json``).
    """
    config = config or WorldBuildConfig()
    work = Path(work)
    world = work / "world"
    timings: dict[str, float] = {}
    started = time.perf_counter()
    if not (world / MANIFEST_FILE).is_file():
        log("rendering the world")
        build_world(config.world, world)
    timings["render_seconds"] = time.perf_counter() - started

    started = time.perf_counter()
    classifiers = train_world_classifiers(world, ASSETS_DIR, config.classifiers, progress=log)
    timings["classifiers_seconds"] = time.perf_counter() - started

    started = time.perf_counter()
    if (SD_DIR / RECOGNITION_FILE).is_file():
        # Built and measured before (delete the folder to retrain it).
        log(f"text-to-image model already built in {SD_DIR}, kept")
        text_to_image = read_json(SD_DIR / "training_metrics.json")
        recognition = read_json(SD_DIR / RECOGNITION_FILE)
    else:
        log("training the text-to-image model")
        text_to_image = train_text_to_image(world, SD_DIR, config.text_to_image, work / "text-to-image")
        log("measuring the text-to-image model's samples")
        recognition = measure_text_to_image(SD_DIR, config.samples_per_prompt)
        atomic_write_json(SD_DIR / RECOGNITION_FILE, recognition)
    timings["text_to_image_seconds"] = time.perf_counter() - started
    summary = {"timings": timings, "classifiers": classifiers, "text_to_image": text_to_image, "recognition": recognition}
    atomic_write_json(ASSETS_DIR.parent / "build.json", summary)
    return summary
