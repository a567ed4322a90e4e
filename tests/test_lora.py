"""LoRAs in and out: a LoRA written by plain diffusers/peft code sampled by generate (--lora) and evaluated, the
--lora-scale, checkpoints as models (--checkpoint), export-lora's kohya and diffusers files, and LoRA metadata
without local paths."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from spurgen.cli import app
from spurgen.config import EvaluateConfig, ExportLoraConfig, FinetuneConfig, GenerateConfig, resolve_config
from spurgen.errors import SpurgenError
from spurgen.evaluate import evaluate
from spurgen.export_lora import export_lora
from spurgen.finetune import finetune
from spurgen.generate import GenerationResult, generate
from spurgen.images import file_sha256
from spurgen.labels import get_label_set
from spurgen.workspace import Workspace, atomic_write_json

pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context")]

HUMMINGBIRD = get_label_set("imagenet")[94]
PROMPT = "a photo of sks red flowers"


@pytest.fixture(scope="module")
def diffusers_lora(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding pytorch_lora_weights.safetensors written as diffusers' train_dreambooth_lora.py writes it:
    a peft adapter on the UNet (alpha = rank, the script's choice), saved without adapter metadata."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.unet.requires_grad_(False)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                     target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    generator = torch.Generator().manual_seed(3)
    for name, parameter in pipe.unet.named_parameters():
        if "lora_B" in name:  # trained weights: B is no longer zero
            parameter.data = 0.5 * torch.randn(parameter.shape, generator=generator)
    folder = tmp_path_factory.mktemp("outside") / "dreambooth-lora"
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)))
    return folder


def _generate_config(**values: Any) -> GenerateConfig:
    base = {"classes": ["hummingbird"], "num_images": 2, "steps": 2, "scheduler": "DDIM", "device": "cpu"}
    return resolve_config(GenerateConfig, {}, "generate", {**base, **values})


def generate_images(ws: Workspace, **values: Any) -> list[GenerationResult]:
    return generate(_generate_config(**values), ws)


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _images(folder: Path, count: int = 2) -> list[np.ndarray]:
    return [_pixels(folder / f"{i:05d}.png") for i in range(count)]


def _plain(model: Path, lora: Path | None, count: int = 2) -> list[np.ndarray]:
    """Images of seeds 0, 1, ... from a plain diffusers pipeline, with ``lora`` loaded by load_lora_weights."""
    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora)
    return [np.asarray(pipe(PROMPT, num_inference_steps=2, guidance_scale=7.5, height=64, width=64,
                            generator=torch.Generator().manual_seed(i)).images[0], dtype=np.int16)
            for i in range(count)]


def _assert_same(ours: list[np.ndarray], theirs: list[np.ndarray]) -> None:
    # Batched and single forwards differ in the last float bits, which can move a pixel by one level.
    assert all(a.shape == b.shape and np.abs(a - b).max() <= 1 for a, b in zip(ours, theirs, strict=True))


def _metadata(path: Path) -> dict[str, str]:
    """The safetensors header's metadata, read as bytes (no library in between)."""
    data = path.read_bytes()
    return json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]]).get("__metadata__", {})


def test_a_diffusers_trained_lora_is_sampled_like_plain_diffusers_and_evaluated_as_a_run(
        diffusers_lora: Path, tiny_sd_dir: Path, rigged, tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    [result] = generate_images(ws, lora=str(diffusers_lora), model=str(tiny_sd_dir), prompt=PROMPT)
    folder = ws.generated_dir(HUMMINGBIRD, "dreambooth-lora")  # the run is named after the LoRA's folder
    assert (result.run, result.kind, result.made) == ("dreambooth-lora", "lora", 2)
    _assert_same(_images(folder), _plain(tiny_sd_dir, diffusers_lora))
    base = _plain(tiny_sd_dir, None)
    assert all(np.abs(a - b).mean() > 5 for a, b in zip(_images(folder), base)), "the LoRA must change the images"
    manifest = json.loads((folder / "generation.json").read_text())
    lora_file = diffusers_lora / "pytorch_lora_weights.safetensors"
    assert manifest["status"] == "complete" and manifest["settings"]["lora_scale"] == 1.0
    assert manifest["model"]["lora_source"] == str(diffusers_lora)
    assert manifest["model"]["lora_sha256"] == file_sha256(lora_file)
    # The file itself, named on the command line, is the same LoRA: nothing to redo.
    runner = CliRunner()
    output = runner.invoke(app, ["generate", "-w", str(ws.root), "-c", "94", "--lora", str(lora_file), "--model",
                                 str(tiny_sd_dir), "--prompt", PROMPT, "--run-name", "dreambooth-lora", "-n", "2",
                                 "--steps", "2", "--scheduler", "DDIM", "--device", "cpu"])
    assert output.exit_code == 0 and "0 new images, 2 already there" in output.output, output.output
    evaluation = evaluate(resolve_config(EvaluateConfig, {}, "evaluate", {
        "classes": ["94"], "classifiers": ["res-a"], "num_workers": 0, "device": "cpu"}), ws, [rigged.flags["res-a"]])
    found = [(r.source.name, r.source.kind, len(r.files)) for r in evaluation.results]
    assert found == [("dreambooth-lora", "generated", 2)]


def test_outside_lora_bad_input_is_one_line_before_anything_is_written(diffusers_lora: Path, tiny_sd_dir: Path,
                                                                       tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    cases = [
        ({"lora": "someone/their-lora", "model": str(tiny_sd_dir), "prompt": PROMPT},
         r"--lora someone/their-lora: not a local file or folder, and the hub gave no pytorch_lora_weights"),
        ({"lora": str(tmp_path / "nowhere"), "model": str(tiny_sd_dir), "prompt": PROMPT},
         r"no such file or folder, and not a hub id"),
        ({"lora": str(diffusers_lora), "prompt": PROMPT}, r"no base model for the LoRA .*; pass --model"),
        ({"lora": str(diffusers_lora), "model": str(tiny_sd_dir)}, r"nothing records the prompt .*; pass --prompt"),
        ({"lora": str(diffusers_lora), "model": str(tiny_sd_dir), "prompt": PROMPT, "run_name": "base"},
         r"the run name 'base' of --lora .* is reserved"),
        ({"lora": str(diffusers_lora), "base": True}, r"--lora and --base both given"),
        ({"run_name": "x"}, r"--run-name names the images of --lora or --checkpoint"),
    ]
    for values, message in cases:
        with pytest.raises(SpurgenError, match=message):
            generate_images(ws, **values)
    assert not (ws.root / "generated").exists()


def test_lora_scale_zero_is_the_base_model_and_one_is_the_lora(diffusers_lora: Path, tiny_sd_dir: Path,
                                                               tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    generate_images(ws, lora=str(diffusers_lora), model=str(tiny_sd_dir), prompt=PROMPT, lora_scale=0.0,
                    run_name="scale-0")
    generate_images(ws, base=True, model=str(tiny_sd_dir), prompt=PROMPT)
    generate_images(ws, lora=str(diffusers_lora), model=str(tiny_sd_dir), prompt=PROMPT, lora_scale=1.0,
                    run_name="scale-1")
    assert all(np.array_equal(a, b) for a, b in zip(_images(ws.generated_dir(HUMMINGBIRD, "scale-0")),
                                                     _images(ws.generated_dir(HUMMINGBIRD, "base"))))
    _assert_same(_images(ws.generated_dir(HUMMINGBIRD, "scale-1")), _plain(tiny_sd_dir, diffusers_lora))
    manifest = json.loads((ws.generated_dir(HUMMINGBIRD, "scale-0") / "generation.json").read_text())
    assert manifest["settings"]["lora_scale"] == 0.0
    # The scale is part of the fingerprint: another scale into the same folder is refused.
    with pytest.raises(SpurgenError, match=r"other settings \(lora_scale changed\)"):
        generate_images(ws, lora=str(diffusers_lora), model=str(tiny_sd_dir), prompt=PROMPT, lora_scale=0.5,
                        run_name="scale-0")


# --- Runs trained by spurgen: checkpoints, export, metadata -----------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    """A workspace with a 2-step LoRA run 'dreambooth-te' (alpha 8 != rank 4) and checkpoints of steps 1 and 2."""
    root = tmp_path_factory.mktemp("trained")
    ws = Workspace(root)
    refs = ws.refs_dir(HUMMINGBIRD)
    refs.mkdir(parents=True)
    for i in range(2):
        pixels = np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(refs / f"ref{i}.png")
    atomic_write_json(refs / "selection.json", {"selected": ["ref0.png", "ref1.png"]})
    finetune(resolve_config(FinetuneConfig, {}, "finetune", {
        "model": str(tiny_sd_dir), "classes": ["94"], "preset": "dreambooth-te", "steps": 2, "num_class_images": 1,
        "sample_steps": 1, "num_validation_images": 0, "validation_steps": 0, "checkpointing_steps": 1,
        "learning_rate": 1e-2, "rank": 4, "alpha": 8.0, "instance_prompt": PROMPT}), ws)
    return ws


def test_each_checkpoint_holds_a_lora_that_generate_samples(trained: Workspace, tiny_sd_dir: Path,
                                                            tmp_path: Path) -> None:
    run_dir = trained.model_dir(HUMMINGBIRD, "dreambooth-te")
    final = load_file(run_dir / "pytorch_lora_weights.safetensors")
    last = load_file(run_dir / "checkpoints" / "checkpoint-2" / "pytorch_lora_weights.safetensors")
    first = load_file(run_dir / "checkpoints" / "checkpoint-1" / "pytorch_lora_weights.safetensors")
    assert set(final) == set(last) == set(first) and any(k.startswith("text_encoder.") for k in final)
    assert all(torch.equal(final[k], last[k]) for k in final), "the last checkpoint's LoRA is the final one"
    assert any(not torch.equal(final[k], first[k]) for k in final), "checkpoint 1 is an earlier model"
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(trained.root / "models", ws.root / "models")
    [result] = generate_images(ws, runs=["dreambooth-te"], checkpoint=1)
    assert result.run == "dreambooth-te-checkpoint-1"
    checkpoint = ws.model_dir(HUMMINGBIRD, "dreambooth-te") / "checkpoints" / "checkpoint-1"
    _assert_same(_images(ws.generated_dir(HUMMINGBIRD, result.run)), _plain(tiny_sd_dir, checkpoint))
    manifest = json.loads((ws.generated_dir(HUMMINGBIRD, result.run) / "generation.json").read_text())
    assert manifest["model"]["lora_source"] == str(checkpoint)
    with pytest.raises(SpurgenError, match=r"checkpoint-7 does not exist: run 'dreambooth-te' of hummingbird \(94\) "
                                           r"has checkpoints of steps 1, 2; pick one"):
        generate_images(ws, runs=["dreambooth-te"], checkpoint=7)


def test_lora_metadata_names_the_base_model_without_a_local_path(trained: Workspace, tiny_sd_dir: Path) -> None:
    run_dir = trained.model_dir(HUMMINGBIRD, "dreambooth-te")
    for path in (run_dir / "pytorch_lora_weights.safetensors",
                 run_dir / "checkpoints" / "checkpoint-1" / "pytorch_lora_weights.safetensors"):
        header = json.dumps(_metadata(path))
        assert str(tiny_sd_dir) not in header and str(Path.home()) not in header and "/tmp" not in header
        adapters = json.loads(_metadata(path)["lora_adapter_metadata"])
        assert adapters["unet.base_model_name_or_path"] == adapters["text_encoder.base_model_name_or_path"] == "tiny-sd"


def test_shared_name_of_a_hub_snapshot_is_its_hub_id(tmp_path: Path) -> None:
    from spurgen._base_model import shared_name

    snapshot = tmp_path / "hub" / "models--stable-diffusion-v1-5--stable-diffusion-v1-5" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    assert shared_name(str(snapshot)) == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert shared_name(str(tmp_path / "hub")) == "hub"
    assert shared_name("org/model") == "org/model"


def _export(ws: Workspace, **values: Any) -> Path:
    return export_lora(resolve_config(ExportLoraConfig, {}, "export-lora", {"classes": ["94"], **values}), ws).out


def test_kohya_export_names_keys_as_kohya_and_loads_back_to_the_same_images(trained: Workspace, tiny_sd_dir: Path,
                                                                            tmp_path: Path) -> None:
    run_dir = trained.model_dir(HUMMINGBIRD, "dreambooth-te")
    source = load_file(run_dir / "pytorch_lora_weights.safetensors")
    out = _export(trained, format="kohya", out=str(tmp_path / "run-kohya.safetensors"))
    kohya = load_file(out)
    modules = {key.split(".", 1)[0] for key in kohya}
    assert all(m.startswith(("lora_unet_", "lora_te_text_model_encoder_layers_")) for m in modules)
    assert any(m.startswith("lora_te_") for m in modules) and any(m.startswith("lora_unet_") for m in modules)
    assert set(kohya) == {f"{m}.{s}" for m in modules for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert all(float(kohya[f"{m}.alpha"]) == 8.0 for m in modules), "the run's alpha, not the rank"
    # Values round-trip: each kohya module is one diffusers module, down = A and up = B.
    for kohya_module, diffusers_module in (
            ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0",
             "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0.lora"),
            ("lora_te_text_model_encoder_layers_0_self_attn_k_proj",
             "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_linear_layer")):
        assert torch.equal(kohya[f"{kohya_module}.lora_down.weight"], source[f"{diffusers_module}.down.weight"])
        assert torch.equal(kohya[f"{kohya_module}.lora_up.weight"], source[f"{diffusers_module}.up.weight"])
    assert sorted(torch.cat([v.flatten() for k, v in kohya.items() if not k.endswith("alpha")]).tolist()) == \
        sorted(torch.cat([v.flatten() for v in source.values()]).tolist())
    # diffusers reads kohya files too: the export gives the run's own images, alpha included.
    ws = Workspace(tmp_path / "ws")
    shutil.copytree(trained.root / "models", ws.root / "models")
    generate_images(ws, runs=["dreambooth-te"])
    generate_images(ws, lora=str(out), model=str(tiny_sd_dir), prompt=PROMPT)
    _assert_same(_images(ws.generated_dir(HUMMINGBIRD, "run-kohya")),
                 _images(ws.generated_dir(HUMMINGBIRD, "dreambooth-te")))


def test_diffusers_export_and_the_cli(trained: Workspace, tmp_path: Path) -> None:
    run_dir = trained.model_dir(HUMMINGBIRD, "dreambooth-te")
    result = CliRunner().invoke(app, ["export-lora", "-w", str(trained.root), "-c", "94", "--checkpoint", "1"])
    assert result.exit_code == 0, result.output
    out = trained.root / "exports" / HUMMINGBIRD.dirname / "dreambooth-te-checkpoint-1-diffusers.safetensors"
    assert "written to" in result.output and out.is_file()
    exported = load_file(out)
    source = load_file(run_dir / "checkpoints" / "checkpoint-1" / "pytorch_lora_weights.safetensors")
    assert set(exported) == set(source) and all(torch.equal(exported[k], source[k]) for k in source)
    assert json.loads(_metadata(out)["lora_adapter_metadata"])["unet.lora_alpha"] == 8
    for args, message in ((["--run", "nope"], "holds no finished LoRA run"), (["--format", "ckpt"], "--format must be"),
                          (["--out", str(tmp_path / "x.pt")], "must name a .safetensors file")):
        result = CliRunner().invoke(app, ["export-lora", "-w", str(trained.root), "-c", "94", *args])
        assert result.exit_code == 2 and message in result.output, result.output
