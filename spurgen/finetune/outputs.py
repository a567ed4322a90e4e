"""What a run's folder holds besides weights and checkpoints: ``training.json`` (the manifest), the model card
``README.md`` and ``losses.csv`` (``validation/step-N/`` is :mod:`.validation`'s); and the progress bar's text and
the loss summary.

The manifest is written last by the loop: ``"complete"`` only once everything else is in place.
"""

from __future__ import annotations

import csv
import io
import os
import shutil
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from .._base_model import BaseModel, base_model_license
from .._lora import LORA_WEIGHTS_NAME
from ..config import ZERO_SNR_SCHEDULE, FinetuneConfig
from ..images import file_sha256
from ..labels import ClassInfo
from ..workspace import (LOSSES_FILE, TRAINING_FILE, atomic_write_json, atomic_write_text,
                         environment_versions, utc_now)
from .diffusion import ROW_WEIGHT_FORMULAS
from .plan import ClassPlan
from .validation import BEST_FILE, best_record, metric_records, validation_file

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["loss_summary", "progress_text", "noise_record", "training_manifest", "write_final_outputs",
           "write_losses"]

# The loss terms of the log; its other columns are SFSL's rows and quarters of t, the gradient's diagnostics and lr.
LOSS_TERMS = ("loss", "inst", "prior", "sfsl")


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


def write_losses(folder: Path, log: list[dict[str, Any]]) -> None:
    """Writes ``losses.csv`` of the steps so far, whole or not at all: during training too, so that a long run's
    losses can be followed (and survive a killed run).

    Args:
        folder: The run's folder.
        log: The loss row of every step so far.
    """
    atomic_write_text(folder / LOSSES_FILE, _losses_csv(log))


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


def noise_record(config: FinetuneConfig) -> dict[str, Any]:
    """training.json's ``noise``: the noise knobs, and the scheduler settings that a zero-terminal-SNR run must be
    sampled with (generate reads them, for the final weights and for a checkpoint of a run still training).

    Args:
        config: The run's settings.
    """
    return {"offset": config.noise_offset, "snr_gamma": config.snr_gamma, "zero_terminal_snr": config.zero_terminal_snr,
            "sampler": dict(ZERO_SNR_SCHEDULE) if config.zero_terminal_snr else None}


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
        "family": base.family.name,
        "weights": "lora" if config.lora else "full",
        "lora_file": LORA_WEIGHTS_NAME if config.lora else None,
        "lora": {"rank": config.rank, "alpha": config.alpha if config.alpha is not None else config.rank,
                 "unet_targets": list(base.family.lora_targets[base.family.denoiser]),
                 "text_encoder_targets": list(base.family.lora_targets["text_encoder"])
                 if trainer.train_text_encoder else []}
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
        "validation": {"prompt": plan.validation_prompt,
                       "seeds": [config.seed + i for i in range(config.num_validation_images)],
                       "num_inference_steps": config.sample_steps, "guidance_scale": config.guidance_scale,
                       "scheduler": type(trainer.parts.sampler).__name__, "resolution": trainer.resolution,
                       "metrics": metric_records(log), "best": best_record(log)},
        "noise": noise_record(config),
        "keep_best": config.keep_best,
        "weights_step": step,
        "distributed": {"processes": accelerator.num_processes, "mixed_precision": accelerator.mixed_precision,
                        "device": str(accelerator.device)},
        # The run's own settings, the same whichever command trained it: its one class (not the command's
        # --classes), and whether it continued from a checkpoint (not whether --resume was passed).
        "settings": {**asdict(config), "classes": [str(plan.cls.index)], "resume": plan.action == "resume",
                     "run": plan.run, "train_text_encoder": trainer.train_text_encoder},
        "versions": environment_versions(),
        "loss": loss_summary(log),
        **extra,
    }


# What the card says of the licences it carries over; any other id is shown as written.
_LICENSE_NAMES = {
    "creativeml-openrail-m": "[CreativeML OpenRAIL-M](https://huggingface.co/spaces/CompVis/stable-diffusion-license)",
    "openrail++":
        "[CreativeML Open RAIL++-M](https://huggingface.co/stabilityai/stable-diffusion-2/blob/main/LICENSE-MODEL)",
}


def _sfsl_line(sfsl: dict[str, Any]) -> str:
    """The card's SFSL settings, each marked where it is spurgen's default."""
    defaults = {field.name: field.default for field in fields(FinetuneConfig)}

    def mark(name: str, value: Any) -> str:
        return f"{value} (spurgen's default)" if value == defaults[name] else f"{value}"

    return (f"- Spurious feature similarity loss: kappa {mark('sfsl_weight', sfsl['weight'])}, classifier "
            f"`{sfsl['model']}`, feature `{sfsl['feature']}`, timesteps <= "
            f"{mark('sfsl_max_timestep', sfsl['max_timestep'])}, row weight {sfsl['row_weight']} "
            f"({mark('sfsl_row_weighting', sfsl['row_weighting'])}), on every N-th optimizer step with weight "
            f"kappa x N where N = {mark('sfsl_every', sfsl['every'])}, decoder `{sfsl['decoder']}`")


# What SFSL's defaults rest on, in words: the card is read on the hub, where links into spurgen's docs break.
_SFSL_EVIDENCE = (
    "The paper gives no single kappa (its best differs per class) and applies SFSL on every step. spurgen's kappa "
    "(100) and timestep bound (every timestep) were chosen on spurgen's synthetic world (\"world evidence\" in "
    "spurgen's documentation): on four classes the choice never saw, SFSL made images that fool every classifier at "
    "once about twice as often as DreamBooth with the text encoder (48% against 22%) without raising mean spurious "
    "accuracy. SFSL runs on every step, as in the paper, and its rows are weighted so that its gradient has the same "
    "profile over timesteps on epsilon- and v-prediction models. On Stable Diffusion these are a starting point to "
    "sweep, not a tuned value.")


def _model_card(plan: ClassPlan, config: FinetuneConfig, manifest: dict[str, Any], base: BaseModel) -> str:
    """The run's ``README.md``: a hub model card (YAML metadata, then what the model is, how it was trained,
    samples and how to load it), with no local path in it, so that it reads the same once uploaded.

    Args:
        plan: The class's run.
        config: The finetune settings.
        manifest: The run's ``training.json`` (the card is written from it).
        base: The base model (its hub id and licence, when known).
    """
    from huggingface_hub import ModelCard, ModelCardData

    lora, sfsl, prior = manifest["lora"], manifest["sfsl"], manifest["prior_preservation"]
    hub_id, license_id = base.hub_id, base_model_license(base)
    samples = [validation_file(manifest["weights_step"], i) for i in range(len(manifest["validation"]["seeds"]))]
    unet = base.family.denoiser == "unet"
    # The hub's family tags, as diffusers' DreamBooth scripts write them.
    family_tags = ["stable-diffusion", "stable-diffusion-diffusers"] if unet else ["flux", "flux-diffusers"]
    data = ModelCardData(
        base_model=hub_id, license=license_id, library_name="diffusers", pipeline_tag="text-to-image",
        tags=[*family_tags, "text-to-image", "diffusers", "dreambooth", "spurious-features", "spurgen"]
        + (["lora"] if lora else []),
        instance_prompt=plan.instance_prompt,
        widget=[{"text": plan.instance_prompt, "output": {"url": sample}} for sample in samples] or None)
    title = "Stable Diffusion" if unet else base.family.title
    base_text = f"`{hub_id}`" if hub_id else f"a local {title} folder (fingerprint `{base.fingerprint}`)"
    base_ref = hub_id or "path/to/the/base/model"
    pipeline = base.family.pipeline_class_name
    load = (f'pipe = {pipeline}.from_pretrained("{base_ref}")\n'
            'pipe.load_lora_weights("path/to/this/folder")  # or this repository\'s hub id'
            if lora else f'pipe = {pipeline}.from_pretrained("path/to/this/folder")  # or its hub id')
    denoiser = "UNet" if unet else base.family.denoiser
    trained = f"{denoiser} and text encoder" if manifest["train_text_encoder"] else denoiser
    licence = (f"The base model's licence, {_LICENSE_NAMES.get(license_id, f'`{license_id}`')}, carries over to "
               "these weights, and its use restrictions bind the images they generate."
               if license_id else "The base model's licence is unknown to spurgen: check it before sharing these "
               "weights or their images, since it carries over to both.")
    seeds = manifest["validation"]["seeds"]
    sample_lines = ([f"Validation images of these weights (step {manifest['weights_step']}): prompt "
                     f"`{manifest['validation']['prompt']}`, "
                     f"{manifest['validation']['num_inference_steps']} steps, guidance "
                     f"{manifest['validation']['guidance_scale']}, seeds {seeds[0]}-{seeds[-1]}.", "",
                     " ".join(f"![seed {seed}]({sample})" for seed, sample in zip(seeds, samples))]
                    if samples else ["No validation images were saved (`--num-validation-images 0`)."])
    body = [
        f"# Spurious feature model: {plan.cls.name} ({plan.cls.index}), \"{plan.noun}\"",
        "",
        f"Fine-tuned by spurgen {__version__} from {base_text} on {len(plan.references)} reference images that "
        f"several classifiers predict as *{plan.cls.name}* although they show only its spurious feature "
        f"(\"{plan.noun}\"). It generates that feature without the class object. Method: MaungMaung et al., "
        "*Fine-Tuning Text-To-Image Diffusion Models for Class-Wise Spurious Feature Generation* (ICIP 2024, "
        "[arXiv 2402.08200](https://arxiv.org/abs/2402.08200)); references from Spurious ImageNet (Neuhaus et al., "
        "ICCV 2023).",
        "",
        licence,
        "",
        "## Samples",
        "",
        *sample_lines,
        "",
        "## Training",
        "",
        f"- Instance prompt: `{plan.instance_prompt}`",
        f"- Preset: `{config.preset}`, run `{plan.run}`; trained: {trained}, "
        + (f"LoRA rank {lora['rank']}, alpha {lora['alpha']}" if lora else "all weights"),
        f"- Prior preservation: class prompt `{plan.class_prompt}`, lambda {prior['weight']}, "
        f"{prior['num_class_images']} class images" if prior else "- Prior preservation: off",
        _sfsl_line(sfsl) if sfsl else "- Spurious feature similarity loss: off",
        f"- {manifest['steps']} steps, batch size {config.batch_size} x {manifest['distributed']['processes']} "
        f"process(es) x {config.gradient_accumulation_steps} accumulation, resolution {manifest['resolution']}, "
        f"{manifest['prediction_type']} prediction, mixed precision {manifest['distributed']['mixed_precision']}, "
        f"seed {config.seed}",
        "- Last losses: " + ", ".join(f"{k} {v:.4f}" for k, v in manifest["loss"].get("last", {}).items()),
        "",
        *([_SFSL_EVIDENCE, ""] if sfsl else []),
        "## Use with diffusers",
        "",
        "```python",
        f"from diffusers import {pipeline}",
        "",
        load,
        f'image = pipe("{plan.instance_prompt}", num_inference_steps=25, '
        f'guidance_scale={base.family.default_guidance}).images[0]',
        "```",
        "",
        "Or run `spurgen generate` in the same workspace. Validation images are in `validation/`, the loss "
        "of every step in `losses.csv`, every setting in `training.json`.",
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)))


def _install(staging: Path, folder: Path) -> None:
    """Moves each entry of ``staging`` into ``folder``, replacing what was there, then removes ``staging``."""
    for entry in staging.iterdir():
        target = folder / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    staging.rmdir()


def write_final_outputs(trainer: Trainer, step: int, log: list[dict[str, Any]], started: str,
                        best: tuple[int, Path | None] | None = None) -> None:
    """Writes a finished run's folder, main process only (after the last step's validation images): the weights
    (staged, then installed), ``losses.csv``, the model card, and ``training.json`` saying ``"complete"`` last.

    Args:
        trainer: The class's trainer after its last step.
        step: The steps taken.
        log: The loss row of every step.
        started: When training started (UTC).
        best: ``--keep-best``'s choice (:meth:`.validation.Validation.best_weights`): the step whose weights
            are shipped and the folder that holds them, ``None`` for the trainer's (the last step's).
    """
    plan, config = trainer.plan, trainer.config
    weights_step, weights_from = best or (step, None)
    staging = plan.folder / f".final-{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    if weights_from is None:
        staging.mkdir()
        trainer.save_model(staging)
    else:
        shutil.copytree(weights_from, staging, ignore=shutil.ignore_patterns(BEST_FILE))
    _install(staging, plan.folder)
    extra: dict[str, Any] = {"lora_sha256": file_sha256(plan.folder / LORA_WEIGHTS_NAME)} if config.lora else {}
    manifest = training_manifest(plan, config, trainer, "complete", step, log, started, finished=utc_now(),
                                 losses_file=LOSSES_FILE, weights_step=weights_step, **extra)
    write_losses(plan.folder, log)
    atomic_write_text(plan.folder / "README.md", _model_card(plan, config, manifest, trainer.base))
    atomic_write_json(plan.folder / TRAINING_FILE, manifest)
