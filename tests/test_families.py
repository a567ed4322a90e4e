"""Model families: detection from model_index.json, --family, and SDXL end to end on a tiny random SDXL folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_finetune import (HUMMINGBIRD, config, loss_rows, manifest, one_thread, png, sfsl_trainer,  # noqa: F401 (fixture)
                           write_refs)

from spurgen._base_model import load_components, resolve_base_model, vae_config
from spurgen.config import GenerateConfig, resolve_config
from spurgen.errors import SpurgenError
from spurgen.families import detect_family, get_family
from spurgen.finetune import finetune
from spurgen.generate import generate


def _with_class_name(source: Path, target: Path, class_name: str | None) -> Path:
    """A copy of a model folder whose model_index.json names another pipeline class (or none)."""
    shutil.copytree(source, target)
    index = json.loads((target / "model_index.json").read_text())
    if class_name is None:
        index.pop("_class_name")
    else:
        index["_class_name"] = class_name
    (target / "model_index.json").write_text(json.dumps(index))
    return target


@pytest.mark.parametrize("class_name, named", [
    ("StableDiffusion3Pipeline", "a Stable Diffusion 3 model (StableDiffusion3Pipeline)"),
    ("WuerstchenPipeline", "a WuerstchenPipeline pipeline"),
    (None, "a folder whose model_index.json names no pipeline class"),
])
def test_a_folder_of_another_family_gets_one_line_naming_it_and_what_is_supported(
        class_name: str | None, named: str, tiny_sd_dir: Path, tmp_path: Path) -> None:
    folder = _with_class_name(tiny_sd_dir, tmp_path / "model", class_name)
    with pytest.raises(SpurgenError) as caught:
        resolve_base_model(str(folder))
    message = str(caught.value)
    assert "\n" not in message and named in message
    assert "Stable Diffusion 1.x/2.x (StableDiffusionPipeline, --family sd)" in message
    assert "Stable Diffusion XL (StableDiffusionXLPipeline, --family sdxl)" in message
    assert "FLUX.1 (FluxPipeline, --family flux)" in message


def test_family_is_detected_and_family_overrides_it(tiny_sd_dir: Path, tmp_path: Path) -> None:
    assert resolve_base_model(str(tiny_sd_dir)).family.name == "sd"
    # An SD folder read as SDXL lacks SDXL's second text encoder: named, on one line.
    with pytest.raises(SpurgenError, match=r"has no tokenizer_2, text_encoder_2; give a Stable Diffusion XL"):
        resolve_base_model(str(tiny_sd_dir), "sdxl")
    renamed = _with_class_name(tiny_sd_dir, tmp_path / "renamed", "MyStableDiffusionPipeline")
    assert resolve_base_model(str(renamed), "sd").family.name == "sd"
    with pytest.raises(SpurgenError, match=r"unknown --family 'sd3'; use one of sd, sdxl, flux"):
        detect_family({}, "x", "sd3")
    assert get_family("sdxl").pipeline_class().__name__ == "StableDiffusionXLPipeline"


# --- SDXL, end to end on a tiny random SDXL folder ------------------------------------------------------------------


def _sdxl_images(pipe: Any, prompt: str, seeds: list[int], steps: int, guidance: float) -> list[np.ndarray]:
    pipe.set_progress_bar_config(disable=True)
    return [np.asarray(pipe(prompt, height=64, width=64, num_inference_steps=steps, guidance_scale=guidance,
                            generator=torch.Generator().manual_seed(seed)).images[0], dtype=np.int16)
            for seed in seeds]


def test_sdxl_sfsl_lora_trains_every_term_and_plain_diffusers_loads_it(tiny_sdxl_dir: Path, rigged,
                                                                        tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline
    from safetensors.torch import load_file

    workspace = write_refs(tmp_path)
    # prior preservation on: class images come from the SDXL pipeline; alpha != rank checks the metadata
    cfg = config(tiny_sdxl_dir, preset="sfsl", rank=4, alpha=8, steps=3, num_validation_images=2)
    [result] = finetune(cfg, workspace, [rigged.flags["res-a"]])
    folder = workspace.model_dir(HUMMINGBIRD, "sfsl")
    info = manifest(folder)
    assert result.status == "trained" and info["family"] == "sdxl" and info["status"] == "complete"
    assert info["lora"]["unet_targets"] == ["to_k", "to_q", "to_v", "to_out.0"]
    for row in loss_rows(folder):
        assert all(np.isfinite(float(row[term])) for term in ("loss", "inst", "prior", "sfsl"))
        assert int(row["sfsl_rows"]) == 1
    keys = load_file(str(folder / "pytorch_lora_weights.safetensors"))
    assert {key.split(".")[0] for key in keys} == {"unet", "text_encoder", "text_encoder_2"}
    assert "StableDiffusionXLPipeline.from_pretrained" in (folder / "README.md").read_text()

    validation = info["validation"]
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    args = (validation["prompt"], validation["seeds"], validation["num_inference_steps"], validation["guidance_scale"])
    base_images = _sdxl_images(pipe, *args)
    pipe.load_lora_weights(folder)
    reloaded = _sdxl_images(pipe, *args)
    trained = [png(folder / "validation" / "step-000003" / f"{i:02d}.png") for i in range(2)]
    for ours, theirs, base in zip(trained, reloaded, base_images):
        assert np.abs(ours - theirs).max() <= 1
        assert np.abs(ours - base).mean() > 1  # training changed the model

    # generate: the run's LoRA on its base, the same images as the plain pipeline with the same seeds
    generated = generate(resolve_config(GenerateConfig, {}, "generate", {
        "classes": ["hummingbird"], "runs": ["sfsl"], "num_images": 2, "steps": 2, "seed": 5, "device": "cpu",
        "scheduler": "model"}),
        workspace)
    assert [(r.run, r.kind, r.made) for r in generated] == [("sfsl", "lora", 2)]
    out = workspace.generated_dir(HUMMINGBIRD, "sfsl")
    # guidance unset: StableDiffusionXLPipeline's own default, 5.0
    assert json.loads((out / "generation.json").read_text())["settings"]["guidance"] == 5.0
    for i, theirs in enumerate(_sdxl_images(pipe, validation["prompt"], [5, 6], 2, 5.0)):
        assert np.abs(png(out / f"{i:05d}.png") - theirs).max() <= 1
    record = json.loads((out / "generation.json").read_text())["model"]
    assert any(name.startswith("text_encoder_2/") for name in record["files"])


def test_sdxl_sfsl_gradients_reach_the_lora_of_the_unet_and_both_text_encoders(tiny_sdxl_dir: Path, rigged,
                                                                                tmp_path: Path) -> None:
    trainer = sfsl_trainer(tiny_sdxl_dir, write_refs(tmp_path), rigged)
    try:
        losses = trainer.losses(step=0, micro=0)
        assert losses.sfsl_rows == 2 and torch.isfinite(losses.sfsl)
        losses.sfsl.backward()
        for model in (trainer.unet, *trainer.text_encoders):
            grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name]
            assert grads and all(g is not None for g in grads)  # none unused: 2-process training refuses those
            assert sum(float(g.abs().sum()) for g in grads) > 0
        # SDXL conditions on the first encoder's penultimate hidden states: its last layer has no adapter
        last = f"layers.{trainer.text_encoder.config.num_hidden_layers - 1}."
        assert not any(last in name for name, _ in trainer.text_encoder.named_parameters() if "lora_" in name)
        assert any(last in name for name, _ in trainer.text_encoders[1].named_parameters() if "lora_" in name)
        assert all(p.grad is None for p in trainer.parts.vae.parameters())
    finally:
        trainer.close()


# FLUX.1's native side is 1,024 px; its tiny folder trains at 64 like the others.
@pytest.mark.parametrize("model, extra", [("tiny_sdxl_dir", {}), ("tiny_flux_dir", {"resolution": 64})])
def test_sdxl_and_flux_three_steps_plus_resume_equal_six_steps(model: str, extra: dict[str, Any],
                                                               request: pytest.FixtureRequest, rigged,
                                                               tmp_path: Path) -> None:
    from safetensors.torch import load_file

    folder = request.getfixturevalue(model)
    flags = [rigged.flags["res-a"]]
    straight, split = write_refs(tmp_path / "a"), write_refs(tmp_path / "b")
    common = {"preset": "sfsl", "checkpointing_steps": 3, "sfsl_max_timestep": 600, "learning_rate": 1e-3,
              "prior_preservation": False, **extra}
    finetune(config(folder, steps=6, **common), straight, flags)
    finetune(config(folder, steps=3, **common), split, flags)
    [result] = finetune(config(folder, steps=6, resume=True, **common), split, flags)
    assert (result.status, result.steps) == ("resumed", 6)
    a, b = straight.model_dir(HUMMINGBIRD, "sfsl"), split.model_dir(HUMMINGBIRD, "sfsl")
    assert loss_rows(a) == loss_rows(b)
    weights_a = load_file(str(a / "pytorch_lora_weights.safetensors"))
    weights_b = load_file(str(b / "pytorch_lora_weights.safetensors"))
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_sdxl_full_fine_tuning_saves_a_pipeline_plain_diffusers_loads(tiny_sdxl_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    workspace = write_refs(tmp_path)
    finetune(config(tiny_sdxl_dir, preset="dreambooth-te", lora=False, num_validation_images=1, learning_rate=1e-3,
                    prior_preservation=False), workspace)
    folder = workspace.model_dir(HUMMINGBIRD, "dreambooth-te")
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    [image] = _sdxl_images(pipe, "a photo of sks red feeder/flower", [0], 2, 5.0)  # SDXL's default guidance
    assert np.abs(image - png(folder / "validation" / "step-000002" / "00.png")).max() <= 1
    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    assert not torch.equal(pipe.unet.conv_in.weight, base.unet.conv_in.weight)
    for name in ("text_encoder", "text_encoder_2"):
        trained, original = getattr(pipe, name).state_dict(), getattr(base, name).state_dict()
        assert any(not torch.equal(trained[k], original[k]) for k in original)
        # the first encoder's last layer and final norm are outside SDXL's graph: frozen, not drifting on decay
        unused = [k for k in original if name == "text_encoder" and ("layers.1." in k or "final_layer_norm" in k)]
        assert all(torch.equal(trained[k], original[k]) for k in unused) and (unused or name == "text_encoder_2")


def test_sdxl_vae_stays_float32_under_fp16_unless_vae_says_it_is_safe(tiny_sdxl_dir: Path, tmp_path: Path) -> None:
    from diffusers import AutoencoderKL

    sdxl, sd = get_family("sdxl"), get_family("sd")
    assert sdxl.vae_dtype({"force_upcast": True}, torch.float16) == torch.float32  # SDXL's own VAE
    assert sdxl.vae_dtype({"force_upcast": False}, torch.float16) == torch.float16  # sdxl-vae-fp16-fix
    assert sdxl.vae_dtype({"force_upcast": True}, torch.bfloat16) == torch.bfloat16
    assert sd.vae_dtype({"force_upcast": True}, torch.float16) == torch.float16  # SD's runs in fp16 as before
    # --vae: another AutoencoderKL replaces the base model's, checked before training
    fixed = AutoencoderKL.from_pretrained(tiny_sdxl_dir, subfolder="vae")
    fixed.register_to_config(force_upcast=False)
    fixed.save_pretrained(tmp_path / "fixed-vae")
    base = resolve_base_model(str(tiny_sdxl_dir))
    assert vae_config(base, str(tmp_path / "fixed-vae"))["force_upcast"] is False
    parts = load_components(base, vae=str(tmp_path / "fixed-vae"))
    assert parts.vae.config.force_upcast is False
    with pytest.raises(SpurgenError, match=r"--vae '.*unet' holds UNet2DConditionModel, not an AutoencoderKL"):
        vae_config(base, str(tiny_sdxl_dir / "unet"))
