"""SDXL's other paths on the tiny random SDXL folder: generate's resume and --until, 8-bit Adam, gradient
checkpointing, a TAESD-XL --sfsl-decoder and export-lora --format kohya."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_finetune import HUMMINGBIRD, config, one_thread, sfsl_trainer, write_refs  # noqa: F401 (fixture)
from test_generate_until import RiggedForward, _same_image, _statistic, _stop

from spurgen.classifiers import Classifier, builtin_classifiers, load_classifier, parse_classifier
from spurgen.config import ExportLoraConfig, GenerateConfig, resolve_config
from spurgen.errors import SpurgenError
from spurgen.export_lora import _sgm_unet_modules, export_lora, to_kohya
from spurgen.finetune import finetune, prepare_finetune
from spurgen.generate import generate
from spurgen.images import load_rgb
from spurgen.workspace import Workspace

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")

PROMPT = "a photo of sks red feeder/flower"
# generate on the tiny SDXL base model itself: 2 denoising steps, 2 images per batch
BASE = {"classes": ["hummingbird"], "base": True, "steps": 2, "scheduler": "model", "device": "cpu", "batch_size": 2}


def _generate(model: Path, workspace: Workspace, flags: list[str] | None = None, **values: Any) -> list[Any]:
    return generate(resolve_config(GenerateConfig, {}, "generate", {**BASE, "model": str(model), **values}),
                    workspace, flags)


def _images(pipe: Any, seeds: list[int]) -> list[np.ndarray]:
    pipe.set_progress_bar_config(disable=True)
    return [np.asarray(pipe(PROMPT, height=64, width=64, num_inference_steps=2,
                            generator=torch.Generator().manual_seed(seed)).images[0], dtype=np.int16)
            for seed in seeds]


# --- generate --until ----------------------------------------------------------------------------------------------


def test_sdxl_generate_until_stops_at_exactly_n_accepted(tiny_sdxl_dir: Path, rigged, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """As tests/test_generate_until.py for SD: a rigged classifier accepts a known half of the seed sequence."""
    pool_size, flags = 8, [rigged.flags["res-a"]]
    pool_ws = Workspace(tmp_path / "pool")
    _generate(tiny_sdxl_dir, pool_ws, num_images=pool_size)
    pool = [pool_ws.generated_dir(HUMMINGBIRD, "base") / f"{i:05d}.png" for i in range(pool_size)]
    transform = load_classifier(parse_classifier(flags[0], builtin_classifiers("imagenet"))).transform()
    statistic = _statistic(torch.stack([transform(load_rgb(p)) for p in pool])).numpy()
    forward = RiggedForward(float(np.median(statistic)))
    monkeypatch.setattr(Classifier, "logits", lambda self, images: forward(self, images))
    passes = [bool(x) for x in statistic > forward.threshold]
    made = _stop(passes, 2)

    ws = Workspace(tmp_path / "ws")
    [result] = _generate(tiny_sdxl_dir, ws, flags, classifiers=["res-a"], until=2, filter=["consistent"],
                         max_images=pool_size)
    assert (result.made, result.accepted) == (made, 2) and forward.images == made
    manifest = json.loads((ws.generated_dir(HUMMINGBIRD, "base") / "generation.json").read_text())
    assert manifest["status"] == "complete" and manifest["over_generation"]["accepted"] == 2
    assert [e["accepted"] for e in manifest["images"]] == passes[:made]
    for entry in manifest["images"]:  # the same images as plain generate, seed by seed
        assert _same_image(ws.generated_dir(HUMMINGBIRD, "base") / entry["file"], pool[entry["index"]])


def test_sdxl_generate_continues_a_run_to_the_images_of_an_uninterrupted_one(tiny_sdxl_dir: Path,
                                                                             tmp_path: Path) -> None:
    straight, split = Workspace(tmp_path / "straight"), Workspace(tmp_path / "split")
    _generate(tiny_sdxl_dir, straight, num_images=3)
    _generate(tiny_sdxl_dir, split, num_images=2)
    [result] = _generate(tiny_sdxl_dir, split, num_images=3)
    assert (result.existing, result.made) == (2, 1)
    for i in range(3):
        name = f"{i:05d}.png"
        assert _same_image(split.generated_dir(HUMMINGBIRD, "base") / name,
                           straight.generated_dir(HUMMINGBIRD, "base") / name)


# --- Memory savers -------------------------------------------------------------------------------------------------


def test_sdxl_8bit_adam_trains_the_unet_and_both_text_encoders(tiny_sdxl_dir: Path, tmp_path: Path) -> None:
    bitsandbytes = pytest.importorskip("bitsandbytes")
    workspace = write_refs(tmp_path)
    cfg = config(tiny_sdxl_dir, preset="dreambooth-te", use_8bit_adam=True, prior_preservation=False)
    setup = prepare_finetune(cfg, workspace)
    trainer = setup.trainer(setup.plans[0], cfg, workspace)
    try:
        assert isinstance(trainer.optimizer.optimizer, bitsandbytes.optim.AdamW8bit)
        groups = trainer.optimizer.optimizer.param_groups
        assert len(groups) == 3  # the UNet's and each text encoder's adapters
        before = [[p.detach().clone() for p in group["params"]] for group in groups]
        trainer.train_step(0)
        [row] = trainer.read_rows()
        assert np.isfinite(row["loss"])
        for group, old in zip(groups, before):
            assert any(not torch.equal(p, q) for p, q in zip(group["params"], old))
    finally:
        trainer.close()


def _forward_calls(module: torch.nn.Module) -> list[int]:
    calls = [0]
    module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_sdxl_gradient_checkpointing_recomputes_and_gives_the_same_gradients(tiny_sdxl_dir: Path, rigged,
                                                                              tmp_path: Path) -> None:
    grads, calls = {}, {}
    for checkpointing in (False, True):
        trainer = sfsl_trainer(tiny_sdxl_dir, write_refs(tmp_path / str(checkpointing)), rigged,
                               gradient_checkpointing=checkpointing)
        try:
            models = dict(zip(("unet", "text_encoder", "text_encoder_2"), (trainer.unet, *trainer.text_encoders)))
            assert trainer.unet.is_gradient_checkpointing is checkpointing
            # Modules inside checkpointed blocks, where the gradient flows: a convolution of a UNet resnet, each
            # encoder's first attention (a hook on a CLIP layer itself sees one call: transformers checkpoints its
            # forward, not its __call__; and the recomputation stops before a layer's last module).
            watched = {"unet": _forward_calls(trainer.unet.up_blocks[0].resnets[0].conv1),
                       **{name: _forward_calls(next(m for n, m in models[name].named_modules()
                                                    if n.endswith("encoder.layers.0.self_attn")))
                          for name in ("text_encoder", "text_encoder_2")}}
            trainer.losses(step=0, micro=0).total.backward()
            calls[checkpointing] = {name: count[0] for name, count in watched.items()}
            grads[checkpointing] = {f"{part}.{name}": p.grad.clone() for part, model in models.items()
                                    for name, p in model.named_parameters() if p.grad is not None}
        finally:
            trainer.close()
    # The two prompts are encoded once per step and the 2 rows of the batch pass the UNet once; with checkpointing
    # each checkpointed block runs again in the backward pass.
    assert calls == {False: {"unet": 1, "text_encoder": 1, "text_encoder_2": 1},
                     True: {"unet": 2, "text_encoder": 2, "text_encoder_2": 2}}
    assert grads[True].keys() == grads[False].keys() and len(grads[True]) > 0
    assert {name.split(".")[0] for name in grads[True]} == {"unet", "text_encoder", "text_encoder_2"}
    for name, grad in grads[True].items():
        torch.testing.assert_close(grad, grads[False][name], rtol=1e-4, atol=1e-6)


def test_sdxl_sfsl_through_a_taesd_xl_decoder_gets_the_scaled_latents(tiny_sdxl_dir: Path, rigged, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """TAESD-XL (scaling_factor 1.0) was distilled on SDXL's scaled latents, those the UNet denoises: SFSL's
    one-step estimate goes in as it is, while the SDXL VAE gets it divided by its 0.13025."""
    from diffusers import AutoencoderTiny

    from spurgen.families.sdxl import StableDiffusionXL
    from spurgen.testing import build_tiny_autoencoder

    taesd = build_tiny_autoencoder(tmp_path / "taesdxl", "tiny")  # the tiny SDXL VAE's latents: 4 channels, 2x
    estimates: list[torch.Tensor] = []
    estimate = StableDiffusionXL.predicted_original

    def recorded(family: StableDiffusionXL, *args: Any) -> torch.Tensor:
        z0 = estimate(family, *args)
        estimates.append(z0.detach())
        return z0

    monkeypatch.setattr(StableDiffusionXL, "predicted_original", recorded)
    for decoder in (str(taesd), None):
        trainer = sfsl_trainer(tiny_sdxl_dir, write_refs(tmp_path / f"ws-{decoder is None}"), rigged,
                               sfsl_decoder=decoder)
        model = trainer.sfsl_decoder
        assert isinstance(model, AutoencoderTiny) is (decoder is not None)
        seen: list[torch.Tensor] = []
        decode = model.decode
        monkeypatch.setattr(model, "decode", lambda z, *a, **k: seen.append(z.detach()) or decode(z, *a, **k))
        try:
            estimates.clear()
            losses = trainer.losses(step=0, micro=0)
            scale = model.config.scaling_factor
            assert scale == (1.0 if decoder else 0.13025)
            [z0] = estimates
            torch.testing.assert_close(seen[0], z0 / scale)
            assert losses.sfsl_rows == 2 and torch.isfinite(losses.sfsl)
            losses.sfsl.backward()
            for part in (trainer.unet, *trainer.text_encoders):
                assert sum(float(p.grad.abs().sum()) for n, p in part.named_parameters() if "lora_B" in n) > 0
            assert all(p.grad is None for p in model.parameters())  # frozen
        finally:
            trainer.close()


# --- export-lora --format kohya ------------------------------------------------------------------------------------


def test_sdxl_unet_modules_get_kohyas_block_names() -> None:
    """SDXL base (layers_per_block 2): pairs from kohya's sd-scripts (library/sdxl_model_util.py's
    make_unet_conversion_map), and diffusers' loader maps the names back (_maybe_map_sgm_blocks_to_diffusers)."""
    from types import SimpleNamespace

    from diffusers.loaders.lora_conversion_utils import _convert_unet_lora_key, _maybe_map_sgm_blocks_to_diffusers

    attentions = [f"down_blocks_{b}_attentions_{i}" for b in (1, 2) for i in range(2)] + ["mid_block_attentions_0"] + [
        f"up_blocks_{b}_attentions_{i}" for b in (0, 1) for i in range(3)]
    modules = [f"{a}_transformer_blocks_0_attn1_to_q" for a in attentions]
    names = _sgm_unet_modules(modules)
    for diffusers_name, kohya_name in (("down_blocks_1_attentions_0", "input_blocks_4_1"),
                                       ("down_blocks_2_attentions_1", "input_blocks_8_1"),
                                       ("mid_block_attentions_0", "middle_block_1"),
                                       ("up_blocks_0_attentions_2", "output_blocks_2_1"),
                                       ("up_blocks_1_attentions_0", "output_blocks_3_1")):
        suffix = "_transformer_blocks_0_attn1_to_q"
        assert names[diffusers_name + suffix] == kohya_name + suffix
    kohya = {f"lora_unet_{name}.lora_down.weight": torch.zeros(1) for name in names.values()}
    back = _maybe_map_sgm_blocks_to_diffusers(kohya, SimpleNamespace(layers_per_block=2))
    assert {_convert_unet_lora_key(key) for key in back} == {
        _convert_unet_lora_key(f"lora_unet_{module}.lora_down.weight") for module in modules}


def test_kohya_keys_refuse_a_part_they_cannot_name() -> None:
    layer = {"lora.down.weight": torch.zeros(1, 2), "lora.up.weight": torch.zeros(2, 1)}
    sdxl_te2 = {f"text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.{k}": v for k, v in layer.items()}
    with pytest.raises(SpurgenError, match=r"adapts text_encoder_2, which the kohya format of SD 1.x/2.x has no keys"):
        to_kohya(sdxl_te2, {"text_encoder_2.lora_alpha": 1}, "sd")
    flux = {f"transformer.single_transformer_blocks.0.attn.to_q.{k}": v for k, v in layer.items()}
    with pytest.raises(SpurgenError, match=r"adapts transformer, which the kohya format of SD 1.x/2.x has no keys"):
        to_kohya(flux, {"transformer.lora_alpha": 1}, "flux")


def _lora_layers(pipe: Any) -> dict[str, torch.Tensor]:
    """The pipeline's LoRA weights by part and module (without the adapter's name), and each module's scale."""
    layers = {}
    for part in ("unet", "text_encoder", "text_encoder_2"):
        for name, module in getattr(pipe, part).named_modules():
            if hasattr(module, "lora_A") and module.lora_A:
                [adapter] = module.lora_A
                layers[f"{part}.{name}.down"] = module.lora_A[adapter].weight
                layers[f"{part}.{name}.up"] = module.lora_B[adapter].weight
                layers[f"{part}.{name}.scale"] = torch.tensor(module.scaling[adapter])
    return layers


def test_sdxl_kohya_export_loads_in_plain_diffusers_to_the_same_images(tiny_sdxl_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    workspace = write_refs(tmp_path / "ws")
    finetune(config(tiny_sdxl_dir, preset="dreambooth-te", rank=4, alpha=8, prior_preservation=False), workspace)
    out = export_lora(resolve_config(ExportLoraConfig, {}, "export-lora", {
        "classes": ["94"], "format": "kohya", "out": str(tmp_path / "kohya.safetensors")}), workspace).out
    kohya = load_file(out)
    with safe_open(str(out), framework="pt") as handle:  # how the WebUI tells an SDXL LoRA
        assert handle.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    modules = {key.split(".", 1)[0] for key in kohya}
    assert set(kohya) == {f"{m}.{s}" for m in modules for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    encoders = {m.split("_text_model_encoder_layers_")[0] for m in modules if "_text_model_" in m}
    assert encoders == {"lora_te1", "lora_te2"}
    unet = [m for m in modules if m.startswith("lora_unet_")]
    assert unet and all(m.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_1_",
                                      "lora_unet_output_blocks_")) for m in unet)
    # tiny SDXL (layers_per_block 1): down_blocks.1.attentions.0 is input_blocks.3.1, up_blocks.0.attentions.1
    # output_blocks.1.1
    assert {"lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q",
            "lora_unet_output_blocks_1_1_transformer_blocks_0_attn2_to_out_0"} <= set(unet)
    assert all(float(kohya[f"{m}.alpha"]) == 8.0 for m in modules)
    source = load_file(workspace.model_dir(HUMMINGBIRD, "dreambooth-te") / "pytorch_lora_weights.safetensors")
    assert sorted(torch.cat([v.flatten() for k, v in kohya.items() if not k.endswith("alpha")]).tolist()) == \
        sorted(torch.cat([v.flatten() for v in source.values()]).tolist())

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    base = _images(pipe, [0, 1])
    pipe.load_lora_weights(workspace.model_dir(HUMMINGBIRD, "dreambooth-te"))
    theirs, their_layers = _images(pipe, [0, 1]), _lora_layers(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(out))
    ours, our_layers = _images(pipe, [0, 1]), _lora_layers(pipe)
    # every adapter of the three parts is loaded, with the same weights and scale
    assert our_layers.keys() == their_layers.keys()
    assert {name.split(".")[0] for name in our_layers} == {"unet", "text_encoder", "text_encoder_2"}
    assert all(torch.equal(our_layers[name], their_layers[name]) for name in our_layers)
    for a, b, original in zip(ours, theirs, base):
        assert np.abs(a - b).max() <= 1
        assert np.abs(a - original).mean() > 1  # the LoRA changes the images
