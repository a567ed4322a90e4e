"""``spurgen world build``: render the world and train every model it ships, from scratch, seeded.

1. render the world (:mod:`.dataset`), a few seconds;
2. train its classifiers, four standard ones and one adversarially robust (:mod:`.classifiers`);
3. train its text-to-image model (:mod:`.text_to_image`);
4. measure the text-to-image model the way the demo uses it: are "a photo of a <object>" samples
   recognised as the object by the world's classifiers, and "a photo of <feature>" samples as the
   feature's class?

Every model goes to the output folder (``--out``, by default the user cache of :func:`.models.default_out_dir`),
never into the installed package, whose shipped models are read only. Every stage resumes: the world is kept once
rendered, a model already trained with the same settings (in the output folder or shipped) is kept, and the
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
from .classifiers import ClassifierTrainConfig, train_world_classifiers
from .dataset import MANIFEST_FILE, WorldConfig, build_world
from .labels import world_label_set
from .models import (ASSETS_DIR, CLASSIFIERS_FOLDER, SD_FOLDER, SD_MODEL_FILE, default_out_dir, find_built,
                     world_classifier_specs)
from .text_to_image import TextToImageConfig, train_text_to_image

__all__ = ["WorldBuildConfig", "build_world_models", "measure_text_to_image", "RECOGNITION_FILE"]

RECOGNITION_FILE = "recognition.json"
BUILD_FILE = "build.json"


@dataclass
class WorldBuildConfig:
    """Everything `spurgen world build` does, with each stage's settings."""

    world: WorldConfig = field(default_factory=WorldConfig)
    classifiers: ClassifierTrainConfig = field(default_factory=ClassifierTrainConfig)
    text_to_image: TextToImageConfig = field(default_factory=TextToImageConfig)
    samples_per_prompt: int = 24


def measure_text_to_image(sd_dir: Path, samples_per_prompt: int = 24, seed: int = 0, steps: int = 25,
                          guidance: float = 4.0, out: Path | None = None) -> dict[str, Any]:
    """How recognisable the model's samples are to the world's standard classifiers.

    For each class: the fraction of "a photo of a <object>" samples that each classifier predicts as the
    object, and of "a photo of <feature>" samples predicted as the feature's class. The classifiers are
    those built in ``out`` (default: the user cache), else the shipped ones.
    """
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from ..classifiers import load_classifier

    labels = world_label_set()
    classifiers = [load_classifier(spec) for spec in world_classifier_specs(out) if "robust" not in spec.name]
    with library_progress_bars_off():
        pipe = StableDiffusionPipeline.from_pretrained(sd_dir, **dtype_argument(torch.float32))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    result: dict[str, Any] = {"samples_per_prompt": samples_per_prompt, "steps": steps, "guidance": guidance,
                              "object_prompt": {}, "feature_prompt": {}}
    prompts = [
        (kind, info, f"a photo of a {info.name}" if kind == "object_prompt" else f"a photo of {info.spurious_feature}")
        for kind in ("object_prompt", "feature_prompt")
        for info in labels.classes.values()
    ]
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


def build_world_models(work: Path, config: WorldBuildConfig | None = None, *, out: Path | None = None,
                       log: Callable[[str], None] = print) -> dict[str, Any]:
    """Builds the world in ``work/world`` and trains the models that neither ``out`` nor the installation has.

    Args:
        work: Scratch folder for the rendered world and resumable checkpoints.
        config: Settings of every stage.
        out: Where the models go (``classifiers/``, ``sd/``, ``build.json``); ``None`` is the user cache.
        log: Receives one-line status messages.

    Returns:
        Timings and metrics of every stage (also written to ``out/build.json``).
    """
    config = config or WorldBuildConfig()
    out = Path(out) if out is not None else default_out_dir()
    work = Path(work)
    world = work / "world"
    timings: dict[str, float] = {}
    started = time.perf_counter()
    if not (world / MANIFEST_FILE).is_file():
        log("rendering the world")
        build_world(config.world, world)
    timings["render_seconds"] = time.perf_counter() - started

    started = time.perf_counter()
    classifiers = train_world_classifiers(world, out / CLASSIFIERS_FOLDER, config.classifiers, progress=log,
                                          kept_from=[ASSETS_DIR])
    timings["classifiers_seconds"] = time.perf_counter() - started

    started = time.perf_counter()
    sd_dir = out / SD_FOLDER
    # A model trained in `out` but not yet measured is finished below rather than hidden by the shipped one,
    # which the demo would not use (it takes `out`'s first).
    unmeasured = (sd_dir / SD_MODEL_FILE).is_file() and not (sd_dir / RECOGNITION_FILE).is_file()
    built = None if unmeasured else find_built(SD_FOLDER, RECOGNITION_FILE, out)
    if built is not None:
        # Built and measured before, here or shipped (delete the built folder to retrain it).
        log(f"text-to-image model already built in {built}, kept")
        text_to_image = read_json(built / "training_metrics.json")
        recognition = read_json(built / RECOGNITION_FILE)
    else:
        log("training the text-to-image model")
        text_to_image = train_text_to_image(world, sd_dir, config.text_to_image, work / "text-to-image")
        log("measuring the text-to-image model's samples")
        recognition = measure_text_to_image(sd_dir, config.samples_per_prompt, out=out)
        atomic_write_json(sd_dir / RECOGNITION_FILE, recognition)
    timings["text_to_image_seconds"] = time.perf_counter() - started
    summary = {"timings": timings, "classifiers": classifiers, "text_to_image": text_to_image,
               "recognition": recognition}
    atomic_write_json(out / BUILD_FILE, summary)
    return summary
