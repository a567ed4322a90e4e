"""Model families: detection from model_index.json, --family, and SDXL end to end on a tiny random SDXL folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from spurgen._base_model import resolve_base_model
from spurgen.errors import SpurgenError
from spurgen.families import detect_family, get_family

pytestmark = pytest.mark.usefixtures("one_thread")


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
    ("FluxPipeline", "a FLUX.1 model (FluxPipeline)"),
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


def test_family_is_detected_and_family_overrides_it(tiny_sd_dir: Path, tmp_path: Path) -> None:
    assert resolve_base_model(str(tiny_sd_dir)).family.name == "sd"
    # An SD folder read as SDXL lacks SDXL's second text encoder: named, on one line.
    with pytest.raises(SpurgenError, match=r"has no tokenizer_2, text_encoder_2; give a Stable Diffusion XL"):
        resolve_base_model(str(tiny_sd_dir), "sdxl")
    renamed = _with_class_name(tiny_sd_dir, tmp_path / "renamed", "MyStableDiffusionPipeline")
    assert resolve_base_model(str(renamed), "sd").family.name == "sd"
    with pytest.raises(SpurgenError, match=r"unknown --family 'flux'; use one of sd, sdxl"):
        detect_family({}, "x", "flux")
    assert get_family("sdxl").pipeline_class().__name__ == "StableDiffusionXLPipeline"
