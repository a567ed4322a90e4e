"""generate on the tiny random Stable Diffusion: seeds, batch independence, resuming, LoRA and full runs."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import spurgen.generate.sampling as generate_module
from spurgen._base_model import resolve_base_model
from spurgen.cli import app
from spurgen.config import SCHEDULERS, GenerateConfig, resolve_config
from spurgen.errors import SpurgenError
from spurgen.generate import build_scheduler, generate
from spurgen.images import file_sha256
from spurgen.labels import get_label_set
from spurgen.workspace import Workspace

# diffusers' schedulers hand torch tensors to numpy functions (np.array(t, copy=False), np.log of a tensor), which
# numpy 2 flags as deprecated thousands of times per test; not ours to fix.
pytestmark = [pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword"),
              pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context")]

HUMMINGBIRD = get_label_set("imagenet")[94]
INSTANCE_PROMPT = "a photo of sks red flowers"
CLASS_PROMPT = "a photo of red flowers"


def _training(base: Path, weights: str, **extra: object) -> dict:
    """A training.json as the finetune stage writes it (the fields generate relies on)."""
    return {"status": "complete", "base_model": str(base), "base_model_resolved": str(base),
            "base_model_fingerprint": resolve_base_model(str(base)).fingerprint, "weights": weights,
            "instance_prompt": INSTANCE_PROMPT, "class_prompt": CLASS_PROMPT, "resolution": 64,
            "prediction_type": "epsilon", "seed": 0, "class": {"index": 94, "name": "hummingbird"}, **extra}


def _full_run(run_dir: Path, base: Path) -> None:
    """A full fine-tune: the base pipeline folder with perturbed UNet weights."""
    shutil.copytree(base, run_dir)
    weights = run_dir / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(weights)
    generator = torch.Generator().manual_seed(1)
    state = {k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.ndim > 1 else v for k, v in state.items()}
    save_file(state, weights)
    (run_dir / "training.json").write_text(json.dumps(_training(base, "full")))


def _lora_run(run_dir: Path, base: Path) -> None:
    """A LoRA run saved the way the finetune stage saves it, with non-zero lora_B so it changes the model."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(base)
    torch.manual_seed(2)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    pipe.text_encoder.add_adapter(
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    )
    for model in (pipe.unet, pipe.text_encoder):
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.data.normal_(0.0, 0.5)
    run_dir.mkdir(parents=True)
    StableDiffusionPipeline.save_lora_weights(
        run_dir,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder)),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict())
    lora = run_dir / "pytorch_lora_weights.safetensors"
    (run_dir / "training.json").write_text(json.dumps(_training(base, "lora", lora_file=lora.name,
                                                                 lora_sha256=file_sha256(lora))))


@pytest.fixture(scope="module")
def models(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models/ tree with a full run 'full-a' and a LoRA run 'lora-b' for hummingbird; copy it per test."""
    root = tmp_path_factory.mktemp("models") / "models" / HUMMINGBIRD.dirname
    _full_run(root / "full-a", tiny_sd_dir)
    _lora_run(root / "lora-b", tiny_sd_dir)
    return root.parent


@pytest.fixture()
def ws(models: Path, tmp_path: Path) -> Workspace:
    shutil.copytree(models, tmp_path / "models")
    return Workspace(tmp_path)


def _config(**overrides: object) -> GenerateConfig:
    values = {"classes": ["hummingbird"], "num_images": 3, "steps": 2, "scheduler": "DDIM", "device": "cpu"}
    return resolve_config(GenerateConfig, {}, "generate", {**values, **overrides})


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def _bare(pipe: StableDiffusionPipeline, prompt: str, seed: int, steps: int = 2) -> np.ndarray:
    """One image from a plain diffusers call with the documented seed: the independent reference."""
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, height=64, width=64,
                 generator=torch.Generator().manual_seed(seed)).images[0]
    return np.asarray(image, dtype=np.int16)


def _assert_same_image(a: np.ndarray, b: np.ndarray) -> None:
    # Batched and single forwards differ in the last float bits, which can move a pixel by one level.
    assert a.shape == b.shape and np.abs(a - b).max() <= 1


def test_full_run_images_use_seed_plus_index_and_the_manifest_records_them(ws: Workspace) -> None:
    results = generate(_config(runs=["full-a"], seed=10, batch_size=3), ws)
    folder = ws.generated_dir(HUMMINGBIRD, "full-a")
    assert [(r.run, r.kind, r.made, r.existing) for r in results] == [("full-a", "full", 3, 0)]
    assert sorted(p.name for p in folder.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
    run_dir = ws.model_dir(HUMMINGBIRD, "full-a")
    pipe = StableDiffusionPipeline.from_pretrained(run_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    for i in range(3):
        _assert_same_image(_pixels(folder / f"{i:05d}.png"), _bare(pipe, INSTANCE_PROMPT, 10 + i))
    manifest = json.loads((folder / "generation.json").read_text())
    assert manifest["status"] == "complete" and manifest["num_images"] == 3
    assert [(e["file"], e["seed"], e["prompt"], e["negative_prompt"]) for e in manifest["images"]] == [
        (f"{i:05d}.png", 10 + i, INSTANCE_PROMPT, "") for i in range(3)]
    assert all(e["sha256"] == file_sha256(folder / e["file"]) for e in manifest["images"])
    assert manifest["settings"] == {"prompt": INSTANCE_PROMPT, "negative_prompt": "", "steps": 2, "guidance": 7.5,
                                    "scheduler": "DDIM", "resolution": 64, "seed": 10, "dtype": "fp32"}
    files = manifest["model"]["files"]
    assert set(files) == {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                          "text_encoder/model.safetensors"}
    assert all(files[name] == file_sha256(run_dir / name) for name in files)
    assert manifest["model"]["kind"] == "full" and manifest["class"]["index"] == 94


def test_batch_size_does_not_change_the_images_with_an_ancestral_sampler(ws: Workspace, tmp_path: Path) -> None:
    other = Workspace(tmp_path / "other")
    shutil.copytree(ws.root / "models", other.root / "models")
    generate(_config(runs=["full-a"], scheduler="Euler-a", batch_size=1), ws)
    generate(_config(runs=["full-a"], scheduler="euler_a", batch_size=3), other)
    for i in range(3):
        name = f"{i:05d}.png"
        _assert_same_image(_pixels(ws.generated_dir(HUMMINGBIRD, "full-a") / name),
                           _pixels(other.generated_dir(HUMMINGBIRD, "full-a") / name))
    first, second = (_pixels(ws.generated_dir(HUMMINGBIRD, "full-a") / f"{i:05d}.png") for i in (0, 1))
    assert np.abs(first - second).max() > 10, "different seeds must give different images"


def test_an_interrupted_run_makes_only_the_missing_images(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = ws.generated_dir(HUMMINGBIRD, "full-a")
    real_write = generate_module.atomic_write_bytes
    written: list[str] = []

    def interrupt_after_two(path: Path, data: bytes) -> None:
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(path.name)
        real_write(path, data)

    monkeypatch.setattr(generate_module, "atomic_write_bytes", interrupt_after_two)
    with pytest.raises(KeyboardInterrupt):
        generate(_config(runs=["full-a"], num_images=4, batch_size=1), ws)
    manifest = json.loads((folder / "generation.json").read_text())
    assert manifest["status"] == "incomplete" and [e["file"] for e in manifest["images"]] == ["00000.png", "00001.png"]
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}

    written.clear()
    monkeypatch.setattr(generate_module, "atomic_write_bytes", lambda path, data: (written.append(path.name),
                                                                                   real_write(path, data)))
    results = generate(_config(runs=["full-a"], num_images=4, batch_size=1), ws)
    assert sorted(written) == ["00002.png", "00003.png"]  # written on threads: in any order
    assert (results[0].made, results[0].existing) == (2, 2)
    assert {name: (folder / name).stat().st_mtime_ns for name in stamps} == stamps
    manifest = json.loads((folder / "generation.json").read_text())
    assert manifest["status"] == "complete" and [e["seed"] for e in manifest["images"]] == [0, 1, 2, 3]

    written.clear()
    generate(_config(runs=["full-a"], num_images=4), ws)  # all there: nothing is made, no model loaded
    assert written == []
    with pytest.raises(SpurgenError, match=r"other settings \(steps changed\); pass --overwrite"):
        generate(_config(runs=["full-a"], num_images=4, steps=3), ws)
    results = generate(_config(runs=["full-a"], num_images=2, steps=3, overwrite=True), ws)
    assert results[0].made == 2 and sorted(p.name for p in folder.glob("*.png")) == ["00000.png", "00001.png"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_images_quantised_by_generate_are_those_of_diffusers_pil_output(dtype: torch.dtype) -> None:
    from diffusers.image_processor import VaeImageProcessor

    # Random pixels, and every level's midpoint give or take a float step: where rounding could differ.
    levels = (torch.arange(256, dtype=torch.float64) + 0.5) / 255
    near_ties = torch.cat([levels, torch.nextafter(levels, levels + 1), torch.nextafter(levels, levels - 1)])
    images = torch.cat([torch.rand(2, 3 * 16 * 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
                        near_ties[: 3 * 256].reshape(1, -1)]).clamp(0, 1).to(dtype).reshape(3, 3, 16, 16)
    ours = generate_module._pil_images(images)
    theirs = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy(images))
    assert [image.mode for image in ours] == ["RGB"] * 3
    assert [image.tobytes() for image in ours] == [image.tobytes() for image in theirs]


def test_a_failed_image_write_is_raised_and_leaves_only_whole_images(ws: Workspace, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Images are encoded and written on threads while the next batch is sampled: an error there still ends the
    # command, the other writes end whole, and a re-run makes the images of an uninterrupted run.
    folder = ws.generated_dir(HUMMINGBIRD, "full-a")
    real_png = generate_module._png_bytes
    calls = itertools.count()  # next() on it is atomic: the writer threads share it

    def encoder(image: Image.Image) -> bytes:
        if next(calls) == 2:  # an image of the second batch of two
            raise RuntimeError("encoder broke")
        return real_png(image)

    monkeypatch.setattr(generate_module, "_png_bytes", encoder)
    with pytest.raises(RuntimeError, match="encoder broke"):
        generate(_config(runs=["full-a"], num_images=5, batch_size=2), ws)
    assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    present = sorted(p.name for p in folder.glob("*.png"))
    assert "00000.png" in present and "00001.png" in present and len(present) < 5
    manifest = json.loads((folder / "generation.json").read_text())
    assert manifest["status"] == "incomplete" and [e["file"] for e in manifest["images"]] == present
    monkeypatch.setattr(generate_module, "_png_bytes", real_png)
    assert generate(_config(runs=["full-a"], num_images=5, batch_size=2), ws)[0].total == 5
    other = Workspace(tmp_path / "other")
    shutil.copytree(ws.root / "models", other.root / "models")
    generate(_config(runs=["full-a"], num_images=5, batch_size=2), other)
    for i in range(5):  # the re-run batches the missing images otherwise, hence the last-bit tolerance
        _assert_same_image(_pixels(folder / f"{i:05d}.png"),
                           _pixels(other.generated_dir(HUMMINGBIRD, "full-a") / f"{i:05d}.png"))


def test_lora_run_matches_diffusers_and_base_differs(ws: Workspace, tiny_sd_dir: Path) -> None:
    generate(_config(runs=["lora-b"], num_images=2), ws)
    generate(_config(base=True, num_images=2, prompt=INSTANCE_PROMPT), ws)
    lora_folder, base_folder = ws.generated_dir(HUMMINGBIRD, "lora-b"), ws.generated_dir(HUMMINGBIRD, "base")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    for i in range(2):
        _assert_same_image(_pixels(base_folder / f"{i:05d}.png"), _bare(pipe, INSTANCE_PROMPT, i))
    pipe.load_lora_weights(ws.model_dir(HUMMINGBIRD, "lora-b"))
    for i in range(2):
        lora = _pixels(lora_folder / f"{i:05d}.png")
        _assert_same_image(lora, _bare(pipe, INSTANCE_PROMPT, i))
        assert np.abs(lora - _pixels(base_folder / f"{i:05d}.png")).mean() > 5, "the LoRA must change the images"
    lora_manifest = json.loads((lora_folder / "generation.json").read_text())
    lora_file = ws.model_dir(HUMMINGBIRD, "lora-b") / "pytorch_lora_weights.safetensors"
    assert lora_manifest["model"]["kind"] == "lora" and lora_manifest["model"]["lora_sha256"] == file_sha256(lora_file)
    base_manifest = json.loads((base_folder / "generation.json").read_text())
    assert base_manifest["model"]["kind"] == "base" and "lora_sha256" not in base_manifest["model"]
    assert base_manifest["model"]["files"] == {k: file_sha256(tiny_sd_dir / k) for k in base_manifest["model"]["files"]}


def test_base_uses_the_class_prompt_and_every_run_by_default(ws: Workspace) -> None:
    results = generate(_config(num_images=1), ws)
    assert [(r.run, r.kind) for r in results] == [("full-a", "full"), ("lora-b", "lora")]
    generate(_config(base=True, num_images=1, negative_prompt="a photo of a {class}"), ws)
    manifest = json.loads((ws.generated_dir(HUMMINGBIRD, "base") / "generation.json").read_text())
    assert manifest["images"][0]["prompt"] == CLASS_PROMPT
    assert manifest["images"][0]["negative_prompt"] == "a photo of a hummingbird"


def test_bad_input_is_a_one_line_error(ws: Workspace, tiny_sd_dir: Path) -> None:
    with pytest.raises(SpurgenError, match=r"no finished fine-tuned model for koala \(105\)"):
        generate(_config(classes=["koala"]), ws)
    with pytest.raises(SpurgenError, match=r"no base model for koala \(105\): pass --model"):
        generate(_config(classes=["koala"], base=True), ws)
    with pytest.raises(SpurgenError, match="holds no finished model.*finished runs: full-a, lora-b"):
        generate(_config(runs=["nope"]), ws)
    with pytest.raises(SpurgenError, match="unknown scheduler 'eulerish'"):
        _config(scheduler="eulerish")
    with pytest.raises(SpurgenError, match="--resolution must be a positive multiple of 8"):
        _config(resolution=100)
    training_path = ws.model_dir(HUMMINGBIRD, "lora-b") / "training.json"
    training = json.loads(training_path.read_text())
    missing = str(ws.root / "gone" / "sd-base")
    training_path.write_text(json.dumps({**training, "base_model": missing, "base_model_resolved": missing}))
    with pytest.raises(SpurgenError, match=r"LoRA run 'lora-b' of hummingbird \(94\) needs the base model it was "
                                           r"trained on: base model folder .*gone/sd-base does not exist"):
        generate(_config(runs=["lora-b"]), ws)
    full_run = str(ws.model_dir(HUMMINGBIRD, "full-a"))
    with pytest.raises(SpurgenError, match=r"--model .*full-a is not the base model LoRA run 'lora-b'"):
        generate(_config(runs=["lora-b"], model=full_run), ws)
    assert not (ws.root / "generated").exists(), "nothing may be written before the input is checked"
    generate(_config(runs=["lora-b"], model=str(tiny_sd_dir), num_images=1), ws)  # the moved base is found
    assert (ws.generated_dir(HUMMINGBIRD, "lora-b") / "00000.png").is_file()


def test_every_named_scheduler_builds_from_the_model_config(tiny_sd_dir: Path) -> None:
    config = json.loads((tiny_sd_dir / "scheduler" / "scheduler_config.json").read_text())
    for name, (class_name, _) in SCHEDULERS.items():
        scheduler = build_scheduler(name, config)
        assert type(scheduler).__name__ == class_name
        assert scheduler.config.beta_schedule == "scaled_linear" and scheduler.config.prediction_type == "epsilon"
    assert build_scheduler("model", config) is None


def test_cli_generates_and_prints_the_table(ws: Workspace) -> None:
    result = CliRunner().invoke(app, ["generate", "-w", str(ws.root), "-c", "94", "--run", "full-a", "-n", "2",
                                      "--steps", "2", "--scheduler", "unipc", "--device", "cpu", "--batch-size", "2"])
    assert result.exit_code == 0, result.output
    assert "generate" in result.output and "full-a" in result.output
    assert "2 new images, 0 already there" in result.output
    manifest = json.loads((ws.generated_dir(HUMMINGBIRD, "full-a") / "generation.json").read_text())
    assert manifest["settings"]["scheduler"] == "UniPC" and manifest["status"] == "complete"


def test_weight_hashes_are_remembered_until_a_file_changes(ws: Workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    import spurgen._file_hashes as file_hashes

    hashed: list[str] = []
    real = file_hashes.file_sha256
    monkeypatch.setattr(file_hashes, "file_sha256", lambda path: hashed.append(Path(path).name) or real(path))
    generate(_config(runs=["full-a"], num_images=1), ws)
    assert len(hashed) == 3  # unet, vae, text encoder
    hashed.clear()
    generate(_config(runs=["full-a"], num_images=2), ws)  # one more image: the same weights, no hashing
    assert hashed == []
    memo = json.loads((ws.root / "cache" / "sha256.json").read_text())
    unet = ws.model_dir(HUMMINGBIRD, "full-a") / "unet" / "diffusion_pytorch_model.safetensors"
    assert memo[str(unet.resolve())]["sha256"] == file_sha256(unet)
    tensors = load_file(str(unet))
    first = next(iter(tensors))
    tensors[first] = tensors[first] + 1  # new weights under the same name: hashed again, the run is refused
    save_file(tensors, str(unet))
    with pytest.raises(SpurgenError, match="overwrite"):
        generate(_config(runs=["full-a"], num_images=2), ws)
    assert hashed == ["diffusion_pytorch_model.safetensors"]


def test_many_files_hash_in_parallel_to_the_same_digests(tmp_path: Path) -> None:
    from spurgen._file_hashes import sha256_all

    files = []
    for i in range(80):
        files.append(tmp_path / f"{i}.bin")
        files[-1].write_bytes(bytes([i]) * (1000 + i))
    assert sha256_all(files) == [file_sha256(f) for f in files]


def test_without_the_safety_checker_blanked_images_are_made_again(ws: Workspace, tiny_sd_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    folder = ws.generated_dir(HUMMINGBIRD, "full-a")
    generate(_config(runs=["full-a"]), ws)
    original = _pixels(folder / "00001.png")
    # as the checker leaves a flagged image: a black square, marked in generation.json
    Image.new("RGB", (64, 64)).save(folder / "00001.png")
    manifest = json.loads((folder / "generation.json").read_text())
    manifest["images"][1]["nsfw_flagged"] = True
    (folder / "generation.json").write_text(json.dumps(manifest))
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")}

    generate(_config(runs=["full-a"]), ws)  # with the checker: the run is complete as it is
    assert {p.name: p.stat().st_mtime_ns for p in folder.glob("*.png")} == stamps
    generate(_config(runs=["full-a"], safety_checker=False), ws)
    _assert_same_image(_pixels(folder / "00001.png"), original)
    assert [e["nsfw_flagged"] for e in json.loads((folder / "generation.json").read_text())["images"]] == [None] * 3
    assert {n: t for n, t in stamps.items() if n != "00001.png"} == {
        p.name: p.stat().st_mtime_ns for p in folder.glob("*.png") if p.name != "00001.png"}

    # a model folder's own checker is loaded unless it is turned off
    model = shutil.copytree(tiny_sd_dir, ws.root / "with-checker")
    (model / "safety_checker").mkdir()
    asked: list[dict] = []

    def record_and_stop(folder: Path, **kwargs: object) -> None:
        asked.append(kwargs)
        raise KeyError("stopped before loading")

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", record_and_stop)
    for on in (True, False):
        with pytest.raises(SpurgenError):
            generate_module._load_pipeline(model, torch.float32, torch.device("cpu"), on)
    assert "safety_checker" not in asked[0] and asked[1]["safety_checker"] is None
