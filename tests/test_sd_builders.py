"""Tests of the offline CLIP tokenizer and the random Stable Diffusion builders."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # before diffusers imports huggingface_hub, also when run without conftest

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from spurgen.errors import SpurgenError
from spurgen.testing import SD_ARCHITECTURES, build_clip_tokenizer, build_stable_diffusion, count_parameters
from spurgen.testing import clip_tokenizer as _clip_tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return build_clip_tokenizer()


def test_tokenizer_is_clip(tokenizer: CLIPTokenizer) -> None:
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    assert tokenizer.pad_token == "<|endoftext|>"
    assert tokenizer("a photo of").input_ids == [49406, 320, 1125, 539, 49407]
    # Ids as OpenAI's CLIP tokenizer gives them (checked against open_clip's SimpleTokenizer): CLIP
    # lowercases, collapses whitespace and splits punctuation and the possessive.
    ids = tokenizer("A  Photo, of an astronaut's horse!").input_ids
    assert ids == [49406, 320, 1125, 267, 539, 550, 18376, 568, 4558, 256, 49407]
    ids = tokenizer("a photo of sks hummingbird").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of sks hummingbird"
    padded = tokenizer("a photo of", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(padded) == 77 and padded[5:] == [49407] * 72


def test_tokenizer_save_dir_reloads(tmp_path: Path) -> None:
    build_clip_tokenizer(tmp_path)
    assert {"tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"} <= {
        p.name for p in tmp_path.iterdir()
    }
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == 49408 and reloaded.model_max_length == 77
    assert reloaded("a photo of").input_ids == [49406, 320, 1125, 539, 49407]


def test_missing_open_clip_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    def find_spec(name: str, *args: object) -> object:
        return None if name == "open_clip" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(SpurgenError, match="pip install open-clip-torch"):
        _clip_tokenizer._bpe_path()


def test_tiny_pipeline_reloads_and_generates_deterministically(tiny_sd_dir: Path) -> None:
    assert (tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not list(tiny_sd_dir.parent.glob(".*tmp-*")), "the temporary build folder was left behind"
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None
    assert len(pipe.tokenizer) == 49408
    assert pipe.scheduler.config.prediction_type == "epsilon"

    def generate() -> np.ndarray:
        gen = torch.Generator().manual_seed(0)
        out = pipe("a photo of sks hummingbird", num_inference_steps=2, generator=gen, output_type="np")
        return out.images

    first, second = generate(), generate()
    assert first.shape == (1, 64, 64, 3)
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)


def test_same_seed_same_weights_and_caller_rng_untouched(tmp_path: Path, tiny_sd_dir: Path) -> None:
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    out = build_stable_diffusion(tmp_path / "again", seed=0)
    torch.testing.assert_close(torch.rand(3), expected_next)  # build does not consume the global RNG

    for part in (
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
        "text_encoder/model.safetensors",
    ):
        a, b = load_file(tiny_sd_dir / part), load_file(out / part)
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_prediction_type_override_and_other_seed(tmp_path: Path, tiny_sd_dir: Path) -> None:
    out = build_stable_diffusion(tmp_path / "v", "tiny", prediction_type="v_prediction", seed=1)
    config = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "v_prediction"
    assert config["beta_schedule"] == "scaled_linear" and config["steps_offset"] == 1
    a = load_file(tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert not torch.equal(a["conv_in.weight"], b["conv_in.weight"])


def test_bad_arguments_raise_spurgen_error(tmp_path: Path) -> None:
    with pytest.raises(SpurgenError, match="unknown Stable Diffusion architecture"):
        build_stable_diffusion(tmp_path / "x", "huge")
    with pytest.raises(SpurgenError, match="prediction type"):
        build_stable_diffusion(tmp_path / "x", prediction_type="noise")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(SpurgenError, match="not empty"):
        build_stable_diffusion(tmp_path / "full")
    assert [p.name for p in tmp_path.iterdir()] == ["full"]


def test_tiny_is_tiny() -> None:
    counts = count_parameters("tiny")
    assert 500_000 <= counts["unet"] <= 1_500_000
    assert SD_ARCHITECTURES["tiny"].latent_size == 32


def test_full_architectures_match_stable_diffusion() -> None:
    # Published parameter counts of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1,
    # counted on the meta device so no weights are allocated.
    assert count_parameters("full") == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
    assert count_parameters("full-v2") == {
        "unet": 865_910_724,
        "vae": 83_653_863,
        "text_encoder": 340_387_840,
    }
    v2 = SD_ARCHITECTURES["full-v2"]
    assert v2.prediction_type == "v_prediction" and v2.resolution == 768 and v2.latent_size == 96
    assert SD_ARCHITECTURES["full"].latent_size == 64


@pytest.mark.parametrize("model", ["v", "epsilon"])
def test_world_architecture_builds_the_shipped_text_to_image_model(model: str) -> None:
    # The world's models are built by this builder too: the shipped weights must fit it key for key.
    from spurgen.testing import stable_diffusion_components
    from spurgen.world.models import SHIPPED_DIR, TEXT_TO_IMAGE_MODELS
    from spurgen.world.text_to_image import WORLD_ARCHITECTURES

    folder = SHIPPED_DIR / TEXT_TO_IMAGE_MODELS[model].folder
    if not (folder / "model_index.json").is_file():
        pytest.skip(f"the {model} model is not shipped in this installation")
    components = stable_diffusion_components(WORLD_ARCHITECTURES[model], seed=0)
    for name, weights in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                          ("text_encoder", "model")):
        components[name].load_state_dict(load_file(folder / name / f"{weights}.safetensors"), strict=True)
    shipped = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert all(shipped[k] == v for k, v in components["scheduler"].config.items() if not k.startswith("_"))
