"""Where the world's models are: `spurgen world build --out` writes there; the demo looks there, then at the shipped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import spurgen.world.models
from spurgen.cli import app
from spurgen.errors import SpurgenError
from spurgen.labels import label_set_classifiers
from spurgen.workspace import Workspace
from spurgen.world.demo import DemoConfig, demo_settings
from spurgen.world.models import (
    ARCHITECTURES,
    ASSETS_DIR,
    OUT_ENV,
    SD_DIR,
    SHIPPED_DIR,
    TEXT_TO_IMAGE_MODELS,
    default_out_dir,
    text_to_image_dir,
    world_classifier_specs,
)


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and modification time."""
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_out_defaults_to_the_user_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(OUT_ENV, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_out_dir() == tmp_path / "home" / ".cache" / "spurgen" / "world"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_out_dir() == tmp_path / "xdg" / "spurgen" / "world"
    monkeypatch.setenv(OUT_ENV, str(tmp_path / "mine"))
    assert default_out_dir() == tmp_path / "mine"


def test_built_models_are_found_before_the_shipped_ones(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert text_to_image_dir(out) == SD_DIR
    assert all(Path(spec.path) == ASSETS_DIR / spec.name for spec in world_classifier_specs(out))
    (out / "sd").mkdir(parents=True)
    (out / "sd" / "model_index.json").write_text("{}")
    (out / "classifiers" / "resnet").mkdir(parents=True)
    (out / "classifiers" / "resnet" / "metrics.json").write_text("{}")
    assert text_to_image_dir(out) == out / "sd"
    paths = {spec.name: Path(spec.path) for spec in world_classifier_specs(out)}
    assert paths["resnet"] == out / "classifiers" / "resnet" and paths["vit"] == ASSETS_DIR / "vit"


def test_the_demo_and_the_world_label_set_use_the_built_models(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "out"
    monkeypatch.setenv(OUT_ENV, str(out))
    (out / "sd").mkdir(parents=True)
    (out / "sd" / "model_index.json").write_text("{}")
    (out / "classifiers" / "robust-resnet").mkdir(parents=True)
    (out / "classifiers" / "robust-resnet" / "metrics.json").write_text("{}")
    settings = demo_settings(Workspace(tmp_path / "ws"), DemoConfig())
    assert f'model = "{(out / "sd").as_posix()}"' in settings
    specs = {spec.name: spec for spec in label_set_classifiers("world")}
    assert Path(specs["robust-resnet"].path) == out / "classifiers" / "robust-resnet"


def test_a_model_neither_built_nor_shipped_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    monkeypatch.setattr(spurgen.world.models, "SHIPPED_DIR", tmp_path / "installed")
    with pytest.raises(SpurgenError, match="build it first with `spurgen world build --text-to-image v`"):
        text_to_image_dir(tmp_path / "out")


def test_world_build_keeps_the_shipped_models_and_writes_only_to_out(tmp_path: Path) -> None:
    if not all((SHIPPED_DIR / model.folder / "recognition.json").is_file() for model in TEXT_TO_IMAGE_MODELS.values()):
        pytest.skip("the world's models are not shipped in this installation")
    before = _snapshot(SHIPPED_DIR)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["world", "build", "--work", str(tmp_path / "work"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert _snapshot(SHIPPED_DIR) == before
    # Nothing was trained: the summaries are written, the models are the shipped ones.
    assert sorted(p.name for p in out.iterdir()) == ["build.json", "classifiers"]
    assert [p.name for p in (out / "classifiers").iterdir()] == ["metrics.json"]
    summary = json.loads((out / "build.json").read_text())
    assert set(summary["classifiers"]["models"]) == {a.name for a in ARCHITECTURES}
    assert summary["recognition"] == {name: json.loads((SHIPPED_DIR / model.folder / "recognition.json").read_text())
                                      for name, model in TEXT_TO_IMAGE_MODELS.items()}


def test_every_text_to_image_model_has_its_own_folder_and_a_known_base() -> None:
    folders = [model.folder for model in TEXT_TO_IMAGE_MODELS.values()]
    assert len(set(folders)) == len(folders) and TEXT_TO_IMAGE_MODELS["v"].folder == "sd"
    names = list(TEXT_TO_IMAGE_MODELS)
    # A base comes first in the table: world build trains in the table's order.
    assert all(names.index(model.base) < names.index(model.name) for model in TEXT_TO_IMAGE_MODELS.values()
               if model.base)
    assert {model.prediction_type for model in TEXT_TO_IMAGE_MODELS.values()} == {"v_prediction", "epsilon"}


def test_each_model_is_found_in_its_own_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "sd-epsilon").mkdir(parents=True)
    (out / "sd-epsilon" / "model_index.json").write_text("{}")
    assert text_to_image_dir(out, "epsilon") == out / "sd-epsilon"
    assert text_to_image_dir(out, "v") == SD_DIR
    with pytest.raises(SpurgenError, match="unknown world text-to-image model 'x'"):
        text_to_image_dir(out, "x")


def test_the_epsilon_model_loads_with_the_stock_pipeline_and_predicts_epsilon() -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    from spurgen._runtime import dtype_argument

    try:
        folder = text_to_image_dir(model="epsilon")
    except SpurgenError:
        pytest.skip("the epsilon model is neither built nor shipped here")
    pipe = StableDiffusionPipeline.from_pretrained(folder, **dtype_argument(torch.float32))  # shipped in fp16
    config = pipe.scheduler.config
    assert config.prediction_type == "epsilon"
    assert (config.beta_schedule, config.beta_start, config.beta_end) == ("scaled_linear", 0.00085, 0.012)
    metrics = json.loads((folder / "training_metrics.json").read_text())
    assert metrics["model"] == "epsilon" and metrics["config"]["offset_noise"] > 0
    image = pipe("a photo of a star", num_inference_steps=2, guidance_scale=4.0, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3)


@pytest.fixture
def _no_training(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """world build's training and sampling replaced by stubs; returns the folders of the models measured."""
    import spurgen.world.build as build

    measured: list[str] = []

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("nothing should be trained")

    def measure(sd_dir: Path, *args: object, **kwargs: object) -> dict[str, object]:
        measured.append(sd_dir.name)
        return {"object_prompt_mean": 1.0, "feature_prompt_mean": 0.5}

    monkeypatch.setattr(build, "train_text_to_image", refuse)
    monkeypatch.setattr(build, "train_world_classifiers", lambda *args, **kwargs: {})
    monkeypatch.setattr(build, "measure_text_to_image", measure)
    return measured


def test_world_build_builds_only_the_chosen_models_and_trains_none_that_exist(tmp_path: Path,
                                                                             _no_training: list[str]) -> None:
    from spurgen.world.build import WorldBuildConfig, build_world_models

    out = tmp_path / "out"
    work = tmp_path / "work"
    (work / "world").mkdir(parents=True)
    (work / "world" / "world.json").write_text("{}")
    for name in ("sd", "sd-epsilon"):  # built, measured: kept
        (out / name).mkdir(parents=True)
        for file in ("model_index.json", "recognition.json", "training_metrics.json"):
            (out / name / file).write_text(json.dumps({"folder": name}))
    summary = build_world_models(work, WorldBuildConfig(text_to_image_models=["epsilon"]), out=out, log=lambda _: None)
    assert summary["recognition"] == {"epsilon": {"folder": "sd-epsilon"}} and not _no_training
    # Trained but not measured (an interrupted build): measured, not trained again.
    (out / "sd-epsilon" / "recognition.json").unlink()
    summary = build_world_models(work, WorldBuildConfig(), out=out, log=lambda _: None)
    assert _no_training == ["sd-epsilon"]
    assert set(summary["recognition"]) == {"v", "epsilon"}
    assert json.loads((out / "sd-epsilon" / "recognition.json").read_text())["object_prompt_mean"] == 1.0


def test_world_build_refuses_an_unknown_text_to_image_model(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["world", "build", "--work", str(tmp_path / "work"), "--out",
                                      str(tmp_path / "out"), "--text-to-image", "v,sdxl"])
    assert result.exit_code == 2
    assert "unknown world text-to-image model 'sdxl'" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "work").exists()
