"""The version floors of pyproject.toml and the compatibility code they rely on (fast; no model is loaded).

The floors themselves are exercised by tests/floors/ in a second environment (make test-floors).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def _floor_pins():
    spec = importlib.util.spec_from_file_location("floor_pins", REPO / ".ci" / "floor_pins.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_dependency_has_one_floor_and_no_torch_cap() -> None:
    pyproject = REPO / "pyproject.toml"
    dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    pins = _floor_pins().floor_pins(pyproject, (3, 10))
    assert len(pins) == len(dependencies)  # every requirement applies on 3.10, and each states its floor
    assert "tomli==1.1.0" in pins and "torch==2.2.0" in pins
    assert not any(pin.startswith("tomli==") for pin in _floor_pins().floor_pins(pyproject, (3, 11)))
    # a cap on torch or torchvision would make pip replace a user's newer torch
    for requirement in dependencies:
        if re.match(r"torch(vision)?\b", requirement):
            assert "<" not in requirement, requirement


def test_the_floor_environment_uses_the_oldest_python_we_support() -> None:
    floor = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert floor == ">=3.10"
    makefile = (REPO / "Makefile").read_text()
    assert "floor_pins.py --python 3.10" in makefile and "python3.10" in makefile


def test_a_dependency_without_a_floor_is_refused(tmp_path: Path) -> None:
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["torch>=2.2.0", "numpy<3"]\n')
    with pytest.raises(SystemExit, match="numpy<3"):
        _floor_pins().floor_pins(pyproject, (3, 10))


def test_lora_metadata_holds_only_the_fields_known_since_the_peft_floor() -> None:
    import torch
    from peft import LoraConfig

    from spurgen._lora import ADAPTER_METADATA_FIELDS, _adapter_metadata, add_lora

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.to_q = torch.nn.Linear(4, 4)

        def add_adapter(self, config: LoraConfig) -> None:
            from peft import inject_adapter_in_model

            inject_adapter_in_model(config, self, "default")
            self.peft_config = {"default": config}

    model = Tiny()
    add_lora(model, ("to_q",), rank=4, alpha=8)
    metadata = _adapter_metadata(model, "tiny-sd")
    assert set(metadata) <= set(ADAPTER_METADATA_FIELDS) and metadata["base_model_name_or_path"] == "tiny-sd"
    assert (metadata["r"], metadata["lora_alpha"], metadata["target_modules"]) == (4, 8, ["to_q"])
    LoraConfig(**metadata)  # what diffusers does with it


def test_text_encoder_keys_are_written_with_clips_classic_names() -> None:
    from spurgen._lora import _classic_text_encoder_keys

    five = {"encoder.layers.0.self_attn.q_proj.lora_A.weight": 1}  # transformers 5 drops the text_model level
    four = {"text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": 1}
    assert _classic_text_encoder_keys(five) == four == _classic_text_encoder_keys(four)


def test_dtype_argument_follows_each_librarys_version(monkeypatch) -> None:
    import importlib.metadata

    import torch

    from spurgen._runtime import dtype_argument

    versions = {"diffusers": "0.34.0", "transformers": "4.45.0"}
    monkeypatch.setattr(importlib.metadata, "version", lambda name: versions[name])
    assert dtype_argument(torch.float16) == {"torch_dtype": torch.float16}
    assert dtype_argument(torch.float16, "transformers") == {"torch_dtype": torch.float16}
    versions.update(diffusers="0.42.1", transformers="4.56.0")
    assert dtype_argument(torch.float16) == {"dtype": torch.float16}
    assert dtype_argument(torch.float16, "transformers") == {"dtype": torch.float16}
