"""FLUX.1: detection, flow-matching arithmetic, packing, and finetune / generate end to end on a tiny random folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_families import _with_class_name
from test_finetune import (HUMMINGBIRD, config, loss_rows, manifest, one_thread, png, sfsl_trainer,  # noqa: F401 (fixture)
                           write_refs)
from typer.testing import CliRunner

from spurgen._base_model import resolve_base_model
from spurgen.cli import app
from spurgen.config import ExportLoraConfig, GenerateConfig, resolve_config
from spurgen.errors import SpurgenError
from spurgen.export_lora import export_lora
from spurgen.families import get_family
from spurgen.families.flux import (TRAINING_GUIDANCE, flow_sigmas, latent_image_ids, pack_latents,
                                   unpack_latents)
from spurgen.finetune import finetune
from spurgen.generate import generate

PROMPT = "a photo of sks red feeder/flower"


def _images(pipe: Any, prompt: str, seeds: list[int], steps: int, guidance: float) -> list[np.ndarray]:
    pipe.set_progress_bar_config(disable=True)
    return [np.asarray(pipe(prompt, height=64, width=64, num_inference_steps=steps, guidance_scale=guidance,
                            generator=torch.Generator().manual_seed(seed)).images[0], dtype=np.int16)
            for seed in seeds]


def _scheduler(folder: Path) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_pretrained(folder, subfolder="scheduler")


def test_flux_folder_is_detected_and_family_overrides_it(tiny_flux_dir: Path, tiny_sd_dir: Path,
                                                         tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from spurgen.testing.t5_tokenizer import T5_VOCAB_SIZE

    base = resolve_base_model(str(tiny_flux_dir))
    assert (base.family.name, base.prediction_type, base.resolution, base.size_multiple) == ("flux", "flow", 256, 4)
    renamed = _with_class_name(tiny_flux_dir, tmp_path / "renamed", "MyFluxPipeline")
    assert resolve_base_model(str(renamed), "flux").family.name == "flux"
    with pytest.raises(SpurgenError, match=r"has no tokenizer_2, text_encoder_2, transformer; give a FLUX.1"):
        resolve_base_model(str(tiny_sd_dir), "flux")
    tokenizers = [AutoTokenizer.from_pretrained(tiny_flux_dir, subfolder=name) for name in ("tokenizer", "tokenizer_2")]
    clip_ids, t5_ids = get_family("flux").tokenize(tokenizers, ["a photo of sks"])
    assert (clip_ids.shape, t5_ids.shape) == ((1, 77), (1, 512))  # FluxPipeline's padding: 77 and 512 tokens
    words = T5_VOCAB_SIZE - 7  # the offline T5 tokenizer: the prompt's words are whole pieces, then </s>
    assert t5_ids[0, :5].tolist() == [words, words + 1, words + 2, words + 3, 1]


def test_flow_matching_noise_target_estimate_and_row_weight(tiny_flux_dir: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    flux, scheduler = get_family("flux"), FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)  # FLUX.1-dev's
    t = torch.tensor([0, 249, 600, 999])
    sigma = flow_sigmas(scheduler, t)
    torch.testing.assert_close(sigma, (t + 1) / 1000)  # unshifted: sigma_t = (t + 1) / T
    torch.testing.assert_close(flux.denoiser_timesteps(scheduler, t), sigma)
    x0, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    noisy = flux.add_noise(scheduler, x0, noise, t)
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - s) * x0 + s * noise)
    target = flux.training_target(scheduler, x0, noise, t)
    torch.testing.assert_close(target, noise - x0)
    torch.testing.assert_close(flux.predicted_original(scheduler, noisy, target, t), x0)
    # v-profile: weight x gain (sigma) is v-prediction's sqrt(1 - abar) at the same signal-to-noise ratio
    weight = flux.sfsl_row_weight(scheduler, t, "v-profile")
    abar = (1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma ** 2)
    torch.testing.assert_close(weight * sigma, (1 - abar).sqrt())
    assert torch.equal(flux.sfsl_row_weight(scheduler, t, "none"), torch.ones(4))
    # a folder with a static shift: its shifted training table, as diffusers' script reads it
    shifted = _scheduler(tiny_flux_dir)
    torch.testing.assert_close(flow_sigmas(shifted, t), shifted.sigmas[999 - t])


def test_packing_round_trips_and_predict_is_the_pipelines_transformer_call(tiny_flux_dir: Path) -> None:
    from diffusers import FluxPipeline

    latents = torch.randn(2, 4, 8, 6)
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 4, 8, 6))
    assert torch.equal(unpack_latents(packed, 8, 6), latents)
    assert torch.equal(latent_image_ids(8, 6, torch.device("cpu"), torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32))

    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    flux = get_family("flux")
    ids = [ids for ids in flux.tokenize([pipe.tokenizer, pipe.tokenizer_2], [PROMPT, "a photo of red"])]
    with torch.no_grad():
        conditioning = flux.encode_prompts([pipe.text_encoder, pipe.text_encoder_2], ids, 64)
        prompt_embeds, pooled, text_ids = pipe.encode_prompt([PROMPT, "a photo of red"], None)
        torch.testing.assert_close(conditioning["prompt_embeds"], prompt_embeds)
        torch.testing.assert_close(conditioning["pooled_prompt_embeds"], pooled)
        t = torch.tensor([100, 900])
        timestep = flux.denoiser_timesteps(pipe.scheduler, t)
        ours = flux.predict(pipe.transformer, latents, timestep, conditioning)
        theirs = pipe.transformer(hidden_states=packed, timestep=timestep, guidance=torch.full([2], TRAINING_GUIDANCE),
                                  pooled_projections=pooled, encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
                                  img_ids=FluxPipeline._prepare_latent_image_ids(2, 4, 3, "cpu", torch.float32),
                                  return_dict=False)[0]
    assert torch.equal(ours, FluxPipeline._unpack_latents(theirs, 8 * 2, 6 * 2, 2))
    # decode undoes the shift and the scale, with gradients
    z = latents.clone().requires_grad_(True)
    image = flux.decode(pipe.vae, z)
    with torch.no_grad():
        expected = pipe.vae.decode(latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    torch.testing.assert_close(image, expected)
    image.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_flux_lora_from_the_command_line_loads_in_plain_diffusers_and_generate_matches_it(
        tiny_flux_dir: Path, rigged, tmp_path: Path) -> None:
    from diffusers import FluxPipeline
    from safetensors.torch import load_file

    workspace = write_refs(tmp_path)
    # prior preservation on (class images from FluxPipeline), CLIP's LoRA too, SFSL on both steps; alpha != rank;
    # guidance unset: FluxPipeline's 3.5
    done = CliRunner().invoke(app, [
        "finetune", "-w", str(workspace.root), "--model", str(tiny_flux_dir), "--classes", "94", "--steps", "2",
        "--resolution", "64", "--num-class-images", "2", "--sample-steps", "2", "--num-validation-images", "2",
        "--rank", "4", "--alpha", "8", "--learning-rate", "1e-2", "--train-text-encoder",
        "--run-name", "sfsl-te", "--sfsl-model", "res-a", f"--classifier={rigged.flags['res-a']}",
        "--sfsl-max-timestep", "999", "--checkpointing-steps", "0"])
    assert done.exit_code == 0, done.output
    folder = workspace.model_dir(HUMMINGBIRD, "sfsl-te")
    info = manifest(folder)
    assert (info["status"], info["family"], info["prediction_type"]) == ("complete", "flux", "flow")
    assert info["sfsl"]["row_weight"] == "1 / sqrt((1 - sigma_t)^2 + sigma_t^2)"
    for row in loss_rows(folder):
        assert all(np.isfinite(float(row[term])) for term in ("loss", "inst", "prior", "sfsl"))
    keys = load_file(str(folder / "pytorch_lora_weights.safetensors"))
    assert {key.split(".")[0] for key in keys} == {"transformer", "text_encoder"}  # T5 stays frozen
    card = (folder / "README.md").read_text()
    assert "FluxPipeline.from_pretrained" in card and "flux-diffusers" in card and "stable-diffusion" not in card
    assert "trained: transformer and text encoder" in card

    validation = info["validation"]
    assert validation["guidance_scale"] == info["settings"]["guidance_scale"] == 3.5  # FluxPipeline's default
    assert "guidance_scale=3.5)" in card
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    args = (validation["prompt"], validation["seeds"], validation["num_inference_steps"], validation["guidance_scale"])
    base_images = _images(pipe, *args)
    pipe.load_lora_weights(folder)
    reloaded = _images(pipe, *args)
    trained = [png(folder / "validation" / "step-000002" / f"{i:02d}.png") for i in range(2)]
    for ours, theirs, base in zip(trained, reloaded, base_images):
        assert np.abs(ours - theirs).max() <= 1
        assert np.abs(ours - base).mean() > 1  # training changed the model

    settings = {"classes": ["hummingbird"], "runs": ["sfsl-te"], "num_images": 2, "steps": 2, "seed": 5,
                "device": "cpu"}
    # refused before anything is written: a sampler FLUX.1 cannot take, and a negative prompt FluxPipeline would drop
    for refused, message in (({"scheduler": "dpm_solver++"}, r"is a FLUX.1 model, which samples with its own "
                                                             r"scheduler only; leave --scheduler unset or pass "
                                                             r"--scheduler model \(not dpm_solver\+\+\)"),
                             ({"negative_prompt": "blurry"}, r"is a FLUX.1 model, whose pipeline ignores a negative "
                                                             r"prompt .*; drop --negative-prompt")):
        with pytest.raises(SpurgenError, match=message) as caught:
            generate(resolve_config(GenerateConfig, {}, "generate", {**settings, **refused}), workspace)
        assert "\n" not in str(caught.value)
    assert not workspace.generated_dir(HUMMINGBIRD, "sfsl-te").exists()
    # --scheduler unset: FLUX.1's own sampler
    generated = generate(resolve_config(GenerateConfig, {}, "generate", settings), workspace)
    assert [(r.run, r.kind, r.made) for r in generated] == [("sfsl-te", "lora", 2)]
    out = workspace.generated_dir(HUMMINGBIRD, "sfsl-te")
    for i, theirs in enumerate(_images(pipe, validation["prompt"], [5, 6], 2, 3.5)):
        assert np.abs(png(out / f"{i:05d}.png") - theirs).max() <= 1
    generation = json.loads((out / "generation.json").read_text())
    assert (generation["settings"]["guidance"], generation["settings"]["scheduler"]) == (3.5, "model")  # recorded
    record = generation["model"]
    assert any(name.startswith("transformer/") for name in record["files"])
    # kohya's SD keys cannot name the transformer: refused, not written without it
    export = {"classes": ["94"], "run": "sfsl-te", "format": "kohya"}
    with pytest.raises(SpurgenError, match=r"the LoRA adapts transformer, which the kohya format of SD 1.x/2.x"):
        export_lora(resolve_config(ExportLoraConfig, {}, "export-lora", export), workspace)


def test_flux_sfsl_gradients_reach_the_lora_of_the_transformer_and_clip(tiny_flux_dir: Path, rigged,
                                                                        tmp_path: Path) -> None:
    trainer = sfsl_trainer(tiny_flux_dir, write_refs(tmp_path), rigged, resolution=64, train_text_encoder=True,
                           run_name="sfsl-te", gradient_checkpointing=True)
    try:
        assert trainer.trained_names == ["transformer", "text_encoder"]
        t5 = trainer.text_encoders[1]
        assert t5.device.type == "cpu" and not any(p.requires_grad for p in t5.parameters())
        losses = trainer.losses(step=0, micro=0)
        assert losses.sfsl_rows == 2 and torch.isfinite(losses.sfsl)
        losses.sfsl.backward()
        for model in (trainer.unet, trainer.text_encoder):
            grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name]
            assert grads and all(g is not None for g in grads)  # none unused: 2-process training refuses those
            assert sum(float(g.abs().sum()) for g in grads) > 0
        assert not any("lora_" in name for name, _ in t5.named_parameters())
        assert all(p.grad is None for p in trainer.parts.vae.parameters())
    finally:
        trainer.close()


@pytest.mark.parametrize("setting, message", [
    ({"lora": False}, r"--full is not offered for FLUX.1: its 12 B-parameter transformer"),
    ({"snr_gamma": 5.0}, r"--snr-gamma weights DDPM timesteps"),
    ({"zero_terminal_snr": True}, r"--zero-terminal-snr rescales DDPM schedules"),
    ({"attention": "eager"}, r"--attention eager is not offered for FLUX.1"),
])
def test_settings_without_a_flow_matching_meaning_are_refused_in_one_line(
        setting: dict[str, Any], message: str, tiny_flux_dir: Path, tmp_path: Path) -> None:
    workspace = write_refs(tmp_path)
    with pytest.raises(SpurgenError, match=message) as caught:
        finetune(config(tiny_flux_dir, resolution=64, preset="dreambooth", **setting), workspace)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "models").exists()


# --- Guidance defaults, memory savers, and the other stages on FLUX.1 -------------------------------------------


def test_guidance_defaults_are_each_pipelines_and_an_sd_run_recorded_at_7_5_still_resumes(
        tiny_flux_dir: Path, tiny_sd_dir: Path, tmp_path: Path) -> None:
    import inspect

    from spurgen.config import FinetuneConfig, help_for
    from spurgen.finetune import prepare_finetune
    from spurgen.finetune.plan import resume_key

    for name, label in (("sd", "SD 1.x/2.x"), ("sdxl", "SDXL"), ("flux", "FLUX.1")):
        family = get_family(name)
        call = inspect.signature(family.pipeline_class().__call__).parameters["guidance_scale"]
        assert family.default_guidance == call.default  # the plain pipeline's own default
        for text in (help_for(GenerateConfig, "guidance"), help_for(FinetuneConfig, "guidance_scale")):
            assert f"{family.default_guidance} for {label}" in text
    assert "distilled guidance embedding" in help_for(GenerateConfig, "guidance")
    workspace = write_refs(tmp_path)
    for model, expected in ((tiny_flux_dir, 3.5), (tiny_sd_dir, 7.5)):
        keys = set()
        for given in (None, expected):  # unset, and as an older spurgen recorded it
            cfg = config(model, preset="dreambooth", resolution=64, guidance_scale=given)
            setup = prepare_finetune(cfg, workspace)
            assert cfg.guidance_scale == expected
            keys.add(resume_key(cfg, setup.plans[0], setup.base, setup.resolution, setup.accelerator))
        assert len(keys) == 1  # a checkpoint saved with the number resumes without it


def test_sampler_defaults_are_each_familys_as_generate_help_says() -> None:
    from spurgen.config import help_for

    for name, default in (("sd", "DPM-Solver++"), ("sdxl", "DPM-Solver++"), ("flux", "model")):
        family = get_family(name)
        assert (family.scheduler(None), family.scheduler("euler_a")) == (default, "Euler-a")
        assert family.negative_prompts is (name != "flux")  # FluxPipeline drops it without true CFG
    assert "DPM-Solver++ for SD 1.x/2.x and SDXL, 'model' for FLUX.1" in help_for(GenerateConfig, "scheduler")


def test_taef1_as_sfsl_decoder_trains_sfsl_through_it(tiny_flux_dir: Path, rigged, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import AutoencoderTiny

    from spurgen.testing import build_tiny_autoencoder

    # madebyollin/taef1's config: the FLUX VAE's latent channels, scale 1 and no shift (it decodes the latents the
    # transformer sees); here with the tiny FLUX VAE's channels
    channels = json.loads((tiny_flux_dir / "vae" / "config.json").read_text())["latent_channels"]
    taef1 = build_tiny_autoencoder(tmp_path / "taef1", "tiny", latent_channels=channels)
    saved = json.loads((taef1 / "config.json").read_text())
    assert (saved["_class_name"], saved["scaling_factor"], saved["shift_factor"]) == ("AutoencoderTiny", 1.0, 0.0)
    trainer = sfsl_trainer(tiny_flux_dir, write_refs(tmp_path / "ws"), rigged, resolution=64, run_name="taef1",
                           sfsl_decoder=str(taef1))
    monkeypatch.setattr(trainer.parts.vae, "decode", lambda *a, **k: pytest.fail("SFSL decoded through the VAE"))
    decoder, seen = trainer.sfsl_decoder, []
    assert isinstance(decoder, AutoencoderTiny)
    decode = decoder.decode
    monkeypatch.setattr(decoder, "decode", lambda latents, *a, **k: seen.append(latents) or decode(latents, *a, **k))
    try:
        trainer.train_step(0)
        [row] = trainer.read_rows()
        assert row["sfsl_rows"] == 2 and np.isfinite(row["sfsl"]) and row["sfsl"] > 0  # the term is logged
        # the transformer's latents go in unchanged: 2 rows of the tiny VAE's 32 x 32 latents at 64 px
        assert [tuple(z.shape) for z in seen] == [(2, channels, 32, 32)]
        losses = trainer.losses(step=1, micro=0)
        losses.sfsl.backward()
        for model in (trainer.unet, trainer.text_encoder):
            grads = [p.grad for name, p in model.named_parameters() if "lora_" in name]
            assert grads and all(g is not None for g in grads)
            assert sum(float(g.abs().sum()) for g in grads) > 0
        assert all(p.grad is None for p in decoder.parameters())  # frozen: gradients pass through it
    finally:
        trainer.close()


def _attention_calls(trainer: Any) -> list[int]:
    """Counts the runs of the attention of the first transformer block and of CLIP's first layer: [transformer,
    clip]. (A module inside the checkpointed block, counted in its forward: torch calls no forward hooks when it
    recomputes, and transformers checkpoints a layer's class-level forward.)"""
    calls = [0, 0]
    clip = trainer.text_encoder.get_submodule("encoder.layers.0" if hasattr(trainer.text_encoder, "encoder")
                                               else "text_model.encoder.layers.0")  # transformers 5 dropped text_model
    for n, attention in enumerate((trainer.unet.transformer_blocks[0].attn, clip.self_attn)):
        def counted(*args: Any, n: int = n, forward: Any = attention.forward, **kwargs: Any) -> Any:
            calls[n] += 1
            return forward(*args, **kwargs)

        attention.forward = counted
    return calls


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny_flux_dir: Path, rigged,
                                                                   tmp_path: Path) -> None:
    results = []
    for checkpointing in (False, True):
        trainer = sfsl_trainer(tiny_flux_dir, write_refs(tmp_path / str(checkpointing)), rigged, resolution=64,
                               train_text_encoder=True, run_name="te", gradient_checkpointing=checkpointing)
        try:
            calls = _attention_calls(trainer)
            losses = trainer.losses(step=0, micro=0)
            assert calls == [1, 1]
            losses.total.backward()
            # checkpointed blocks run their forward again in the backward pass
            assert calls == ([2, 2] if checkpointing else [1, 1])
            grads = {f"{part}.{name}": p.grad.clone() for part, model in zip(trainer.trained_names, trainer.models)
                     for name, p in model.named_parameters() if p.requires_grad}
            results.append((losses.total.detach(), losses.sfsl.detach(), grads))
        finally:
            trainer.close()
    (total, sfsl, grads), (total_gc, sfsl_gc, grads_gc) = results
    torch.testing.assert_close(total_gc, total)
    torch.testing.assert_close(sfsl_gc, sfsl)
    assert grads_gc.keys() == grads.keys() and any(name.startswith("text_encoder.") for name in grads)
    for name in grads:
        torch.testing.assert_close(grads_gc[name], grads[name], rtol=1e-4, atol=1e-7, msg=name)


def test_8bit_adam_trains_the_flux_lora_when_bitsandbytes_is_installed(tiny_flux_dir: Path, tmp_path: Path) -> None:
    from spurgen.finetune import prepare_finetune

    bitsandbytes = pytest.importorskip("bitsandbytes")
    workspace = write_refs(tmp_path)
    cfg = config(tiny_flux_dir, preset="dreambooth-te", resolution=64, prior_preservation=False, use_8bit_adam=True)
    setup = prepare_finetune(cfg, workspace)
    trainer = setup.trainer(setup.plans[0], cfg, workspace)
    try:
        assert isinstance(trainer.optimizer.optimizer, bitsandbytes.optim.AdamW8bit)
        assert not trainer.skips_on_device  # it cannot skip a step on the device: the flag is read on the host
        trained = {name: [p for p in model.parameters() if p.requires_grad]
                   for name, model in zip(trainer.trained_names, trainer.models)}
        before = {name: [p.detach().clone() for p in params] for name, params in trained.items()}
        trainer.train_step(0)
        [row] = trainer.read_rows()
        assert np.isfinite(row["loss"])
        for name, params in trained.items():  # the step updated the LoRA of the transformer and of CLIP
            assert any(not torch.equal(p, old) for p, old in zip(params, before[name])), name
    finally:
        trainer.close()


def test_spurgen_run_takes_a_flux_model_through_every_stage_and_a_rerun_skips_them(tiny_flux_dir: Path,
                                                                                   tmp_path: Path) -> None:
    from conftest import small_settings, solved_classifier, spurious_folder

    spurious_folder(tmp_path / "images", [HUMMINGBIRD], 2)
    classifier = solved_classifier(tmp_path / "images", tmp_path / "tiny.safetensors")
    workspace = tmp_path / "ws"
    workspace.mkdir()
    # --guidance and --scheduler left unset: generation.json records FLUX.1's 3.5 and own sampler, and the rerun's
    # plan resolves them the same way
    (workspace / "spurgen.toml").write_text(small_settings(tiny_flux_dir, tmp_path / "images",
                                                           finetune={"resolution": 64}))
    args = ["run", "-w", str(workspace), "--classes", "94", f"--classifier={classifier}"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    [entry] = json.loads((workspace / "run.json").read_text())["classes"]
    assert entry["stages"] == {"select-refs": "ran", "finetune/dreambooth": "trained", "generate/dreambooth": "ran"}
    trained = manifest(workspace / "models" / HUMMINGBIRD.dirname / "dreambooth")
    assert (trained["status"], trained["family"], trained["weights"]) == ("complete", "flux", "lora")
    generated = workspace / "generated" / HUMMINGBIRD.dirname / "dreambooth"
    generation = json.loads((generated / "generation.json").read_text())
    assert generation["status"] == "complete" and (generated / "00000.png").is_file()
    assert (generation["settings"]["guidance"], generation["settings"]["scheduler"]) == (3.5, "model")
    evaluation = json.loads((workspace / "reports" / "evaluation.json").read_text())
    assert evaluation["settings"]["classes"] == [94] and (workspace / "reports" / "report.html").is_file()

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    rerun = json.loads((workspace / "run.json").read_text())
    assert rerun["classes"][0]["stages"] == dict.fromkeys(entry["stages"], "skipped") and not rerun["evaluated"]


@pytest.mark.parametrize(("tables", "message"), [
    ({"generate": {"negative-prompt": "blurry"}}, "ignores a negative prompt"),
    ({"generate": {"scheduler": "euler"}}, "samples with its own scheduler only"),
    ({"finetune": {"lora": False}}, "--full is not offered for FLUX.1"),
])
def test_spurgen_run_refuses_what_flux_would_not_do_before_any_stage_starts(
        tables: dict[str, dict], message: str, tiny_flux_dir: Path, tmp_path: Path) -> None:
    from conftest import small_settings, spurious_folder

    spurious_folder(tmp_path / "images", [HUMMINGBIRD], 2)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "spurgen.toml").write_text(small_settings(tiny_flux_dir, tmp_path / "images", **tables))
    done = CliRunner().invoke(app, ["run", "-w", str(workspace), "--classes", "94"])
    assert done.exit_code == 2 and message in done.output, done.output
    assert sorted(p.name for p in workspace.iterdir()) == ["spurgen.toml"]  # not even select-refs ran


def test_generate_until_over_generates_a_flux_model_until_n_images_pass(tiny_flux_dir: Path, rigged, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from test_generate_until import RiggedForward, _same_image, _statistic, _stop

    from spurgen.classifiers import Classifier, builtin_classifiers, load_classifier, parse_classifier
    from spurgen.images import load_rgb
    from spurgen.workspace import Workspace

    settings = {"classes": ["hummingbird"], "base": True, "model": str(tiny_flux_dir), "steps": 2,
                "scheduler": "model", "resolution": 64, "device": "cpu", "batch_size": 2, "classifiers": ["res-a"]}
    pool_workspace, workspace = Workspace(tmp_path / "pool"), Workspace(tmp_path / "ws")
    generate(resolve_config(GenerateConfig, {}, "generate", {**settings, "num_images": 6}), pool_workspace)
    pool = [pool_workspace.generated_dir(HUMMINGBIRD, "base") / f"{i:05d}.png" for i in range(6)]
    # the rigged classifier passes the brighter-on-top half of the pool (see test_generate_until)
    transform = load_classifier(parse_classifier(rigged.flags["res-a"], builtin_classifiers("imagenet"))).transform()
    statistic = _statistic(torch.stack([transform(load_rgb(p)) for p in pool])).numpy()
    forward = RiggedForward(float(np.median(statistic)))
    monkeypatch.setattr(Classifier, "logits", lambda self, images: forward(self, images))
    passes = [bool(x) for x in statistic > np.median(statistic)]
    made = _stop(passes, 2)

    until = {**settings, "until": 2, "filter": ["consistent"], "max_images": 6}
    [result] = generate(resolve_config(GenerateConfig, {}, "generate", until), workspace, [rigged.flags["res-a"]])
    assert (result.made, result.total, result.accepted) == (made, made, 2)
    generation = json.loads((workspace.generated_dir(HUMMINGBIRD, "base") / "generation.json").read_text())
    assert generation["status"] == "complete" and generation["settings"]["guidance"] == 3.5
    assert [entry["accepted"] for entry in generation["images"]] == passes[:made]
    for entry in generation["images"]:  # image i is seed i's whatever stops the run
        assert _same_image(workspace.generated_dir(HUMMINGBIRD, "base") / entry["file"], pool[entry["index"]])
    assert forward.images == made  # each image judged once
