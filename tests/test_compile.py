"""``finetune --compile``: the compiled step's losses match eager's, a compiled run resumes (compiled or eager) as if
uninterrupted, and its LoRA file loads in plain diffusers.

Most tests compile with the ``aot_eager`` backend: dynamo's graphs of the blocks and their autograd, without
inductor's code generation, which takes minutes on a small shared CPU; the test marked slow uses inductor.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from spurgen.config import FinetuneConfig
from spurgen.errors import SpurgenError
from spurgen.finetune import compile as compile_module
from spurgen.finetune import finetune
from spurgen.workspace import Workspace

from test_finetune import HUMMINGBIRD, config, loss_rows, one_thread, write_refs  # noqa: F401 (fixture)

# Relative tolerance of a compiled run's losses against eager's over 3-4 steps of the tiny model: inductor fuses and
# reorders float32 sums (measured: relative differences about 1e-7).
RTOL = 1e-4
# dreambooth: LoRA on the UNet's blocks, all of them compiled (the slow test compiles the text encoder's too).
COMMON: dict[str, Any] = {"preset": "dreambooth", "learning_rate": 1e-3, "checkpointing_steps": 2}


RUN = COMMON["preset"]


@pytest.fixture
def aot_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compile_module, "BACKEND", "aot_eager")


def losses(folder: Path) -> list[float]:
    return [float(row["loss"]) for row in loss_rows(folder)]


def test_compiled_run_matches_eager_resumes_both_ways_and_saves_clean_lora(tiny_sd_dir: Path, tmp_path: Path,
                                                                            aot_eager: None) -> None:
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    eager, compiled = write_refs(tmp_path / "eager"), write_refs(tmp_path / "compiled")
    finetune(config(tiny_sd_dir, steps=4, compile="off", **COMMON), eager)
    finetune(config(tiny_sd_dir, steps=2, compile="on", **COMMON), compiled)
    shutil.copytree(tmp_path / "compiled", tmp_path / "then-eager")
    # validation images at the end: sampling runs the compiled blocks eagerly
    finetune(config(tiny_sd_dir, steps=4, compile="on", resume=True, num_validation_images=1, **COMMON), compiled)
    finetune(config(tiny_sd_dir, steps=4, compile="off", resume=True, **COMMON),
             Workspace(tmp_path / "then-eager"))
    expected = losses(eager.model_dir(HUMMINGBIRD, RUN))
    for root in ("compiled", "then-eager"):
        folder = tmp_path / root / "models" / HUMMINGBIRD.dirname / RUN
        assert losses(folder) == pytest.approx(expected, rel=RTOL), root

    folder = compiled.model_dir(HUMMINGBIRD, RUN)
    weights = load_file(str(folder / "pytorch_lora_weights.safetensors"))
    assert not [key for key in weights if "_orig_mod" in key]
    reference = load_file(str(eager.model_dir(HUMMINGBIRD, RUN) / "pytorch_lora_weights.safetensors"))
    assert weights.keys() == reference.keys()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    pipe.load_lora_weights(folder)  # plain diffusers, no spurgen
    assert any("lora" in name for name, _ in pipe.unet.named_parameters())


def test_compile_switches_and_modes_are_checked() -> None:
    from spurgen.finetune.compile import compiles, uses_channels_last

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not compiles("auto", cpu) and compiles("on", cpu) and not compiles("off", cuda)
    assert uses_channels_last("auto", cuda) and not uses_channels_last("auto", cpu) and uses_channels_last("on", cpu)
    for bad in ({"compile": "yes"}, {"channels_last": "1"}, {"compile_mode": "fast"}):
        with pytest.raises(SpurgenError, match="--compile|--channels-last"):
            FinetuneConfig(**bad).validate()


@pytest.mark.slow
def test_inductor_compiled_steps_match_eager(tiny_sd_dir: Path, tmp_path: Path) -> None:
    eager, compiled = write_refs(tmp_path / "eager"), write_refs(tmp_path / "compiled")
    settings = {**COMMON, "preset": "dreambooth-te", "steps": 3, "checkpointing_steps": 0}
    finetune(config(tiny_sd_dir, compile="off", **settings), eager)
    finetune(config(tiny_sd_dir, compile="on", **settings), compiled)
    assert (losses(compiled.model_dir(HUMMINGBIRD, "dreambooth-te"))
            == pytest.approx(losses(eager.model_dir(HUMMINGBIRD, "dreambooth-te")), rel=RTOL))
