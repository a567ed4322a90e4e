"""Tests of finetune's trackers, validation metric, --keep-best and the noise knobs (noise offset, min-SNR,
zero terminal SNR), on the tiny random Stable Diffusion folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import spurgen.finetune.validation as validation_module
from spurgen.classifiers import load_classifiers
from spurgen.errors import SpurgenError
from spurgen.finetune import finetune, prepare_finetune
from spurgen.finetune.noise import min_snr_weights, training_noise
from spurgen.finetune.plan import _RESUMABLE, resume_key
from spurgen.labels import get_label_set
from spurgen.workspace import Workspace

from test_finetune import HUMMINGBIRD, config, manifest, one_thread, png, write_refs  # noqa: F401 (a fixture)


def test_tensorboard_gets_every_column_hyperparameters_the_metric_and_images(tiny_sd_dir: Path, rigged,
                                                                             tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workspace = write_refs(tmp_path)
    cfg = config(tiny_sd_dir, preset="dreambooth", tensorboard=True, num_validation_images=2, validation_steps=1,
                 validation_classifiers=["res-a"], validation_prompt="a {noun} by {identifier}")
    finetune(cfg, workspace, [rigged.flags["res-a"]])
    folder = workspace.model_dir(HUMMINGBIRD, "dreambooth")
    events = EventAccumulator(str(folder / "logs" / "spurgen"), size_guidance={"images": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"loss", "inst", "prior", "lr", "grad_norm", "clipped", "sfsl_rows", "val_consistent_rate",
            "val_spurious_accuracy_res-a"} <= scalars
    assert [e.step for e in events.Scalars("loss")] == [1, 2]
    assert [e.step for e in events.Scalars("val_consistent_rate")] == [1, 2]
    assert [e.step for e in events.Images("validation")] == [1, 2]  # a grid of the step's images
    assert list(folder.glob("logs/spurgen/*/hparams.yml"))  # the settings, as accelerate stores them
    # The metric in training.json, per validation step, is the classifier's on the saved images.
    info = manifest(folder)
    assert info["validation"]["prompt"] == "a red feeder/flower by sks"
    classifier = load_classifiers(["res-a"], [rigged.flags["res-a"]], get_label_set("imagenet"), {}, None, "cpu")
    images = [Image.open(folder / f"validation/step-000002/{i:02d}.png").convert("RGB") for i in range(2)]
    metric = validation_module.score_images(images, classifier, HUMMINGBIRD.index)
    assert [r["step"] for r in info["validation"]["metrics"]] == [1, 2]
    last = info["validation"]["metrics"][-1]
    assert last["consistent_rate"] == metric["val_consistent_rate"]
    assert last["spurious_accuracy"] == {"res-a": metric["val_spurious_accuracy_res-a"]}
    assert info["weights_step"] == 2 and info["keep_best"] is False


def test_the_metric_counts_top1_per_classifier_and_agreement(monkeypatch) -> None:
    class Fixed:  # two images: both classifiers predict the class on the first, only one on the second
        def __init__(self, name: str, top: list[int]) -> None:
            self.name, self.top, self.device = name, top, torch.device("cpu")

        def transform(self) -> Any:
            return lambda image: torch.zeros(3, 4, 4)

        def logits(self, batch: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.one_hot(torch.tensor(self.top), 1000).float()

    metric = validation_module.score_images([Image.new("RGB", (4, 4))] * 2,
                                            [Fixed("a", [94, 94]), Fixed("b", [94, 3])], 94)
    assert metric == {"val_spurious_accuracy_a": 1.0, "val_spurious_accuracy_b": 0.5, "val_consistent_rate": 0.5}


def test_keep_best_ships_the_weights_of_the_best_validation_step(tiny_sd_dir: Path, rigged, tmp_path: Path,
                                                                 monkeypatch) -> None:
    # Rigged metric: steps 1 and 2 tie at the top (the later wins), step 3 is worse; checkpoints of steps 2 and 3.
    rates = iter([1.0, 1.0, 0.5])
    monkeypatch.setattr(validation_module, "score_images",
                        lambda images, classifiers, index: {"val_consistent_rate": next(rates)})
    workspace = write_refs(tmp_path)
    cfg = config(tiny_sd_dir, preset="dreambooth", steps=3, num_validation_images=1, validation_steps=1,
                 checkpointing_steps=1, validation_classifiers=["res-a"], keep_best=True)
    finetune(cfg, workspace, [rigged.flags["res-a"]])
    folder = workspace.model_dir(HUMMINGBIRD, "dreambooth")
    info = manifest(folder)
    assert [r["consistent_rate"] for r in info["validation"]["metrics"]] == [1.0, 1.0, 0.5]
    assert info["validation"]["best"]["step"] == 2 and info["weights_step"] == 2 and info["steps"] == 3
    shipped = load_file(str(folder / "pytorch_lora_weights.safetensors"))
    at = {step: load_file(str(folder / f"checkpoints/checkpoint-{step}/pytorch_lora_weights.safetensors"))
          for step in (2, 3)}
    assert all(torch.equal(shipped[k], at[2][k]) for k in shipped)
    assert not all(torch.equal(shipped[k], at[3][k]) for k in shipped)
    assert (folder / "best" / "best.json").is_file()
    assert "validation/step-000002/00.png" in (folder / "README.md").read_text()


def test_keep_best_without_a_metric_and_missing_trackers_fail_before_writing(tiny_sd_dir: Path, tmp_path: Path,
                                                                            monkeypatch) -> None:
    import importlib.util

    workspace = write_refs(tmp_path)
    with pytest.raises(SpurgenError, match="--keep-best needs classifiers .* --validation-classifiers"):
        finetune(config(tiny_sd_dir, preset="dreambooth", keep_best=True, num_validation_images=1), workspace)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "tensorboard", "mlflow",
                        "comet_ml", "aim") else find_spec(name, *a))
    with pytest.raises(SpurgenError, match="needs wandb, which is not installed; pip install wandb"):
        finetune(config(tiny_sd_dir, preset="dreambooth", report_to=["wandb"]), workspace)
    with pytest.raises(SpurgenError, match="--report-to all found no tracker installed; pip install tensorboard"):
        finetune(config(tiny_sd_dir, preset="dreambooth", report_to=["all"]), workspace)
    assert not workspace.model_dir(HUMMINGBIRD, "dreambooth").exists()
    with pytest.raises(SpurgenError, match="--report-to: unknown tracker 'neptune'"):
        config(tiny_sd_dir, report_to=["neptune"])


# --- The noise knobs ---------------------------------------------------------------------------------------------


def test_noise_offset_adds_one_draw_per_image_and_channel() -> None:
    offset = training_noise(torch.Size([2, 4, 8, 8]), torch.Generator().manual_seed(1), torch.device("cpu"), 0.1)
    generator = torch.Generator().manual_seed(1)
    expected = torch.randn(2, 4, 8, 8, generator=generator)
    expected = expected + 0.1 * torch.randn(2, 4, 1, 1, generator=generator)
    assert torch.equal(offset, expected)
    plain = training_noise(torch.Size([2, 4, 8, 8]), torch.Generator().manual_seed(1), torch.device("cpu"), 0.0)
    assert torch.equal(plain, torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)))


def _trainer(base: Path, workspace: Any, **overrides: Any) -> Any:
    cfg = config(base, preset="dreambooth", batch_size=2, **overrides)
    setup = prepare_finetune(cfg, workspace)
    return setup.trainer(setup.plans[0], cfg, workspace)


def _recorded_step(trainer: Any, monkeypatch) -> tuple[Any, dict[str, torch.Tensor]]:
    """One micro-step's losses, with the noise, clean latents, timesteps and target it used."""
    seen: dict[str, torch.Tensor] = {}
    target = trainer.family.training_target  # the model family forms the target (spurgen.families)

    def recording(scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> Any:
        seen.update(latents=latents, noise=noise, timesteps=timesteps)
        seen["target"] = target(scheduler, latents, noise, timesteps)
        return seen["target"]

    monkeypatch.setattr(trainer.family, "training_target", recording)
    with torch.no_grad():
        return trainer.losses(step=0, micro=0), seen


def test_noise_offset_shifts_each_image_and_channel_by_a_constant(tiny_sd_dir: Path, tmp_path: Path,
                                                                  monkeypatch) -> None:
    noises = []
    for offset in (0.0, 0.5):
        trainer = _trainer(tiny_sd_dir, write_refs(tmp_path / str(offset)), noise_offset=offset)
        try:
            noises.append(_recorded_step(trainer, monkeypatch)[1]["noise"])
        finally:
            trainer.close()
    shift = noises[1] - noises[0]
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)  # constant over the image
    assert shift.abs().max() > 0.01


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_snr_gamma_weights_each_row_by_min_snr(prediction_type: str, tiny_sd_dir: Path, tmp_path: Path,
                                               monkeypatch) -> None:
    from spurgen.testing import build_stable_diffusion

    base = tiny_sd_dir if prediction_type == "epsilon" else build_stable_diffusion(
        tmp_path / "tiny-v", "tiny", prediction_type="v_prediction", seed=0)
    trainer = _trainer(base, write_refs(tmp_path / "ws"), snr_gamma=0.5)
    try:
        losses, seen = _recorded_step(trainer, monkeypatch)
        abar = trainer.parts.noise_scheduler.alphas_cumprod[seen["timesteps"]].double()
        snr = abar / (1 - abar)
        weights = snr.clamp(max=0.5) / (snr if prediction_type == "epsilon" else snr + 1)
        per_row = (losses.prediction.double() - seen["target"].double()).square().mean(dim=(1, 2, 3))
        assert torch.allclose(min_snr_weights(trainer.parts.noise_scheduler, seen["timesteps"], 0.5).double(),
                              weights)
        assert torch.allclose(losses.inst.double(), (weights[:2] * per_row[:2]).mean(), rtol=1e-5)
        assert torch.allclose(losses.prior.double(), (weights[2:] * per_row[2:]).mean(), rtol=1e-5)
        assert not torch.allclose(losses.inst.double(), per_row[:2].mean(), rtol=1e-3)  # the weights matter
    finally:
        trainer.close()


def test_zero_terminal_snr_rescales_the_training_schedule_and_samples_trailing(tmp_path: Path,
                                                                               monkeypatch) -> None:
    from diffusers import DDPMScheduler
    from diffusers.schedulers.scheduling_ddpm import rescale_zero_terminal_snr

    from spurgen.testing import build_stable_diffusion

    base = build_stable_diffusion(tmp_path / "tiny-v", "tiny", prediction_type="v_prediction", seed=0)
    trainer = _trainer(base, write_refs(tmp_path / "ws"), zero_terminal_snr=True)
    try:
        betas = DDPMScheduler.from_pretrained(base, subfolder="scheduler").betas
        abar = torch.cumprod(1 - rescale_zero_terminal_snr(betas), dim=0)
        scheduler = trainer.parts.noise_scheduler
        assert torch.allclose(scheduler.alphas_cumprod, abar) and float(scheduler.alphas_cumprod[-1]) == 0.0
        sampler = trainer.parts.sampler
        assert sampler.config.rescale_betas_zero_snr and sampler.config.timestep_spacing == "trailing"
        losses, seen = _recorded_step(trainer, monkeypatch)
        a = abar[seen["timesteps"]].view(-1, 1, 1, 1)
        velocity = a.sqrt() * seen["noise"] - (1 - a).sqrt() * seen["latents"]  # v on the rescaled schedule
        assert torch.allclose(seen["target"], velocity, atol=1e-5)
        assert torch.allclose(losses.inst, (losses.prediction[:2] - velocity[:2]).square().mean(), rtol=1e-5)
    finally:
        trainer.close()


def test_knobs_are_recorded_and_enter_the_resume_key(tiny_sd_dir: Path, tmp_path: Path) -> None:
    workspace = write_refs(tmp_path)
    keys = set()
    for knobs in ({}, {"noise_offset": 0.1}, {"snr_gamma": 5.0}):
        cfg = config(tiny_sd_dir, preset="dreambooth", **knobs)
        setup = prepare_finetune(cfg, workspace)
        keys.add(resume_key(cfg, setup.plans[0], setup.base, setup.resolution, setup.accelerator))
    assert len(keys) == 3 and not {"noise_offset", "snr_gamma", "zero_terminal_snr"} & _RESUMABLE
    assert {"report_to", "validation_classifiers", "validation_prompt", "keep_best"} <= _RESUMABLE
    with pytest.raises(SpurgenError, match="--zero-terminal-snr needs a v-prediction base model"):
        prepare_finetune(config(tiny_sd_dir, preset="dreambooth", zero_terminal_snr=True), workspace)
    with pytest.raises(SpurgenError, match="--snr-gamma must be positive"):
        config(tiny_sd_dir, snr_gamma=0.0)


# --- Generating a zero-terminal-SNR run --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zero_snr_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workspace with a tiny v-prediction LoRA run 'dreambooth' trained with --zero-terminal-snr and two
    validation images of its final weights; copy it per test."""
    from spurgen.testing import build_stable_diffusion

    root = tmp_path_factory.mktemp("zero-snr")
    base = build_stable_diffusion(root / "tiny-v", "tiny", prediction_type="v_prediction", seed=0)
    workspace = write_refs(root / "ws")
    finetune(config(base, preset="dreambooth", zero_terminal_snr=True, prior_preservation=False,
                    num_validation_images=2), workspace)
    return workspace.root


def _zero_snr_generate(root: Path, **overrides: Any) -> Any:
    """generate's settings for the run, those of its validation images (steps, guidance, seeds) one image a call."""
    from spurgen.config import GenerateConfig, resolve_config

    validation = manifest(Workspace(root).model_dir(HUMMINGBIRD, "dreambooth"))["validation"]
    values = {"classes": ["94"], "num_images": 2, "steps": validation["num_inference_steps"],
              "guidance": validation["guidance_scale"], "seed": validation["seeds"][0], "batch_size": 1,
              "device": "cpu"}
    return resolve_config(GenerateConfig, {}, "generate", {**values, **overrides})


def test_generate_samples_a_zero_terminal_snr_run_as_its_validation_images_and_skips_a_rerun(
        zero_snr_run: Path, tmp_path: Path) -> None:
    import shutil

    from spurgen.config import ZERO_SNR_SCHEDULE
    from spurgen.generate import generate
    from spurgen.run import RESUME, SKIP, _generation_action

    shutil.copytree(zero_snr_run, tmp_path / "ws")
    workspace = Workspace(tmp_path / "ws")
    model = workspace.model_dir(HUMMINGBIRD, "dreambooth")
    assert manifest(model)["noise"]["sampler"] == ZERO_SNR_SCHEDULE
    assert manifest(model)["validation"]["scheduler"] == "DDIMScheduler"
    gen = _zero_snr_generate(workspace.root)
    generate(gen, workspace)
    folder = workspace.generated_dir(HUMMINGBIRD, "dreambooth")
    settings = json.loads((folder / "generation.json").read_text())["settings"]
    assert settings["scheduler"] == "DDIM" and settings["schedule"] == ZERO_SNR_SCHEDULE
    for i in range(2):  # the final weights' validation images, same seed, steps and guidance
        ours, validation = png(folder / f"{i:05d}.png"), png(model / "validation" / "step-000002" / f"{i:02d}.png")
        assert np.abs(ours - validation).max() <= 1
    # A rerun, and spurgen run's skip check, resolve the unset sampler the same way.
    [again] = generate(gen, workspace)
    assert again.made == 0 and again.existing == 2
    assert _generation_action(gen, folder, model) == SKIP
    assert _generation_action(_zero_snr_generate(workspace.root, scheduler="DDIM"), folder, model) == SKIP
    assert _generation_action(_zero_snr_generate(workspace.root, scheduler="Euler"), folder, model) == RESUME


def test_an_explicit_sampler_of_a_zero_terminal_snr_run_gets_its_schedule_or_is_refused(
        zero_snr_run: Path, tmp_path: Path) -> None:
    import shutil

    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    from spurgen.config import ZERO_SNR_SCHEDULE
    from spurgen.generate import build_scheduler, generate

    shutil.copytree(zero_snr_run, tmp_path / "ws")
    workspace = Workspace(tmp_path / "ws")
    model = workspace.model_dir(HUMMINGBIRD, "dreambooth")
    folder = workspace.generated_dir(HUMMINGBIRD, "dreambooth")
    with pytest.raises(SpurgenError, match=r"--scheduler Heun \(HeunDiscreteScheduler\) cannot sample the schedule "
                                           r"this run was trained on .*pick one of DDIM, DDPM, Euler"):
        generate(_zero_snr_generate(workspace.root, scheduler="heun"), workspace)
    assert not folder.exists()  # refused before any model loads
    gen = _zero_snr_generate(workspace.root, scheduler="Euler")
    generate(gen, workspace)
    settings = json.loads((folder / "generation.json").read_text())["settings"]
    assert settings["scheduler"] == "Euler" and settings["schedule"] == ZERO_SNR_SCHEDULE
    # Plain diffusers with the LoRA and Euler over the rescaled betas and trailing timesteps: the same images.
    training = manifest(model)
    pipe = StableDiffusionPipeline.from_pretrained(training["base_model"])
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, rescale_betas_zero_snr=True,
                                                        timestep_spacing="trailing")
    pipe.load_lora_weights(model)
    for i in range(2):
        image = pipe(training["instance_prompt"], height=64, width=64, num_inference_steps=gen.steps,
                     guidance_scale=gen.guidance, generator=torch.Generator().manual_seed(gen.seed + i)).images[0]
        assert np.abs(np.asarray(image, dtype=np.int16) - png(folder / f"{i:05d}.png")).max() <= 1
    # 'model': the model's own scheduler class (the tiny model's DDPM), over the run's schedule.
    base_config = json.loads((Path(training["base_model"]) / "scheduler" / "scheduler_config.json").read_text())
    own = build_scheduler("model", base_config, ZERO_SNR_SCHEDULE)
    assert type(own).__name__ == "DDPMScheduler" and float(own.alphas_cumprod[-1]) == 0.0
    assert own.config.timestep_spacing == "trailing"


def test_a_run_still_training_already_records_its_sampling_schedule(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """generate --checkpoint N samples a run that is still training: its training.json says how from the start."""
    from spurgen.config import ZERO_SNR_SCHEDULE
    from spurgen.finetune.trainer import Trainer
    from spurgen.generate.runs import trained_schedule
    from spurgen.testing import build_stable_diffusion

    base = build_stable_diffusion(tmp_path / "tiny-v", "tiny", prediction_type="v_prediction", seed=0)
    workspace = write_refs(tmp_path / "ws")
    seen: list[dict[str, Any]] = []
    step = Trainer.train_step

    def reading_the_manifest(self: Trainer, *args: Any, **kwargs: Any) -> Any:
        seen.append(manifest(workspace.model_dir(HUMMINGBIRD, "dreambooth")))
        return step(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train_step", reading_the_manifest)
    finetune(config(base, preset="dreambooth", zero_terminal_snr=True, prior_preservation=False, steps=1,
                    num_validation_images=0), workspace)
    [running] = seen
    assert running["status"] == "running" and trained_schedule(running) == ZERO_SNR_SCHEDULE
