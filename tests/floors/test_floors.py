"""The pipeline under the floor versions of pyproject.toml, and LoRA files exchanged with the newest versions.

`make test-floors` runs this file in a second environment where every dependency is pinned to its lower bound
(.ci/floor_pins.py) on the oldest Python we support; the main `pytest` run does not collect it (norecursedirs).
It can also run in the main environment, as a plain pipeline test.

SPURGEN_OTHER_PYTHON names the interpreter of another environment (the make target passes the main one, with the
newest versions): a LoRA trained there must load here with plain diffusers, and the LoRA trained here must load
there. Without it those two tests skip.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

OTHER_PYTHON = os.environ.get("SPURGEN_OTHER_PYTHON")
REPO = Path(__file__).resolve().parents[2]
# The optional extras' packages, which the floor environment does not install.
OPTIONAL = {"flask", "waitress", "krippendorff", "pyiqa", "bitsandbytes", "tensorboard", "playwright"}
ALPHA, RANK = 8, 4  # alpha != rank: a loader that missed the adapter metadata would scale the update by 1, not 2


def spurgen(python: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """Runs the command line as a user does (so click and typer parse the flags), offline, on one thread."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([python, "-m", "spurgen", *args], capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, f"spurgen {args[0]} failed under {python}:\n{done.stdout}\n{done.stderr}"
    return done


def train(python: str, workspace: Path, tiny_sd_dir: Path, rigged) -> Path:
    """select-refs on a few images, then 2 LoRA steps of the sfsl preset (UNet and text encoder); the LoRA folder."""
    flags = [f"--classifier={flag}" for flag in rigged.flags.values()]
    spurgen(python, "select-refs", "-w", str(workspace), "--dataset", str(rigged.dataset), "--classes", "hummingbird",
            "-k", "3", "--classifiers", "res-a,conv-b,vit-c", "--num-workers", "0", *flags)
    selection = json.loads((workspace / "refs" / "94-hummingbird" / "selection.json").read_text())
    assert selection["selected"] == rigged.expected_selection(94, 3)
    spurgen(python, "finetune", "-w", str(workspace), "--model", str(tiny_sd_dir), "--classes", "hummingbird",
            "--sfsl-model", "res-a", "--steps", "2", "--num-class-images", "2", "--sample-steps", "2",
            "--sample-batch-size", "2", "--num-validation-images", "0", "--checkpointing-steps", "0",
            "--learning-rate", "1e-2", "--rank", str(RANK), "--alpha", str(ALPHA), "--sfsl-max-timestep", "999",
            "--sfsl-every", "1", *flags)
    folder = workspace / "models" / "94-hummingbird" / "sfsl"
    assert (folder / "pytorch_lora_weights.safetensors").is_file()
    return folder


# Loads a LoRA folder into the base model with plain diffusers, checks that every tensor of the file reached the
# model and that rank and alpha came from the file, and prints the mean difference of a 2-step image from the base
# model's. Run here and, as a script, in the other environment.
LOAD_WITH_PLAIN_DIFFUSERS = textwrap.dedent('''
    import sys

    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    def load_and_compare(base, lora, alpha, rank):
        torch.set_num_threads(1)
        pipe = StableDiffusionPipeline.from_pretrained(base, safety_checker=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)

        def image():
            out = pipe("a photo of sks hummingbird", height=64, width=64, num_inference_steps=2,
                       generator=torch.Generator().manual_seed(0), output_type="np").images[0]
            return np.asarray(out, dtype=np.float64)

        before = image()
        pipe.load_lora_weights(lora, weight_name="pytorch_lora_weights.safetensors")  # offline needs the name
        for part in (pipe.unet, pipe.text_encoder):
            [config] = part.peft_config.values()
            assert (config.r, config.lora_alpha) == (rank, alpha), (type(part).__name__, config.r, config.lora_alpha)
        # Every tensor of the file reached the model: peft creates the LoRA layers from the metadata's targets
        # whatever the file holds, so counting them proves nothing; the sum of absolute values of each part does
        # (a layer left at its initialisation would differ).
        written = load_file(f"{lora}/pytorch_lora_weights.safetensors")
        for part in ("unet", "text_encoder"):
            in_file = [tensor for key, tensor in written.items() if key.startswith(part + ".")]
            in_model = [p for name, p in getattr(pipe, part).named_parameters() if "lora_" in name]
            assert in_file, f"the LoRA has no {part} layers"
            assert len(in_model) == len(in_file), (part, len(in_model), len(in_file))
            file_sum = sum(float(t.double().abs().sum()) for t in in_file)
            model_sum = sum(float(p.detach().double().abs().sum()) for p in in_model)
            assert abs(file_sum - model_sum) <= 1e-6 * file_sum, f"{part}: the file's LoRA weights did not load"
        return float(np.abs(image() - before).mean())

    if __name__ == "__main__":
        print(load_and_compare(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])))
''')
namespace: dict = {}
exec(compile(LOAD_WITH_PLAIN_DIFFUSERS, "load_with_plain_diffusers", "exec"), namespace)
load_and_compare = namespace["load_and_compare"]


@pytest.fixture(scope="module")
def here_lora(tiny_sd_dir: Path, rigged, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pipeline in this environment: select-refs, 2 LoRA steps, saved."""
    return train(sys.executable, tmp_path_factory.mktemp("here"), tiny_sd_dir, rigged)


def test_every_module_imports() -> None:
    """Catches syntax and standard-library names newer than the oldest Python (tomllib was one) in code that the
    pipeline below does not reach."""
    import importlib
    import pkgutil

    import spurgen

    names = [info.name for info in pkgutil.walk_packages(spurgen.__path__, "spurgen.")]
    assert len(names) > 20
    failed = {}
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:  # the optional extras (pyproject.toml) are not installed here
            if (exc.name or "").split(".")[0] not in OPTIONAL:
                failed[name] = repr(exc)
        except Exception as exc:  # noqa: BLE001 - report every module that fails, not only the first
            failed[name] = repr(exc)
    assert not failed, failed


@pytest.mark.parametrize("command", ["select-refs", "finetune", "generate"])
def test_help_renders(command: str) -> None:
    """typer 0.15.3 and older fail here beside click 8.2 and newer (0.12: on any boolean flag, even without --help)."""
    assert "Usage" in spurgen(sys.executable, command, "--help").stdout


def test_trained_lora_loads_with_plain_diffusers_and_changes_the_images(here_lora: Path, tiny_sd_dir: Path) -> None:
    assert load_and_compare(str(tiny_sd_dir), str(here_lora), ALPHA, RANK) > 1e-3


def test_generate_and_the_spurgen_toml_reader(here_lora: Path, tiny_sd_dir: Path) -> None:
    workspace = here_lora.parents[2]
    # spurgen.toml is read with tomllib, or tomli before Python 3.11
    (workspace / "spurgen.toml").write_text(f'model = "{tiny_sd_dir}"\n\n[generate]\nsteps = 2\n')
    spurgen(sys.executable, "generate", "-w", str(workspace), "--classes", "94", "--num-images", "2")
    images = sorted((workspace / "generated" / "94-hummingbird" / "sfsl").glob("*.png"))
    assert len(images) == 2
    from PIL import Image

    pixels = np.asarray(Image.open(images[0]))
    assert pixels.shape == (64, 64, 3) and pixels.std() > 0


@pytest.mark.skipif(not OTHER_PYTHON, reason="SPURGEN_OTHER_PYTHON (another environment) not given")
def test_lora_trained_in_the_other_environment_loads_here(tiny_sd_dir: Path, rigged, tmp_path: Path) -> None:
    """A LoRA written under the newest peft, transformers and diffusers loads under the floors, and the reverse."""
    other = train(OTHER_PYTHON, tmp_path / "other", tiny_sd_dir, rigged)
    assert load_and_compare(str(tiny_sd_dir), str(other), ALPHA, RANK) > 1e-3


@pytest.mark.skipif(not OTHER_PYTHON, reason="SPURGEN_OTHER_PYTHON (another environment) not given")
def test_lora_trained_here_loads_in_the_other_environment(here_lora: Path, tiny_sd_dir: Path, tmp_path: Path) -> None:
    script = tmp_path / "load.py"
    script.write_text(LOAD_WITH_PLAIN_DIFFUSERS)
    done = subprocess.run([OTHER_PYTHON, str(script), str(tiny_sd_dir), str(here_lora), str(ALPHA), str(RANK)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert float(done.stdout.split()[-1]) > 1e-3


def _safetensors_header(path: Path) -> dict:
    import struct

    data = path.read_bytes()
    return json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])
