"""What a run's folder holds besides weights and checkpoints: ``training.json`` (the manifest), the model card
``README.md``, ``losses.csv`` and ``validation/step-N/``; and the progress bar's text and the loss summary.

The manifest is written last by the loop: ``"complete"`` only once everything else is in place.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from .._lora import LORA_WEIGHTS_NAME, TEXT_ENCODER_TARGETS, UNET_TARGETS
from ..config import FinetuneConfig
from ..images import file_sha256
from ..labels import ClassInfo
from ..workspace import (LOSSES_FILE, TRAINING_FILE, atomic_write_bytes, atomic_write_json, atomic_write_text,
                         environment_versions, utc_now)
from .diffusion import ROW_WEIGHT_FORMULAS
from .plan import ClassPlan

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["save_validation", "loss_summary", "progress_text", "training_manifest", "write_final_outputs"]

# The loss terms of the log; its other columns are SFSL's rows and quarters of t, the gradient's diagnostics and lr.
LOSS_TERMS = ("loss", "inst", "prior", "sfsl")


def save_validation(trainer: Trainer, folder: Path, step: int) -> None:
    """Writes ``validation/step-<step>/<i>.png``."""
    for i, image in enumerate(trainer.validation_images(trainer.config.num_validation_images)):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        atomic_write_bytes(folder / "validation" / f"step-{step:06d}" / f"{i:02d}.png", buffer.getvalue())


def _summarised(log: list[dict[str, Any]]) -> list[str]:
    """The log's numeric columns that get a summary: the loss terms, SFSL by t, and the gradient's diagnostics."""
    columns = list(dict.fromkeys(name for row in log for name in row))
    return [name for name in columns if name not in ("step", "sfsl_rows", "clipped", "lr")]


def loss_summary(log: list[dict[str, Any]]) -> dict[str, Any]:
    """First, last, mean, min and max of each logged term over the steps that have it (``last`` lists the loss
    terms' last values); SFSL's rows, and the fraction of steps whose gradient was clipped."""
    summary: dict[str, Any] = {"steps_logged": len(log), "last": {}}
    for term in _summarised(log):
        values = [row[term] for row in log if row.get(term) is not None]
        if values:
            summary[term] = {"first": values[0], "last": values[-1], "mean": sum(values) / len(values),
                             "min": min(values), "max": max(values)}
            if term in LOSS_TERMS:
                summary["last"][term] = values[-1]
    summary["sfsl_rows"] = sum(row.get("sfsl_rows", 0) for row in log)
    summary["clipped_fraction"] = _clipped_fraction(log)
    return summary


def _clipped_fraction(log: list[dict[str, Any]]) -> float | None:
    """The fraction of logged steps whose gradient norm exceeded --max-grad-norm (``None`` before any)."""
    flags = [row["clipped"] for row in log if row.get("clipped") is not None]
    return sum(flags) / len(flags) if flags else None


def _losses_csv(log: list[dict[str, Any]]) -> str:
    """``losses.csv``: one row per step; the columns of every row, in order (a run resumed from an older
    checkpoint leaves its first rows' newer columns empty)."""
    buffer = io.StringIO()
    columns = list(dict.fromkeys(name for row in log for name in row))
    writer = csv.DictWriter(buffer, fieldnames=columns or ["step", "loss", "inst", "prior", "sfsl", "sfsl_rows", "lr"])
    writer.writeheader()
    writer.writerows(log)
    return buffer.getvalue()


def progress_text(cls: ClassInfo, log: list[dict[str, Any]]) -> str:
    """The progress bar's description: the last step's loss and its terms, its gradient norm before clipping
    (with SFSL's share of the gradient at the UNet's output), and the fraction of steps clipped so far."""
    from rich.markup import escape

    row = log[-1]
    terms = " ".join(f"{name} {row[name]:.4f}" for name in LOSS_TERMS[1:] if row.get(name) is not None)
    text = f"{escape(cls.name)}: loss {row['loss']:.4f} ({terms})"
    if row.get("grad_norm") is not None:
        share = row.get("sfsl_grad_share")
        text += f", |grad| {row['grad_norm']:.3g}" + (f" ({share:.0%} sfsl)" if share is not None else "")
        text += f", clipped {_clipped_fraction(log):.0%}"
    return text


def training_manifest(plan: ClassPlan, config: FinetuneConfig, trainer: Trainer, status: str, step: int,
              log: list[dict[str, Any]], started: str, **extra: Any) -> dict[str, Any]:
    """The run's ``training.json``: what was trained, from what, how, and the loss summary."""
    base, accelerator = trainer.base, trainer.accelerator
    classifier = trainer.sfsl.feature.classifier if trainer.sfsl else None
    return {
        "stage": "finetune",
        "status": status,
        "started": started,
        "updated": utc_now(),
        "class": {"index": plan.cls.index, "name": plan.cls.name, "synset": plan.cls.synset,
                  "spurious_feature": plan.cls.spurious_feature},
        "run": plan.run,
        "preset": config.preset,
        "base_model": base.name,
        "base_model_resolved": str(base.path) if base.local else None,
        "base_model_revision": base.revision,
        "base_model_fingerprint": base.fingerprint,
        "weights": "lora" if config.lora else "full",
        "lora_file": LORA_WEIGHTS_NAME if config.lora else None,
        "lora": {"rank": config.rank, "alpha": config.alpha if config.alpha is not None else config.rank,
                 "unet_targets": list(UNET_TARGETS),
                 "text_encoder_targets": list(TEXT_ENCODER_TARGETS) if trainer.train_text_encoder else []}
                if config.lora else None,
        "train_text_encoder": trainer.train_text_encoder,
        "identifier": config.identifier,
        "noun": plan.noun,
        "instance_prompt": plan.instance_prompt,
        "class_prompt": plan.class_prompt,
        "resolution": trainer.resolution,
        "prediction_type": base.prediction_type,
        "seed": config.seed,
        "steps": step,
        "references": [{"file": str(p), "sha256": file_sha256(p)} for p in plan.references],
        "prior_preservation": {"weight": config.prior_weight, "num_class_images": config.num_class_images,
                               "generated_now": trainer.class_images_generated} if config.prior_preservation else None,
        "sfsl": {"weight": plan.sfsl_weight, "model": classifier.name, "fingerprint": classifier.fingerprint(),
                 "feature": config.sfsl_feature, "npca_components": config.sfsl_npca_components,
                 "max_timestep": config.sfsl_max_timestep, "every": config.sfsl_every,
                 "row_weighting": config.sfsl_row_weighting,
                 "row_weight": ROW_WEIGHT_FORMULAS[config.sfsl_row_weighting][base.prediction_type],
                 "decoder": config.sfsl_decoder or "vae"} if classifier else None,
        "validation": {"prompt": plan.instance_prompt,
                       "seeds": [config.seed + i for i in range(config.num_validation_images)],
                       "num_inference_steps": config.sample_steps, "guidance_scale": config.guidance_scale,
                       "scheduler": type(trainer.parts.sampler).__name__, "resolution": trainer.resolution},
        "distributed": {"processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
                        "device": str(accelerator.device)},
        "settings": {**asdict(config), "run": plan.run, "train_text_encoder": trainer.train_text_encoder},
        "versions": environment_versions(),
        "loss": loss_summary(log),
        **extra,
    }


def _model_card(plan: ClassPlan, config: FinetuneConfig, manifest: dict[str, Any]) -> str:
    """The run's ``README.md``: what it is, how it was trained (from the manifest) and how to load it."""
    base = manifest["base_model"]
    lora = manifest["lora"]
    load = (f'pipe = StableDiffusionPipeline.from_pretrained("{base}")\npipe.load_lora_weights("{plan.folder}")'
            if lora else f'pipe = StableDiffusionPipeline.from_pretrained("{plan.folder}")')
    trained = "UNet and text encoder" if manifest["train_text_encoder"] else "UNet"
    sfsl = manifest["sfsl"]
    prior = manifest["prior_preservation"]
    last = manifest["loss"].get("last", {})
    lines = [
        "---",
        f"base_model: {base}",
        "library_name: diffusers",
        "tags: [stable-diffusion, text-to-image, dreambooth, spurious-features, spurgen"
        + (", lora]" if lora else "]"),
        f"instance_prompt: {json.dumps(plan.instance_prompt)}",
        "---",
        "",
        f"# Spurious feature model: {plan.cls.name} ({plan.cls.index}), \"{plan.noun}\"",
        "",
        f"Fine-tuned by spurgen {__version__} from `{base}` on {len(plan.references)} reference images that "
        f"several classifiers predict as *{plan.cls.name}* although they show only its spurious feature "
        f"(\"{plan.noun}\"). It generates that feature without the class object.",
        "",
        f"- Preset: `{config.preset}`, run `{plan.run}`; trained: {trained}, "
        + (f"LoRA rank {lora['rank']}, alpha {lora['alpha']}" if lora else "all weights"),
        f"- Instance prompt: `{plan.instance_prompt}`",
        f"- Prior preservation: class prompt `{plan.class_prompt}`, lambda {prior['weight']}, "
        f"{prior['num_class_images']} class images" if prior else "- Prior preservation: off",
        f"- Spurious feature similarity loss: kappa {sfsl['weight']}, classifier `{sfsl['model']}`, feature "
        f"`{sfsl['feature']}`, timesteps <= {sfsl['max_timestep']}, row weight {sfsl['row_weight']}, every "
        f"{sfsl['every']} step(s)"
        if sfsl else "- Spurious feature similarity loss: off",
        f"- {manifest['steps']} steps, batch size {config.batch_size} x {manifest['distributed']['processes']} "
        f"process(es) x {config.gradient_accumulation_steps} accumulation, resolution {manifest['resolution']}, "
        f"{manifest['prediction_type']} prediction, mixed precision {manifest['distributed']['mixed_precision']}, "
        f"seed {config.seed}",
        "- Last losses: " + ", ".join(f"{k} {v:.4f}" for k, v in last.items()),
        "",
        "## Use with diffusers",
        "",
        "```python",
        "from diffusers import StableDiffusionPipeline",
        "",
        load,
        f'image = pipe("{plan.instance_prompt}", num_inference_steps=25, guidance_scale=7.5).images[0]',
        "```",
        "",
        "Or run `spurgen generate` in the same workspace. Validation images are in `validation/`, the loss "
        "of every step in `losses.csv`, every setting in `training.json`.",
        "",
    ]
    return "\n".join(lines)


def _install(staging: Path, folder: Path) -> None:
    """Moves each entry of ``staging`` into ``folder``, replacing what was there, then removes ``staging``."""
    for entry in staging.iterdir():
        target = folder / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()


def write_final_outputs(trainer: Trainer, step: int, log: list[dict[str, Any]], started: str) -> None:
    """Writes a finished run's folder, main process only: the weights (staged, then installed), the final
    validation images, ``losses.csv``, the model card, and ``training.json`` saying ``"complete"`` last.

    Args:
        trainer: The class's trainer after its last step.
        step: The steps taken.
        log: The loss row of every step.
        started: When training started (UTC).
    """
    plan, config = trainer.plan, trainer.config
    staging = plan.folder / f".final-{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    trainer.save_model(staging)
    _install(staging, plan.folder)
    save_validation(trainer, plan.folder, step)
    extra: dict[str, Any] = {"lora_sha256": file_sha256(plan.folder / LORA_WEIGHTS_NAME)} if config.lora else {}
    manifest = training_manifest(plan, config, trainer, "complete", step, log, started, finished=utc_now(),
                                 losses_file=LOSSES_FILE, **extra)
    atomic_write_text(plan.folder / LOSSES_FILE, _losses_csv(log))
    atomic_write_text(plan.folder / "README.md", _model_card(plan, config, manifest))
    atomic_write_json(plan.folder / TRAINING_FILE, manifest)
