"""``spurgen demo``: the whole method on the synthetic world, end to end, on a laptop CPU.

In a fresh workspace: render the world's spurious set, select references with the world's
classifiers, fine-tune the world's text-to-image model with the paper's three presets (DreamBooth,
+ text encoder, + SFSL), sample 75 images per run plus the untouched base model, and evaluate —
through exactly the stage functions and settings file that the real commands use, so the workspace
can be inspected and extended with the ordinary commands afterwards.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import (EvaluateConfig, FinetuneConfig, GenerateConfig, SelectRefsConfig, require, resolve_config,
                      setting)
from .models import text_to_image_dir

if TYPE_CHECKING:  # --help imports DemoConfig; it must not load the workspace and progress modules
    from ..workspace import Workspace

__all__ = ["DemoConfig", "run_demo", "demo_settings"]

PRESETS = ("dreambooth", "dreambooth-te", "sfsl")


@dataclass
class DemoConfig:
    """Settings of ``spurgen demo``."""

    classes: list[str] = setting(["triangle", "star"], "World classes to run (circle, square, triangle, cross, star, "
                                                       "ring).", flags=("-c",))
    steps: int = setting(150, "Fine-tuning steps per class and preset.")
    num_images: int = setting(75, "Images generated per class and run (and for the base model).", flags=("-n",))
    num_class_images: int = setting(24, "Prior-preservation class images per class.", cli=False)

    def validate(self) -> None:
        require(self.steps >= 1, f"--steps must be at least 1, got {self.steps}")
        require(self.num_images >= 1, f"-n must be at least 1, got {self.num_images}")


def demo_settings(workspace: Workspace, config: DemoConfig) -> str:
    """The spurgen.toml of a demo workspace: the world's label set, models and data, small settings.

    Raises:
        SpurgenError: the world's text-to-image model is neither built nor shipped.
    """
    dataset = workspace.root / "world" / "spurious" / "images"
    return f"""# Written by `spurgen demo`: the synthetic world's label set, models and spurious set.
labels = "world"
model = "{text_to_image_dir().as_posix()}"

[select-refs]
dataset = "{dataset.as_posix()}"
k = 6
num-workers = 0

[finetune]
sfsl-model = "robust-resnet"
steps = {config.steps}
learning-rate = 1e-3
rank = 8
num-class-images = {config.num_class_images}
sample-steps = 20
guidance-scale = 4.0
validation-steps = 0
num-validation-images = 0
checkpointing-steps = 0

[generate]
num-images = {config.num_images}
steps = 20
guidance = 4.0
batch-size = 25
scheduler = "DDIM"

[evaluate]
dataset = "{dataset.as_posix()}"
num-workers = 0
report-images = 12
"""


def render_spurious_set(workspace: Workspace) -> None:
    from .dataset import WorldConfig, build_world

    # Each split draws from its own seeded stream: rendering only the spurious set gives the same images
    # as the full world that the classifiers were measured on.
    folder = workspace.root / "world"
    if not (folder / "spurious" / "images").is_dir():
        build_world(WorldConfig(train_size=0, val_size=0, features_per_class=0), folder)


def run_demo(config: DemoConfig, workspace: Workspace) -> dict[str, Any]:
    """Runs the four stages on the world and returns the evaluation plus the time each stage took."""
    from .._runtime import console
    from ..evaluate import evaluate, print_evaluation_tables
    from ..finetune import finetune
    from ..generate import generate
    from ..select_refs import print_selection_table, select_refs
    from ..workspace import atomic_write_json, atomic_write_text

    config.validate()
    text_to_image_dir()  # fails before anything is written when the model is neither built nor shipped
    workspace.ensure_writable()
    if not workspace.settings_path.is_file():
        atomic_write_text(workspace.settings_path, demo_settings(workspace, config))
    settings = workspace.settings()
    classes = {"classes": config.classes}
    timings: dict[str, float] = {}

    def stage(name: str) -> float:
        console.rule(f"[bold]{name}")
        return time.perf_counter()

    started = stage("world: spurious set")
    render_spurious_set(workspace)
    timings["render"] = time.perf_counter() - started

    started = stage("select-refs")
    selections = select_refs(resolve_config(SelectRefsConfig, settings, "select-refs", classes), workspace)
    print_selection_table(selections, list(selections[0].spurious_per_classifier))
    timings["select-refs"] = time.perf_counter() - started

    started = stage("finetune: dreambooth, dreambooth-te, sfsl")
    for preset in PRESETS:
        finetune(resolve_config(FinetuneConfig, settings, "finetune", {**classes, "preset": preset}), workspace)
    timings["finetune"] = time.perf_counter() - started

    started = stage("generate: three runs and the base model")
    for base in (False, True):
        generate(resolve_config(GenerateConfig, settings, "generate", {**classes, "base": base}), workspace)
    timings["generate"] = time.perf_counter() - started

    started = stage("evaluate")
    evaluation = evaluate(resolve_config(EvaluateConfig, settings, "evaluate", classes), workspace)
    print_evaluation_tables(evaluation)
    timings["evaluate"] = time.perf_counter() - started
    timings["total"] = sum(timings.values())
    atomic_write_json(workspace.reports_dir / "demo.json", {"settings": vars(config), "timings_seconds": timings})
    console.print(f"demo finished in {timings['total']:.0f} s; report: {workspace.reports_dir / 'report.html'}")
    return {"evaluation": evaluation, "timings": timings}
