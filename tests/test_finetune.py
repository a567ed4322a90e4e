"""Tests of ``spurgen finetune`` on the tiny random Stable Diffusion folder, with a rigged classifier for SFSL."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
import torch
from PIL import Image
from huggingface_hub import ModelCard
from typer.testing import CliRunner

from spurgen.cli import app
from spurgen.config import FinetuneConfig, resolve_config
from spurgen.errors import SpurgenError
from spurgen.finetune import Trainer, finetune, predicted_original, prepare_finetune, training_target
from spurgen.images import file_sha256
from spurgen.labels import get_label_set
from spurgen.workspace import Workspace, atomic_write_json

HUMMINGBIRD = get_label_set("imagenet").resolve("94")
# Small everything: 2 steps, 2 class images of 2 denoising steps, no validation images or checkpoints unless a
# test asks; SFSL on every row (bound 999) so that a 2-step run always computes it; a large learning rate so
# that trained weights visibly differ from the base model.
FAST: dict[str, Any] = {"classes": ["94"], "steps": 2, "num_class_images": 2, "sample_steps": 2,
                        "sample_batch_size": 2, "num_validation_images": 0, "validation_steps": 0,
                        "checkpointing_steps": 0, "learning_rate": 1e-2, "rank": 4, "sfsl_model": "res-a",
                        "sfsl_max_timestep": 999, "sfsl_every": 1}  # SFSL on each of the 2 steps


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and the CPUs are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(tiny_sd_dir: Path, **overrides: Any) -> FinetuneConfig:
    return resolve_config(FinetuneConfig, {}, "finetune", {"model": str(tiny_sd_dir), **FAST, **overrides})


def write_refs(root: Path, count: int = 3, cls: str = "94") -> Workspace:
    """A workspace whose refs/<class>/ holds ``count`` noise images, as select-refs leaves it."""
    workspace = Workspace(root)
    folder = workspace.refs_dir(get_label_set("imagenet").resolve(cls))
    folder.mkdir(parents=True)
    names = []
    for i in range(count):
        rng = np.random.default_rng(i)
        Image.fromarray(rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)).save(folder / f"ref{i}.png")
        names.append(f"ref{i}.png")
    atomic_write_json(folder / "selection.json", {"selected": names})
    return workspace


def manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "training.json").read_text())


def loss_rows(folder: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((folder / "losses.csv").read_text().splitlines()))


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


# --- The diffusion arithmetic ----------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_predicted_original_inverts_the_noising(prediction_type: str) -> None:
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type=prediction_type)
    latents, noise = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    timesteps = torch.tensor([0, 250, 600, 999])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    perfect = training_target(scheduler, latents, noise, timesteps)  # what a perfect UNet outputs
    assert torch.allclose(predicted_original(scheduler, noisy, perfect, timesteps), latents, atol=2e-3)


# --- Presets, LoRA and full: losses, manifest, model card ---------------------------------------------------------


@pytest.mark.parametrize("preset, extra", [
    ("dreambooth", {}),
    ("dreambooth-te", {"lora": False, "gradient_accumulation_steps": 2}),
    ("sfsl", {}),
    ("sfsl", {"lora": False, "mixed_precision": "bf16", "gradient_checkpointing": True}),
])
def test_presets_train_and_log_every_loss_term(preset: str, extra: dict[str, Any], tiny_sd_dir: Path, rigged,
                                               tmp_path: Path) -> None:
    workspace = write_refs(tmp_path)
    results = finetune(config(tiny_sd_dir, preset=preset, **extra), workspace, [rigged.flags["res-a"]])
    folder = workspace.model_dir(HUMMINGBIRD, preset)
    assert [(r.status, r.steps, r.folder) for r in results] == [("trained", 2, folder)]
    info = manifest(folder)
    lora = extra.get("lora", True)
    assert info["status"] == "complete" and info["preset"] == preset and info["run"] == preset
    assert info["base_model"] == str(tiny_sd_dir) and info["base_model_resolved"] == str(tiny_sd_dir.resolve())
    assert info["weights"] == ("lora" if lora else "full")
    assert info["train_text_encoder"] is (preset != "dreambooth")
    assert info["noun"] == "red feeder/flower" and info["identifier"] == "sks"
    assert info["instance_prompt"] == "a photo of sks red feeder/flower"
    assert info["class_prompt"] == "a photo of red feeder/flower"
    assert (info["resolution"], info["prediction_type"], info["seed"], info["steps"]) == (64, "epsilon", 0, 2)
    assert info["class"] == {
        "index": 94,
        "name": "hummingbird",
        "synset": "n01833805",
        "spurious_feature": "red feeder/flower",
    }
    assert info["settings"]["preset"] == preset and info["versions"]["diffusers"]
    assert info["distributed"]["mixed_precision"] == extra.get("mixed_precision", "no")
    # every term finite and logged, SFSL only for the sfsl preset
    rows = loss_rows(folder)
    assert [int(r["step"]) for r in rows] == [1, 2]
    for row in rows:
        assert all(np.isfinite(float(row[term])) for term in ("loss", "inst", "prior"))
        assert (row["sfsl"] != "") is (preset == "sfsl")
        if preset == "sfsl":
            assert np.isfinite(float(row["sfsl"])) and int(row["sfsl_rows"]) == 1
    assert set(info["loss"]["last"]) == (
        {"loss", "inst", "prior", "sfsl"} if preset == "sfsl" else {"loss", "inst", "prior"}
    )
    assert (info["sfsl"] is not None) is (preset == "sfsl")
    if lora:
        from safetensors.torch import load_file

        weights = load_file(str(folder / "pytorch_lora_weights.safetensors"))
        assert info["lora_file"] == "pytorch_lora_weights.safetensors"
        assert info["lora_sha256"] == file_sha256(folder / "pytorch_lora_weights.safetensors")
        assert any(k.startswith("unet.") for k in weights)
        assert any(k.startswith("text_encoder.") for k in weights) is (preset != "dreambooth")
    else:
        assert (folder / "model_index.json").is_file() and (
            folder / "unet" / "diffusion_pytorch_model.safetensors"
        ).is_file()
    card = (folder / "README.md").read_text()
    assert f"preset: `{preset}`".lower() in card.lower()
    assert "Instance prompt: `a photo of sks red feeder/flower`" in card
    assert ("load_lora_weights" in card) is lora
    assert ("Spurious feature similarity loss: kappa 100.0 (spurgen's default)" in card) is (preset == "sfsl")
    # a local base model: no hub id, no licence to carry over, and no local path that breaks once uploaded
    data = ModelCard.load(folder / "README.md").data.to_dict()
    assert "base_model" not in data and "license" not in data and "licence is unknown" in card
    assert data["instance_prompt"] == "a photo of sks red feeder/flower" and data["library_name"] == "diffusers"
    assert ("lora" in data["tags"]) is lora
    assert str(tmp_path) not in card and str(tiny_sd_dir) not in card
    assert not list(folder.glob(".*"))  # no staging or probe files left behind


def test_model_card_names_a_hub_base_model_its_licence_and_links_the_samples(tiny_sd_dir: Path, tmp_path: Path) -> None:
    # The base model as the hub cache holds it (a snapshot folder of links): its path gives the hub id, which gives
    # the licence.
    snapshot = tmp_path / "hub" / "models--stable-diffusion-v1-5--stable-diffusion-v1-5" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    for entry in tiny_sd_dir.iterdir():
        (snapshot / entry.name).symlink_to(entry, target_is_directory=entry.is_dir())
    workspace = write_refs(tmp_path / "ws")
    finetune(config(snapshot, preset="dreambooth", num_validation_images=2, prior_preservation=False), workspace)
    folder = workspace.model_dir(HUMMINGBIRD, "dreambooth")
    card = ModelCard.load(folder / "README.md")
    assert card.data.base_model == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert card.data.license == "creativeml-openrail-m" and "CreativeML OpenRAIL-M" in card.text
    samples = ["validation/step-000002/00.png", "validation/step-000002/01.png"]
    assert [w["output"]["url"] for w in card.data.widget] == samples
    assert all(f"]({sample})" in card.text and (folder / sample).is_file() for sample in samples)
    assert str(tmp_path) not in card.content


@pytest.mark.parametrize("card_text, hub_id, expected", [
    ("---\nlicense: mit\n---\n# x\n", None, "mit"),  # the model's own card wins
    (None, "stabilityai/stable-diffusion-2-1-base", "openrail++"),
    (None, "runwayml/stable-diffusion-v1-5", "creativeml-openrail-m"),
    (None, "someone/unknown-model", None),
    ("---\nlicense: [broken\n---\n", None, None),  # a malformed card is no licence, not a crash
])
def test_base_model_licence(card_text: str | None, hub_id: str | None, expected: str | None, tmp_path: Path,
                            monkeypatch) -> None:
    from spurgen._base_model import BaseModel, base_model_license

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    if card_text is not None:
        (tmp_path / "README.md").write_text(card_text)
    base = BaseModel(name=hub_id or str(tmp_path), path=tmp_path, local=hub_id is None, revision=None,
                     fingerprint="0", prediction_type="epsilon", resolution=512, size_multiple=64)
    assert base_model_license(base) == expected


def sfsl_trainer(tiny_sd_dir: Path, workspace: Workspace, rigged, **overrides: Any) -> Trainer:
    cfg = config(tiny_sd_dir, preset="sfsl", prior_preservation=False, batch_size=2, **overrides)
    setup = prepare_finetune(cfg, workspace, [rigged.flags["res-a"]])
    return setup.trainer(setup.plans[0], cfg, workspace)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_sfsl_gradient_reaches_unet_and_text_encoder(prediction_type: str, tiny_sd_dir: Path, rigged,
                                                     tmp_path: Path) -> None:
    from spurgen.testing import build_stable_diffusion

    base = tiny_sd_dir if prediction_type == "epsilon" else build_stable_diffusion(
        tmp_path / "tiny-v", "tiny", prediction_type="v_prediction", seed=0)
    trainer = sfsl_trainer(base, write_refs(tmp_path / "ws"), rigged)
    try:
        # B of a fresh LoRA adapter is zero, so SFSL's gradient shows on B (A's gradient is B-weighted).
        losses = trainer.losses(step=0, micro=0)
        assert losses.sfsl_rows == 2 and torch.isfinite(losses.sfsl)
        losses.sfsl.backward()
        for model in (trainer.unet, trainer.text_encoder):
            grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name]
            assert grads and all(g is not None for g in grads)
            assert sum(float(g.abs().sum()) for g in grads) > 0
        assert all(p.grad is None for p in trainer.parts.vae.parameters())  # frozen: gradients pass through it
    finally:
        trainer.close()


def test_sfsl_skips_rows_above_the_timestep_bound(tiny_sd_dir: Path, rigged, tmp_path: Path, monkeypatch) -> None:
    trainer = sfsl_trainer(tiny_sd_dir, write_refs(tmp_path), rigged, sfsl_max_timestep=0)
    decoded = []
    monkeypatch.setattr(trainer.parts.vae, "decode", lambda *a, **k: decoded.append(a))
    try:
        losses = trainer.losses(step=0, micro=0)  # t = 0 has probability 1/1000 per row: no row qualifies
        assert losses.sfsl is None and losses.sfsl_rows == 0 and not decoded
    finally:
        trainer.close()


def test_kappa_zero_never_loads_the_sfsl_model(tiny_sd_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import spurgen.finetune as finetune_module

    def forbidden(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the SFSL classifier was loaded although kappa is 0")

    monkeypatch.setattr(finetune_module, "load_classifiers", forbidden)
    workspace = write_refs(tmp_path)
    # 'robust-rn50' has no weight file here: any attempt to resolve it would fail too.
    cfg = config(tiny_sd_dir, preset="sfsl", sfsl_weight=0.0, sfsl_model="robust-rn50")
    [result] = finetune(cfg, workspace)
    folder = workspace.model_dir(HUMMINGBIRD, "sfsl")
    assert result.sfsl_weight == 0 and manifest(folder)["sfsl"] is None
    assert all(row["sfsl"] == "" and row["sfsl_rows"] == "0" for row in loss_rows(folder))


# --- What plain diffusers loads ---------------------------------------------------------------------------------


def test_lora_reloads_with_plain_diffusers_and_gives_the_same_images(tiny_sd_dir: Path, rigged, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    workspace = write_refs(tmp_path)
    # alpha != rank: without the adapter metadata in the file, a reload would scale the update by 1 instead of 2
    cfg = config(tiny_sd_dir, preset="sfsl", rank=4, alpha=8, steps=3, num_validation_images=2)
    finetune(cfg, workspace, [rigged.flags["res-a"]])
    folder = workspace.model_dir(HUMMINGBIRD, "sfsl")
    validation = manifest(folder)["validation"]

    def images(pipe: StableDiffusionPipeline) -> list[np.ndarray]:
        pipe.set_progress_bar_config(disable=True)
        return [
            np.asarray(
                pipe(
                    validation["prompt"],
                    height=64,
                    width=64,
                    num_inference_steps=validation["num_inference_steps"],
                    guidance_scale=validation["guidance_scale"],
                    generator=torch.Generator().manual_seed(seed),
                ).images[0],
                dtype=np.int16,
            )
            for seed in validation["seeds"]
        ]

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    base_images = images(pipe)
    pipe.load_lora_weights(folder)
    reloaded = images(pipe)
    trained = [png(folder / "validation" / "step-000003" / f"{i:02d}.png") for i in range(2)]
    for ours, theirs, base in zip(trained, reloaded, base_images):
        assert np.abs(ours - theirs).max() <= 1
        assert np.abs(ours - base).mean() > 1  # training changed the model


def test_full_weights_load_with_from_pretrained(tiny_sd_dir: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    workspace = write_refs(tmp_path)
    finetune(config(tiny_sd_dir, preset="dreambooth-te", lora=False, num_validation_images=1, learning_rate=1e-3),
             workspace)
    folder = workspace.model_dir(HUMMINGBIRD, "dreambooth-te")
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of sks red feeder/flower", height=64, width=64, num_inference_steps=2, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert np.abs(np.asarray(image, dtype=np.int16) - png(folder / "validation" / "step-000002" / "00.png")).max() <= 1
    base = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    assert not torch.equal(pipe.unet.conv_in.weight, base.unet.conv_in.weight)
    trained, original = pipe.text_encoder.state_dict(), base.text_encoder.state_dict()
    assert any(not torch.equal(trained[k], original[k]) for k in original)
    assert all(torch.equal(v, base.vae.state_dict()[k]) for k, v in pipe.vae.state_dict().items())  # frozen


# --- Checkpoints, resume, failures --------------------------------------------------------------------------------


def test_three_steps_plus_resume_equals_six_steps(tiny_sd_dir: Path, rigged, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    flags = [rigged.flags["res-a"]]
    straight, split = write_refs(tmp_path / "a"), write_refs(tmp_path / "b")
    common = {"preset": "sfsl", "checkpointing_steps": 3, "sfsl_max_timestep": 600, "learning_rate": 1e-3}
    finetune(config(tiny_sd_dir, steps=6, **common), straight, flags)
    finetune(config(tiny_sd_dir, steps=3, **common), split, flags)
    with pytest.raises(SpurgenError, match="other settings"):
        finetune(config(tiny_sd_dir, steps=6, resume=True, **{**common, "learning_rate": 2e-3}), split, flags)
    [result] = finetune(config(tiny_sd_dir, steps=6, resume=True, **common), split, flags)
    assert (result.status, result.steps) == ("resumed", 6)
    a = load_file(str(straight.model_dir(HUMMINGBIRD, "sfsl") / "pytorch_lora_weights.safetensors"))
    b = load_file(str(split.model_dir(HUMMINGBIRD, "sfsl") / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-exact, as the README claims
    assert loss_rows(straight.model_dir(HUMMINGBIRD, "sfsl")) == loss_rows(split.model_dir(HUMMINGBIRD, "sfsl"))
    checkpoints = sorted(p.name for p in (split.model_dir(HUMMINGBIRD, "sfsl") / "checkpoints").iterdir())
    assert checkpoints == ["checkpoint-3", "checkpoint-6"]
    # a finished run is skipped, not retrained
    [again] = finetune(config(tiny_sd_dir, steps=6, **common), split, flags)
    assert again.status == "skipped"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_sd_dir: Path, tmp_path: Path, monkeypatch) -> None:
    workspace = write_refs(tmp_path)
    cfg = config(tiny_sd_dir, preset="dreambooth", steps=4, checkpointing_steps=2, checkpoints_total_limit=1)
    healthy = Trainer.losses

    def poisoned(self: Trainer, step: int, micro: int):
        losses = healthy(self, step, micro)
        if step == 2:
            losses.total = losses.total * float("nan")
        return losses

    monkeypatch.setattr(Trainer, "losses", poisoned)
    with pytest.raises(SpurgenError, match=r"loss is not finite at step 3.*checkpoint-2.*Lower --learning-rate.*bf16"):
        finetune(cfg, workspace)
    folder = workspace.model_dir(HUMMINGBIRD, "dreambooth")
    info = manifest(folder)
    assert info["status"] == "failed" and info["last_checkpoint"].endswith("checkpoint-2") and info["steps"] == 2
    assert not (folder / "pytorch_lora_weights.safetensors").exists()
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["checkpoint-2"]
    monkeypatch.setattr(Trainer, "losses", healthy)
    with pytest.raises(SpurgenError, match="unfinished run.*--resume"):
        finetune(cfg, workspace)
    [result] = finetune(resolve_config(FinetuneConfig, {}, "finetune", {**vars(cfg), "resume": True}), workspace)
    assert (result.status, result.steps, manifest(folder)["status"]) == ("resumed", 4, "complete")


class _InfiniteGradient(torch.autograd.Function):
    """Zero in the forward pass and an infinite gradient in the backward pass: a finite loss that overflows."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.shape = x.shape
        return x.sum() * 0

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return torch.full(ctx.shape, float("inf"), dtype=grad.dtype, device=grad.device)


def test_infinite_gradients_stop_before_the_step_and_keep_the_last_good_checkpoint(tiny_sd_dir: Path, tmp_path: Path,
                                                                                    monkeypatch) -> None:
    from safetensors.torch import load_file

    workspace = write_refs(tmp_path)
    cfg = config(tiny_sd_dir, preset="dreambooth", steps=3, checkpointing_steps=1, checkpoints_total_limit=5)
    healthy = Trainer.losses

    def overflowing(self: Trainer, step: int, micro: int):
        losses = healthy(self, step, micro)
        if step == 1:
            losses.total = losses.total + _InfiniteGradient.apply(self.trained_parameters[0])
        return losses

    monkeypatch.setattr(Trainer, "losses", overflowing)
    with pytest.raises(SpurgenError, match=r"gradient norm is not finite at step 2.*checkpoint-1.*Lower "
                                           r"--learning-rate.*bf16"):
        finetune(cfg, workspace)
    folder = workspace.model_dir(HUMMINGBIRD, "dreambooth")
    assert manifest(folder)["status"] == "failed"
    # the step was not taken: no checkpoint of poisoned weights poses as the last good one
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["checkpoint-1"]
    weights = load_file(folder / "checkpoints" / "checkpoint-1" / "unet.safetensors")
    assert weights and all(torch.isfinite(t).all() for t in weights.values())


def test_class_images_are_generated_once_and_reused(tiny_sd_dir: Path, tmp_path: Path) -> None:
    workspace = write_refs(tmp_path)
    finetune(config(tiny_sd_dir, preset="dreambooth"), workspace)
    cache = sorted(workspace.cache_dir("class-images").rglob("*.png"))
    stamps = [p.stat().st_mtime_ns for p in cache]
    assert len(cache) == 2
    assert manifest(workspace.model_dir(HUMMINGBIRD, "dreambooth"))["prior_preservation"]["generated_now"] == 2
    finetune(config(tiny_sd_dir, preset="dreambooth-te"), workspace)
    assert manifest(workspace.model_dir(HUMMINGBIRD, "dreambooth-te"))["prior_preservation"]["generated_now"] == 0
    assert [p.stat().st_mtime_ns for p in cache] == stamps
    # more images than cached: only the missing one is generated
    finetune(config(tiny_sd_dir, preset="dreambooth", run_name="more", num_class_images=3), workspace)
    assert manifest(workspace.model_dir(HUMMINGBIRD, "more"))["prior_preservation"]["generated_now"] == 1


def test_class_image_cache_is_keyed_by_content_not_by_how_the_path_is_written(tiny_sd_dir: Path, tmp_path: Path,
                                                                             monkeypatch) -> None:
    workspace = write_refs(tmp_path / "ws")
    finetune(config(tiny_sd_dir, preset="dreambooth", run_name="absolute"), workspace)
    monkeypatch.chdir(tiny_sd_dir.parent.parent)
    relative = Path(tiny_sd_dir.parent.name) / tiny_sd_dir.name
    finetune(config(relative, preset="dreambooth", run_name="relative"), workspace)
    assert manifest(workspace.model_dir(HUMMINGBIRD, "relative"))["base_model"] == str(relative)
    assert manifest(workspace.model_dir(HUMMINGBIRD, "relative"))["prior_preservation"]["generated_now"] == 0
    folders = [p for p in workspace.cache_dir("class-images").iterdir() if p.is_dir()]
    assert len(folders) == 1
    # the path is provenance only: the first run's spelling, not part of the key
    assert json.loads((folders[0] / "cache.json").read_text())["base_model"] == str(tiny_sd_dir)


def test_several_classes_in_one_call(tiny_sd_dir: Path, tmp_path: Path) -> None:
    workspace = write_refs(tmp_path)
    write_refs(tmp_path, count=2, cls="105")
    results = finetune(config(tiny_sd_dir, classes=["hummingbird", "koala"], preset="dreambooth-te",
                              checkpointing_steps=2), workspace)
    assert [(r.cls.index, r.status) for r in results] == [(94, "trained"), (105, "trained")]
    koala = manifest(results[1].folder)
    assert koala["noun"] == "eucalyptus plants" and len(koala["references"]) == 2
    for result in results:  # each checkpoint holds its own class's trained parameters, nothing else
        names = {p.name for p in (result.folder / "checkpoints" / "checkpoint-2").iterdir()}
        assert {"unet.safetensors", "text_encoder.safetensors", "spurgen_state.json", "optimizer.bin"} <= names
        assert not any(name.startswith("model") for name in names)


def _with_nan(losses: Any) -> Any:
    losses.total = losses.total * float("nan")
    return losses


def test_8bit_adam_when_bitsandbytes_is_installed(tiny_sd_dir: Path, tmp_path: Path) -> None:
    bitsandbytes = pytest.importorskip("bitsandbytes")
    workspace = write_refs(tmp_path)
    cfg = config(tiny_sd_dir, preset="dreambooth", use_8bit_adam=True)
    setup = prepare_finetune(cfg, workspace)
    trainer = setup.trainer(setup.plans[0], cfg, workspace)
    try:
        assert isinstance(trainer.optimizer.optimizer, bitsandbytes.optim.AdamW8bit)
        assert not trainer.skips_on_device  # it cannot skip a step on the device: the flag is read on the host
        trainer.train_step(0)
        [row] = trainer.read_rows()
        assert np.isfinite(row["loss"])
        healthy = trainer.losses
        trainer.losses = lambda step, micro: _with_nan(healthy(step, micro))
        weights = [p.detach().clone() for p in trainer.trained_parameters]
        trainer.train_step(1)  # left out after the host's read of the flag
        assert all(torch.equal(w, p) for w, p in zip(weights, trainer.trained_parameters))
        with pytest.raises(SpurgenError, match="loss is not finite at step 2"):
            trainer.read_rows()
    finally:
        trainer.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_train_one_loadable_model(tiny_sd_dir: Path, rigged, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    workspace = write_refs(tmp_path)
    # `accelerate launch --cpu --num_processes 2` starts one process unless mpirun is configured; the
    # multi-GPU launcher (torchrun) starts two, which spurgen joins into one gloo run on a machine without GPUs.
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "spurgen",
        "finetune",
        "-w",
        str(workspace.root),
        "--classes",
        "94",
        "--model",
        str(tiny_sd_dir),
        "--steps",
        "2",
        "--num-class-images",
        "3",
        "--sample-steps",
        "2",
        "--num-validation-images",
        "0",
        "--rank",
        "4",
        "--sfsl-model",
        "res-a",
        f"--classifier={rigged.flags['res-a']}",
        "--sfsl-max-timestep",
        "999",
        "--sfsl-every",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = workspace.model_dir(HUMMINGBIRD, "sfsl")
    info = manifest(folder)
    assert info["status"] == "complete" and info["distributed"]["processes"] == 2
    assert info["loss"]["sfsl_rows"] == 4  # 2 steps x 2 processes x 1 row
    assert len(list(workspace.cache_dir("class-images").rglob("*.png"))) == 3  # split between the processes
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.load_lora_weights(folder)


# --- Bad input: clear messages, nothing written ---------------------------------------------------------------------


def _written(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")} if root.exists() else set()


def test_missing_references_tell_the_user_to_run_select_refs(tiny_sd_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SpurgenError, match="spurgen select-refs --classes 94"):
        finetune(config(tiny_sd_dir), Workspace(tmp_path / "empty"))
    assert not (tmp_path / "empty").exists()
    workspace = write_refs(tmp_path / "ws")
    atomic_write_json(workspace.refs_dir(HUMMINGBIRD) / "selection.json", {"selected": []})
    before = _written(workspace.root)
    with pytest.raises(SpurgenError, match="selected none.*select-refs"):
        finetune(config(tiny_sd_dir), workspace)
    assert _written(workspace.root) == before


def test_bad_base_model_and_settings_fail_before_writing(tiny_sd_dir: Path, tmp_path: Path) -> None:
    workspace = write_refs(tmp_path)
    before = _written(workspace.root)
    with pytest.raises(SpurgenError, match="base model folder .*nowhere.* does not exist"):
        finetune(config(tiny_sd_dir, model=str(tmp_path / "nowhere")), workspace)
    with pytest.raises(SpurgenError, match="not a multiple of 4"):
        finetune(config(tiny_sd_dir, resolution=66), workspace)
    with pytest.raises(SpurgenError, match="class-sfsl-weight: unknown class 'hummingbrid'; did you mean "
                                           "'hummingbird'"):
        finetune(config(tiny_sd_dir, class_sfsl_weight={"hummingbrid": 0.2}), workspace)
    assert _written(workspace.root) == before
    with pytest.raises(SpurgenError, match="--rank must be at least 1, got 0"):
        config(tiny_sd_dir, rank=0)
    with pytest.raises(SpurgenError, match="--no-train-text-encoder changes what preset 'sfsl' trains; pass "
                                           "--run-name"):
        config(tiny_sd_dir, train_text_encoder=False)
    with pytest.raises(SpurgenError, match="unknown placeholder"):
        config(tiny_sd_dir, instance_prompt="a photo of {identifer} {noun}")


def test_sfsl_model_without_last_linear_layer_is_refused(tiny_sd_dir: Path, tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("dla46_c", pretrained=False)  # its head is a 1x1 convolution
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "dla.safetensors"))
    workspace = write_refs(tmp_path / "ws")
    before = _written(workspace.root)
    with pytest.raises(SpurgenError, match="classifier 'conv' has no last linear layer"):
        finetune(config(tiny_sd_dir, sfsl_model="conv"), workspace, [f"conv=dla46_c@{tmp_path / 'dla.safetensors'}"])
    assert _written(workspace.root) == before


def test_unwritable_workspace_is_reported_and_nothing_is_corrupted(tiny_sd_dir: Path, tmp_path: Path) -> None:
    workspace = write_refs(tmp_path)
    (workspace.root / "models").write_text("a file where the models folder should be")
    before = {p: p.read_bytes() for p in workspace.root.rglob("*") if p.is_file()}
    with pytest.raises(SpurgenError, match="cannot write .*models"):
        finetune(config(tiny_sd_dir, preset="dreambooth"), workspace)
    assert {p: p.read_bytes() for p in workspace.root.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("flag, package", [("use_8bit_adam", "bitsandbytes"), ("tensorboard", "tensorboard")])
def test_missing_optional_package_is_named(flag: str, package: str, tiny_sd_dir: Path, tmp_path: Path,
                                           monkeypatch) -> None:
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else find_spec(name, *a))
    with pytest.raises(SpurgenError, match=f"needs {package}, which is not installed; pip install {package}"):
        finetune(config(tiny_sd_dir, preset="dreambooth", **{flag: True}), write_refs(tmp_path))


# --- The command line, spurgen.toml, and the neural PCA feature -------------------------------------------------------


def test_cli_from_select_refs_to_finetune_with_per_class_kappa(tiny_sd_dir: Path, rigged, tmp_path: Path) -> None:
    runner = CliRunner()
    ws = tmp_path / "ws"
    flags = [f"--classifier={f}" for f in rigged.flags.values()]
    done = runner.invoke(
        app,
        [
            "select-refs",
            "-w",
            str(ws),
            "--dataset",
            str(rigged.dataset),
            "--classes",
            "hummingbird",
            "-k",
            "3",
            "--classifiers",
            "res-a,conv-b,vit-c",
            "--num-workers",
            "0",
            *flags,
        ],
    )
    assert done.exit_code == 0, done.output
    # the base model and the per-class kappa come from spurgen.toml; the class table accepts names and indices
    (ws / "spurgen.toml").write_text(f'model = "{tiny_sd_dir}"\n\n[finetune]\nsteps = 2\n\n'
                                     '[finetune.class-sfsl-weight]\n94 = 0.25\nkoala = 0.5\n')
    args = ["finetune", "-w", str(ws), "--classes", "hummingbird", "--sfsl-model", "res-a", "--num-class-images", "2",
            "--sample-steps", "2", "--num-validation-images", "0", "--rank", "4", "--sfsl-max-timestep", "999", *flags]
    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    assert "finetune" in done.output and "models written under" in done.output
    info = manifest(ws / "models" / "94-hummingbird" / "sfsl")
    assert info["sfsl"]["weight"] == 0.25 and info["base_model"] == str(tiny_sd_dir) and info["steps"] == 2
    assert len(info["references"]) == 3


def test_npca_feature_fitted_by_fit_npca(tiny_sd_dir: Path, rigged, tmp_path: Path) -> None:
    from spurgen.finetune.npca import NeuralPCA

    ws = write_refs(tmp_path)
    images = rigged.files[94][0].parent
    cfg = config(tiny_sd_dir, preset="sfsl", sfsl_feature="npca", sfsl_npca_components="spurious")
    with pytest.raises(SpurgenError, match="no neural PCA .*run spurgen fit-npca"):
        finetune(cfg, ws, [rigged.flags["res-a"]])
    done = CliRunner().invoke(
        app,
        [
            "fit-npca",
            "-w",
            str(ws.root),
            "--classes",
            "hummingbird",
            "--images",
            str(images),
            "--sfsl-model",
            "res-a",
            f"--classifier={rigged.flags['res-a']}",
            "--device",
            "cpu",
        ],
    )
    assert done.exit_code == 0, done.output
    npca = NeuralPCA.load(ws.root / "npca" / "res-a" / "94-hummingbird.safetensors")
    assert npca.num_images == 8 and npca.components.shape == (96, 96) and npca.class_index == 94
    assert torch.all(npca.eigenvalues[:-1] >= npca.eigenvalues[1:] - 1e-6)
    contributions = torch.randn(5, 96)
    expected = ((contributions - npca.mean) @ npca.components[:, [1, 16]]) * npca.components[:, [1, 16]].sum(0)
    assert torch.allclose(npca.coordinates(contributions, [1, 16]), expected)
    [result] = finetune(cfg, ws, [rigged.flags["res-a"]])
    info = manifest(result.folder)
    assert info["sfsl"]["feature"] == "npca" and info["sfsl"]["npca_components"] == "spurious"
    assert all(np.isfinite(float(row["sfsl"])) for row in loss_rows(result.folder))


# --- SFSL's cost-cutting options: --sfsl-every and --sfsl-decoder ------------------------------------------------


def test_sfsl_every_applies_the_loss_on_every_nth_step_with_weight_kappa_n(tiny_sd_dir: Path, rigged,
                                                                           tmp_path: Path) -> None:
    workspace = write_refs(tmp_path)
    # without the per-row weight, the logged (unweighted) distance is what the total carries
    cfg = config(tiny_sd_dir, preset="sfsl", steps=5, sfsl_every=2, sfsl_weight=0.1, checkpointing_steps=5,
                 sfsl_row_weighting="none")
    [result] = finetune(cfg, workspace, [rigged.flags["res-a"]])
    rows = loss_rows(result.folder)
    # steps 1, 3, 5 (0-based 0, 2, 4) decode their one instance row (bound 999); steps 2 and 4 none
    assert [int(r["sfsl_rows"]) for r in rows] == [1, 0, 1, 0, 1]
    assert [r["sfsl"] != "" for r in rows] == [True, False, True, False, True]
    for row in rows:  # the total carries kappa * N * L_SFSL on the steps that have it
        sfsl = float(row["sfsl"]) if row["sfsl"] else 0.0
        assert float(row["loss"]) == pytest.approx(float(row["inst"]) + float(row["prior"]) + 0.1 * 2 * sfsl, rel=1e-5)
    info = manifest(result.folder)
    assert info["sfsl"]["every"] == 2 and info["sfsl"]["decoder"] == "vae" and info["loss"]["sfsl_rows"] == 3
    # --sfsl-every shapes the trajectory: a checkpoint saved with N = 2 does not resume with N = 3
    with pytest.raises(SpurgenError, match=r"with other settings \(--sfsl-every 2 in the run, --sfsl-every 3"):
        finetune(config(tiny_sd_dir, preset="sfsl", steps=6, sfsl_every=3, sfsl_weight=0.1, sfsl_row_weighting="none",
                        resume=True), workspace, [rigged.flags["res-a"]])


def test_sfsl_decoder_taesd_decodes_and_passes_gradients_to_lora(tiny_sd_dir: Path, rigged, tmp_path: Path,
                                                                 monkeypatch) -> None:
    from diffusers import AutoencoderTiny

    from spurgen.testing import build_tiny_autoencoder

    taesd = build_tiny_autoencoder(tmp_path / "taesd", "tiny")
    trainer = sfsl_trainer(tiny_sd_dir, write_refs(tmp_path / "ws"), rigged, sfsl_decoder=str(taesd))

    def vae_decode(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("SFSL decoded through the VAE although --sfsl-decoder was given")

    monkeypatch.setattr(trainer.parts.vae, "decode", vae_decode)
    decoder = trainer.sfsl_decoder
    assert isinstance(decoder, AutoencoderTiny)
    seen = []
    decode = decoder.decode
    monkeypatch.setattr(
        decoder, "decode", lambda latents, *a, **k: seen.append(latents.shape) or decode(latents, *a, **k)
    )
    try:
        losses = trainer.losses(step=0, micro=0)
        # the scaled latents go in unchanged (TAESD's scaling_factor is 1.0): 2 rows of 4 x 32 x 32
        assert seen == [(2, 4, 32, 32)] and losses.sfsl_rows == 2 and torch.isfinite(losses.sfsl)
        losses.sfsl.backward()
        for model in (trainer.unet, trainer.text_encoder):
            grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name]
            assert grads and all(g is not None for g in grads)
            assert sum(float(g.abs().sum()) for g in grads) > 0
        assert all(p.grad is None for p in decoder.parameters())  # frozen
    finally:
        trainer.close()


def test_bad_sfsl_every_and_decoder_fail_with_one_line_before_writing(
    tiny_sd_dir: Path, rigged, tmp_path: Path
) -> None:
    workspace = write_refs(tmp_path / "ws")
    before = _written(workspace.root)
    args = [
        "finetune",
        "-w",
        str(workspace.root),
        "--model",
        str(tiny_sd_dir),
        "--classes",
        "94",
        "--sfsl-model",
        "res-a",
        f"--classifier={rigged.flags['res-a']}",
        "--steps",
        "1",
    ]
    runner = CliRunner()
    for extra, message in [
        (["--sfsl-every", "0"], "--sfsl-every must be at least 1, got 0"),
        (["--sfsl-decoder", " "], "--sfsl-decoder is empty"),
        (["--sfsl-decoder", str(tmp_path / "nowhere")], "--sfsl-decoder folder"),
        (["--sfsl-decoder", str(tiny_sd_dir / "vae")], "holds AutoencoderKL, not an AutoencoderTiny"),
    ]:
        done = runner.invoke(app, [*args, *extra])
        assert done.exit_code == 2, done.output
        assert message in done.output and "Traceback" not in done.output
        assert (
            len([line for line in done.output.splitlines() if line.strip()]) <= 2
        )  # one message (wrapped at most once)
    assert _written(workspace.root) == before


# --- SFSL's profile over t, the step's diagnostics, and the step without host reads -----------------------------

# stable-diffusion-v1-5/stable-diffusion-v1-5's scheduler/scheduler_config.json as published: it names no
# prediction type, so diffusers' default, epsilon, applies.
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                  "clip_sample": False}
WORLD_SD = Path(__file__).resolve().parents[1] / "spurgen" / "world" / "assets" / "sd"


def noise_scheduler(folder: Path) -> Any:
    """The training noise scheduler of a base model folder, loaded as finetune loads it."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(folder, subfolder="scheduler")


@pytest.fixture(scope="module")
def sd15_scheduler(tmp_path_factory) -> Any:
    folder = tmp_path_factory.mktemp("sd15")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER))
    return noise_scheduler(folder)


def test_sfsl_gradient_factor_over_t_on_sd15_and_the_world(sd15_scheduler) -> None:
    from spurgen.finetune.diffusion import alpha_bar, estimate_gain, sfsl_row_weight

    t = torch.tensor([0, 200, 400, 600, 800, 999])
    # SD 1.5 predicts epsilon: z0_hat = (z_t - sqrt(1 - abar) eps_hat) / sqrt(abar) scales SFSL's gradient at the
    # UNet's output by sqrt((1 - abar) / abar), which method.md §2.5 tabulates
    assert sd15_scheduler.config.prediction_type == "epsilon"
    assert estimate_gain(sd15_scheduler, t).tolist() == pytest.approx([0.0292, 0.572, 1.164, 2.285, 5.111, 14.61],
                                                                      rel=2e-3)
    world = noise_scheduler(WORLD_SD)
    assert world.config.prediction_type == "v_prediction"  # linear betas 1e-4..0.02: at most 1
    assert estimate_gain(world, t).tolist() == pytest.approx([0.0100, 0.586, 0.898, 0.987, 0.9992, 1.0], rel=2e-3)
    everything = torch.arange(1000)
    for scheduler in (sd15_scheduler, world):
        v_profile = (1 - alpha_bar(scheduler, everything).flatten()).sqrt()
        # v-profile: weight x factor is v-prediction's sqrt(1 - abar_t) on both, so at most 1 at every t
        factor = sfsl_row_weight(scheduler, everything, "v-profile") * estimate_gain(scheduler, everything)
        torch.testing.assert_close(factor, v_profile)
        assert float(factor.max()) <= 1
        # none: the parametrization's own factor
        torch.testing.assert_close(sfsl_row_weight(scheduler, everything, "none"), torch.ones(1000))
    torch.testing.assert_close(sfsl_row_weight(sd15_scheduler, t, "v-profile"),
                               alpha_bar(sd15_scheduler, t).flatten().sqrt())
    torch.testing.assert_close(sfsl_row_weight(world, t, "v-profile"), torch.ones(len(t)))
    # sample prediction passes the gradient unchanged (factor 1): its weight is the profile itself
    sample = noise_scheduler_like(world, prediction_type="sample")
    torch.testing.assert_close(sfsl_row_weight(sample, everything, "v-profile") * estimate_gain(sample, everything),
                               (1 - alpha_bar(sample, everything).flatten()).sqrt())


def test_sfsl_defaults_are_the_paper_schedule_with_the_v_profile_and_bad_weightings_are_refused() -> None:
    defaults = FinetuneConfig()
    assert (defaults.sfsl_every, defaults.sfsl_row_weighting) == (1, "v-profile")
    with pytest.raises(SpurgenError, match="--sfsl-row-weighting must be 'v-profile' or 'none', got 'flat'"):
        resolve_config(FinetuneConfig, {}, "finetune", {"sfsl_row_weighting": "flat"})


def noise_scheduler_like(scheduler: Any, **changes: Any) -> Any:
    return type(scheduler).from_config({**scheduler.config, **changes})


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("weighting", ["v-profile", "none"])
def test_weighted_sfsl_gradient_at_the_unet_output_has_the_profile(kind: str, weighting: str, sd15_scheduler) -> None:
    """Autograd through the one-step estimate and SpuriousFeatureLoss.loss: every row's distance has the same
    gradient g at z0_hat, so the gradient at the UNet output of row r is (1/R) x weight x factor of its t, times g."""
    from spurgen.finetune.diffusion import alpha_bar, estimate_gain
    from spurgen.finetune.sfsl import SpuriousFeatureLoss

    scheduler = noise_scheduler_like(sd15_scheduler, prediction_type=kind)
    t = torch.tensor([0, 250, 400, 600, 800, 999])
    rows = len(t)
    generator = torch.Generator().manual_seed(0)
    noisy = torch.randn(rows, 4, 8, 8, generator=generator)
    output = torch.randn(rows, 4, 8, 8, generator=generator, requires_grad=True)
    g = torch.randn(4, 8, 8, generator=generator)
    z0 = predicted_original(scheduler, noisy, output, t)
    distances = (z0 * g).flatten(1).sum(1)
    loss = SpuriousFeatureLoss.__new__(SpuriousFeatureLoss)  # only its weighting: no classifier needed
    loss.row_weighting = weighting
    SpuriousFeatureLoss.loss(loss, distances, scheduler, t).backward()
    measured = output.grad.flatten(1).norm(dim=1) * rows / g.norm()
    expected = ((1 - alpha_bar(scheduler, t).flatten()).sqrt() if weighting == "v-profile"
                else estimate_gain(scheduler, t))
    torch.testing.assert_close(measured, expected, rtol=1e-4, atol=1e-6)
    if kind == "epsilon" and weighting == "none":  # the paper's loss on SD 1.5: the noisiest row pushes 500x harder
        assert float(measured[-1] / measured[0]) > 400


def test_step_diagnostics_are_logged_and_summarised(tiny_sd_dir: Path, rigged, tmp_path: Path) -> None:
    workspace = write_refs(tmp_path)
    # a clip norm below any gradient: every step is clipped
    [result] = finetune(config(tiny_sd_dir, preset="sfsl", steps=3, max_grad_norm=1e-6, sfsl_weight=10.0), workspace,
                        [rigged.flags["res-a"]])
    rows = loss_rows(result.folder)
    buckets = ["sfsl_t0-249", "sfsl_t250-499", "sfsl_t500-749", "sfsl_t750-999"]
    assert list(rows[0]) == ["step", "loss", "inst", "prior", "sfsl", "sfsl_rows", *buckets, "grad_norm",
                             "sfsl_grad_share", "clipped", "lr"]
    for row in rows:
        assert float(row["grad_norm"]) > 1e-6 and row["clipped"] == "1"
        assert 0 < float(row["sfsl_grad_share"]) <= 1
        # batch 1: SFSL's one row lands in one bucket, which shows its distance
        filled = [float(row[name]) for name in buckets if row[name] != ""]
        assert filled == [pytest.approx(float(row["sfsl"]))]
    info = manifest(result.folder)
    assert info["sfsl"]["row_weighting"] == "v-profile" and info["sfsl"]["row_weight"] == "sqrt(abar_t)"
    assert info["loss"]["clipped_fraction"] == 1.0 and info["loss"]["grad_norm"]["mean"] > 0
    assert set(info["loss"]["last"]) == {"loss", "inst", "prior", "sfsl"}
    assert "row weight sqrt(abar_t)" in (result.folder / "README.md").read_text()
    # a clip norm above every gradient: none is
    [loose] = finetune(config(tiny_sd_dir, preset="dreambooth", steps=2, max_grad_norm=1e6), workspace)
    assert [r["clipped"] for r in loss_rows(loose.folder)] == ["0", "0"]
    assert all(r["sfsl_grad_share"] == "" and r["sfsl_t0-249"] == "" for r in loss_rows(loose.folder))
    assert manifest(loose.folder)["loss"]["clipped_fraction"] == 0.0


def _reads_every(monkeypatch, steps: int) -> None:
    """Trainers read their statistics every ``steps`` steps, as on an accelerator."""
    init = Trainer.__init__

    def batched(self: Trainer, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.read_every = steps

    monkeypatch.setattr(Trainer, "__init__", batched)


def test_batched_reads_change_nothing_but_when_the_log_is_read(tiny_sd_dir: Path, rigged, tmp_path: Path,
                                                              monkeypatch) -> None:
    from safetensors.torch import load_file

    common = {"preset": "sfsl", "steps": 5, "checkpointing_steps": 0}
    every_step = write_refs(tmp_path / "every")
    [a] = finetune(config(tiny_sd_dir, **common), every_step, [rigged.flags["res-a"]])
    _reads_every(monkeypatch, 4)
    batched = write_refs(tmp_path / "batched")
    [b] = finetune(config(tiny_sd_dir, **common), batched, [rigged.flags["res-a"]])
    assert loss_rows(a.folder) == loss_rows(b.folder) and len(loss_rows(b.folder)) == 5
    wa = load_file(str(a.folder / "pytorch_lora_weights.safetensors"))
    wb = load_file(str(b.folder / "pytorch_lora_weights.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_non_finite_step_is_skipped_on_the_device_and_reported_at_the_next_read(tiny_sd_dir: Path, tmp_path: Path,
                                                                                  monkeypatch) -> None:
    from spurgen.finetune.trainer import NonFiniteLoss

    workspace = write_refs(tmp_path)
    cfg = config(tiny_sd_dir, preset="dreambooth", steps=4)
    healthy = Trainer.losses

    def poisoned(self: Trainer, step: int, micro: int) -> Any:
        losses = healthy(self, step, micro)
        return _with_nan(losses) if step == 1 else losses

    monkeypatch.setattr(Trainer, "losses", poisoned)
    setup = prepare_finetune(cfg, workspace)
    trainer = setup.trainer(setup.plans[0], cfg, workspace)
    try:
        assert trainer.skips_on_device  # fused AdamW: the flag never has to be read on the host
        trainer.train_step(0)
        weights = [p.detach().clone() for p in trainer.trained_parameters]
        state = {k: v.clone() for k, v in trainer.optimizer.optimizer.state[trainer.trained_parameters[0]].items()}
        trainer.train_step(1)
        # neither the weights nor AdamW's moments and step count saw the step
        assert all(torch.equal(w, p) for w, p in zip(weights, trainer.trained_parameters))
        after = trainer.optimizer.optimizer.state[trainer.trained_parameters[0]]
        assert all(torch.equal(state[k], after[k]) for k in state) and float(after["step"]) == 1
        trainer.train_step(2)  # later good steps train on
        assert not all(torch.equal(w, p) for w, p in zip(weights, trainer.trained_parameters))
        with pytest.raises(NonFiniteLoss, match=r"loss is not finite at step 2 \(loss nan") as caught:
            trainer.read_rows()
        assert caught.value.step == 1 and [row["step"] for row in caught.value.rows] == [1]
    finally:
        trainer.close()
    # through finetune with reads every 4 steps: the step is named, and the manifest stops before it
    _reads_every(monkeypatch, 4)
    with pytest.raises(SpurgenError, match=r"loss is not finite at step 2.*no checkpoint was saved yet"):
        finetune(cfg, workspace)
    info = manifest(workspace.model_dir(HUMMINGBIRD, "dreambooth"))
    assert info["status"] == "failed" and info["steps"] == 1 and info["loss"]["steps_logged"] == 1


def test_a_step_reads_no_tensor_on_the_host(tiny_sd_dir: Path, rigged, tmp_path: Path, monkeypatch) -> None:
    """On a GPU each read of a tensor's value by the host waits for the device: a step must make none (the CPU
    cannot show the wait, but it shows the calls from Python; operators that wait inside, such as nonzero, are
    kept out of the step by drawing the timesteps on the host). Only read_rows reads, once per batch of steps."""
    cfg = config(tiny_sd_dir, preset="sfsl", steps=4, sfsl_max_timestep=500, gradient_accumulation_steps=2)
    workspace = write_refs(tmp_path)
    setup = prepare_finetune(cfg, workspace, [rigged.flags["res-a"]])
    trainer = setup.trainer(setup.plans[0], cfg, workspace)
    reads = []

    def refused(name: str) -> Any:
        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            reads.append(name)
            raise AssertionError(f"the step read a tensor on the host ({name})")
        return read

    try:
        with monkeypatch.context() as patch:
            for name in ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__"):
                patch.setattr(torch.Tensor, name, refused(name))
            for step in range(4):
                trainer.train_step(step)
        assert not reads
        rows = trainer.read_rows()
        assert [row["step"] for row in rows] == [1, 2, 3, 4] and all(np.isfinite(row["loss"]) for row in rows)
    finally:
        trainer.close()
