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
    with pytest.raises(SpurgenError, match="build it first with `spurgen world build`"):
        text_to_image_dir(tmp_path / "out")


def test_world_build_keeps_the_shipped_models_and_writes_only_to_out(tmp_path: Path) -> None:
    if not (SD_DIR / "recognition.json").is_file():
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
    assert summary["recognition"] == json.loads((SD_DIR / "recognition.json").read_text())
