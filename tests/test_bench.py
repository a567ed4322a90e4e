"""python -m bench's plumbing: every stage accepts its size's arguments on every device, and the table renders
every kind of record (a stage without a baseline, a failed stage)."""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
from pathlib import Path

import pytest

from bench.__main__ import STAGES, _stage_arguments, print_table


@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("size", ["tiny", "full"])
def test_each_stage_takes_its_size_arguments(stage: str, device: str, size: str) -> None:
    module = importlib.import_module(STAGES[stage])
    arguments = _stage_arguments(stage, module, size, repeats=2, threads=None, device=device)
    inspect.signature(module.run).bind(**arguments)  # raises TypeError on a key run() does not take
    if device == "cuda" and size == "full" and hasattr(module, "GPU_SIZES"):
        assert arguments.items() >= module.GPU_SIZES["full"].items()


def test_the_table_shows_records_without_a_baseline_and_failed_stages(capsys: pytest.CaptureFixture[str]) -> None:
    print_table([
        {"stage": "demo", "name": "spurgen demo", "ours": 222.0, "baseline": None, "ratio": None, "unit": "s",
         "target_text": "<= 600 s", "verdict": "ok"},
        {"stage": "generate", "name": "generate", "error": "OSError: disk full"},
        {"stage": "evaluate", "name": "evaluate (x)", "ours": 5.5, "baseline": 6.0, "ratio": 0.917, "paired_ratio": 0.9,
         "unit": "images/s", "target_text": ">= 0.8", "verdict": "ok", "ours_peak_mb": 10.0, "baseline_peak_mb": 9.0},
    ], "title")
    out = capsys.readouterr().out
    assert "222.000 s" in out and "<= 600 s" in out
    assert "failed: OSError: disk full" in out
    assert "0.900" in out and "10 / 9 MB" in out


def test_a_run_goes_to_the_file_and_commit_that_gpu_sh_sets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench._common import COMMIT_ENV, RESULTS_ENV, save_run

    # bench/gpu.sh: one record file per call, and the commit found before the tree was copied (no .git there).
    results = tmp_path / "out" / "2026-12-02-h200-full.json"
    monkeypatch.setenv(RESULTS_ENV, str(results))
    monkeypatch.setenv(COMMIT_ENV, "abc1234+dirty")
    save_run([{"stage": "help", "name": "spurgen --help"}], "full", "cpu")
    save_run([{"stage": "mfu", "name": "dreambooth step, batch 8+8"}], "full", "cpu")
    stored = json.loads(results.read_text())
    assert [run["git_commit"] for run in stored["runs"]] == ["abc1234+dirty"] * 2
    assert set(stored["latest"]) == {"full/help/spurgen --help", "full/mfu/dreambooth step, batch 8+8"}


def test_preflight_names_each_missing_or_out_of_range_requirement(tmp_path: Path) -> None:
    from bench.preflight import card_name, requirement_problems

    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\ndependencies = ["torch>=2.2", "rich<1", "no-such-package-xyz>=1",\n'
                         '                "tomli>=1.1; python_version < \'3.0\'"]\n')
    problems = requirement_problems(pyproject)
    assert len(problems) == 2
    assert problems[0].startswith("rich ") and "outside <1" in problems[0]
    assert problems[1] == "no-such-package-xyz: not installed (needs >=1)"
    assert card_name("cpu") == "cpu"


def test_gpu_sh_is_valid_bash() -> None:
    script = Path(__file__).resolve().parent.parent / "bench" / "gpu.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)


@pytest.mark.parametrize(("module", "size"), [("bench.sfsl", "full-flux"), ("bench.flux", "full")])
def test_full_size_flux_on_a_cpu_says_it_is_too_large_instead_of_shrinking_it(module: str, size: str) -> None:
    stage = importlib.import_module(module)
    with pytest.raises(RuntimeError, match=rf"FLUX.1 at full size is too large for a CPU step .* --size {size} on a "):
        stage.run(**stage.SIZES[size], device="cpu")


@pytest.mark.parametrize(("stage", "title", "script", "arch"), [
    ("sdxl", "SDXL", "train_dreambooth_lora_sdxl.py", "sdxl-tiny"),
    ("flux", "FLUX.1", "train_dreambooth_lora_flux.py", "flux-tiny"),
])
@pytest.mark.slow  # a bench subprocess, about 13 s each: CI runs them, make test-fast does not
def test_the_family_stage_at_tiny_size_prints_and_stores_its_three_rows(tmp_path: Path, stage: str, title: str,
                                                                         script: str, arch: str) -> None:
    import os
    import sys

    from bench._common import RESULTS_ENV

    results = tmp_path / "results.json"
    env = {**os.environ, RESULTS_ENV: str(results), "HF_HUB_OFFLINE": "1"}
    env.pop("SPURGEN_BENCH_CACHE", None)
    done = subprocess.run([sys.executable, "-m", "bench", "--only", stage, "--repeats", "1", "--threads", "1"],
                          cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    [run] = json.loads(results.read_text())["runs"]
    rows = {record["name"].split(" (")[0]: record for record in run["records"]}
    assert list(rows) == [f"{title} dreambooth-te step vs {script}", f"{title} sfsl step vs {script}",
                          f"{title} sfsl step vs its dreambooth-te step"]
    for record in rows.values():
        assert record["stage"] == stage and f"{arch}, 64 px, cpu" in record["name"]
        assert record["ours"] > 0 and record["baseline"] > 0 and record["ratio"] == pytest.approx(
            record["seconds_per_step"]["reference"] / record["seconds_per_step"]["ours"])
    targets = [(r["target_text"], r["target"]) for r in rows.values()]
    assert targets == [(">= 1.11 (time <= 0.9x)", pytest.approx(1 / 0.9)), ("n/a (SFSL's cost)", None),
                       (">= 0.769 (time <= 1.3x)", pytest.approx(1 / 1.3))]
    # the two ours rows of the SFSL step are one measurement; its rate over the references' is what the table shows
    sfsl = [record["ours"] for name, record in rows.items() if name.startswith(f"{title} sfsl step")]
    assert sfsl[0] == sfsl[1]
    assert f"{title} dreambooth-te step vs" in done.stdout and "n/a (SFSL's cost)" in done.stdout


def test_the_sdxl_reference_step_conditions_as_the_sdxl_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    """train_dreambooth_lora_sdxl.py's encode_prompt gives what StableDiffusionXLPipeline.encode_prompt (spurgen's
    family) gives; its add_time_ids are the reference image's original size, crop and the target size."""
    import torch

    from bench.finetune import Bench, _sdxl_conditioning, release

    monkeypatch.delenv("SPURGEN_BENCH_CACHE", raising=False)
    trainer, _ = Bench("sdxl-tiny", device="cpu").trainer("dreambooth-te")
    try:
        hidden, added = _sdxl_conditioning(trainer, trainer.text_encoders, 2, torch.float32)()
        ours = trainer.family.encode_prompts(trainer.text_encoders, trainer.prompt_ids, trainer.resolution)
        torch.testing.assert_close(hidden, ours["prompt_embeds"].repeat(2, 1, 1))
        torch.testing.assert_close(added["text_embeds"], ours["pooled_prompt_embeds"].repeat(2, 1))
        # the bench's references are 600 x 600: resized to 64 px, nothing is cropped
        assert added["time_ids"].tolist() == [[600, 600, 0, 0, 64, 64]] * 4
    finally:
        release(trainer)


def test_the_flux_reference_step_feeds_the_transformer_as_the_flux_pipeline(monkeypatch: pytest.MonkeyPatch) -> None:
    """train_dreambooth_lora_flux.py's step, at batch 2+2: its text is FluxPipeline.encode_prompt's of the instance
    and class prompts, b rows each; its latents are the VAE's, shifted and scaled, noised to (1 - sigma) x (noise
    zeroed) and packed as FluxPipeline._pack_latents packs them, with _prepare_latent_image_ids' positions."""
    import torch
    from diffusers import FluxPipeline, FluxTransformer2DModel
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from bench.finetune import Bench, reference_step, release
    from spurgen.finetune.trainer import load_pixels

    monkeypatch.delenv("SPURGEN_BENCH_CACHE", raising=False)
    trainer, config = Bench("flux-tiny", batch_size=2, device="cpu").trainer("dreambooth-te", resolution=64)
    calls: list[dict[str, torch.Tensor]] = []
    forward = FluxTransformer2DModel.forward

    def recorded(self: FluxTransformer2DModel, **kwargs: torch.Tensor) -> object:
        calls.append({k: v.detach().clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})
        return forward(self, **kwargs)

    monkeypatch.setattr(FluxTransformer2DModel, "forward", recorded)
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    try:
        step = reference_step(trainer, config)
        with monkeypatch.context() as no_noise:
            no_noise.setattr(torch, "randn_like", torch.zeros_like)
            step(0)
    finally:
        release(trainer)
    [call] = calls
    pipe = FluxPipeline.from_pretrained(trainer.base.path)
    with torch.no_grad():
        prompt_embeds, pooled, text_ids = pipe.encode_prompt(
            [trainer.plan.instance_prompt, trainer.plan.class_prompt], None, num_images_per_prompt=2)
        pixels = load_pixels(trainer.plan.references[:1], 64).repeat(4, 1, 1, 1)
        latents = (pipe.vae.encode(pixels).latent_dist.mean - pipe.vae.config.shift_factor) \
            * pipe.vae.config.scaling_factor
    torch.testing.assert_close(call["encoder_hidden_states"], prompt_embeds)
    torch.testing.assert_close(call["pooled_projections"], pooled)
    torch.testing.assert_close(call["txt_ids"], text_ids)
    torch.testing.assert_close(call["img_ids"], FluxPipeline._prepare_latent_image_ids(4, 16, 16, "cpu", torch.float32))
    # the timestep input is a scheduler timestep / 1000; its sigma scales the clean latents
    scheduler = pipe.scheduler
    rows = (scheduler.timesteps[None] - call["timestep"][:, None] * 1000).abs().argmin(dim=1)
    sigma = scheduler.sigmas[rows].view(-1, 1, 1, 1)
    torch.testing.assert_close(call["hidden_states"], FluxPipeline._pack_latents((1 - sigma) * latents, 4, 4, 32, 32))
    assert call["guidance"].tolist() == [3.5] * 4
