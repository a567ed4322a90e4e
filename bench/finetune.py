"""finetune's training step against a reference step written the way diffusers' train_dreambooth(_lora).py
computes it, on the same random Stable Diffusion model, batch and precision, in the same process.

Both train LoRA adapters (rank 4) on the UNet and the text encoder with prior preservation: per step b
reference images and b class images at the model's resolution. The reference encodes the 2b images with
the VAE and the 2b prompt rows with the text encoder every step, as the diffusers script does; ours samples
cached latent distributions and encodes the two prompts once per step. "ours + SFSL" adds the spurious
feature similarity loss with a ResNet-50 (random weights, the architecture of the robust model; --sfsl-arch
picks another timm model): once on every row (bound 999, the worst case) and once with the default bound. Target: ours without SFSL at most
1.05x the reference's time per step (rate ratio >= 0.95). Peak memory is torch's allocator peak on a GPU
and the growth of the resident set over the timed steps on a CPU.

    python -m bench.finetune [--arch tiny|full] [--steps 10] [--repeats 5] [--batch-size 1]
                             [--mixed-precision no|fp16|bf16] [--sfsl-arch resnet50.tv_in1k]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from ._common import Measurement, _rss_mb, compare, measure, save_result

RANK = 4


def _workspace(root: Path, references: int) -> Any:
    from spurgen.labels import get_label_set
    from spurgen.workspace import Workspace, atomic_write_json

    workspace = Workspace(root / "ws")
    folder = workspace.refs_dir(get_label_set("imagenet").resolve("94"))
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(references):  # smooth random images, like photos rather than noise
        small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(small).resize((600, 600), Image.BICUBIC).save(folder / f"ref{i}.png")
    atomic_write_json(folder / "selection.json", {"selected": [f"ref{i}.png" for i in range(references)]})
    return workspace


def _sfsl_classifier(root: Path, arch: str) -> str:
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False)
    path = root / "sfsl-model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return f"robust-rn50={arch}@{path}"


def _reference_step(trainer: Any, config: Any) -> Callable[[], None]:
    """One step of diffusers' DreamBooth LoRA script on the trainer's data, with its own models and optimizer."""
    import torch
    import torch.nn.functional as F

    from spurgen._base_model import load_components
    from spurgen._lora import TEXT_ENCODER_TARGETS, UNET_TARGETS, add_lora
    from spurgen.finetune import _load_pixels

    accelerator, plan = trainer.accelerator, trainer.plan
    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    parts = load_components(trainer.base, unet_dtype=half, text_encoder_dtype=half, vae_dtype=half)
    for model in (parts.unet, parts.text_encoder, parts.vae):
        model.requires_grad_(False).to(accelerator.device)
    add_lora(parts.unet, UNET_TARGETS, RANK, RANK)
    add_lora(parts.text_encoder, TEXT_ENCODER_TARGETS, RANK, RANK)
    params = [p for m in (parts.unet, parts.text_encoder) for p in m.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    parts.unet.train()
    parts.text_encoder.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    unet, text_encoder, optimizer = accelerator.prepare(parts.unet, parts.text_encoder, optimizer)
    b = config.batch_size
    # The script's collate_fn: b instance examples then b class examples, one row of prompt ids each (which
    # images fill the rows does not change the work).
    pixels = _load_pixels(plan.references[:1], trainer.resolution).repeat(2 * b, 1, 1, 1).to(accelerator.device, half)
    ids = torch.cat([trainer.prompt_ids[:1].repeat(b, 1), trainer.prompt_ids[1:].repeat(b, 1)])
    scheduler = parts.noise_scheduler

    def step() -> None:
        with accelerator.accumulate(unet, text_encoder):
            model_input = parts.vae.encode(pixels).latent_dist.sample() * parts.vae.config.scaling_factor
            noise = torch.randn_like(model_input)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(model_input),),
                                      device=model_input.device)
            noisy = scheduler.add_noise(model_input, noise, timesteps)
            with accelerator.autocast():
                hidden = text_encoder(ids)[0]
                pred = unet(noisy, timesteps, hidden).sample
            target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(model_input, noise, timesteps)
            pred, pred_prior = torch.chunk(pred, 2, dim=0)
            target, target_prior = torch.chunk(target, 2, dim=0)
            loss = F.mse_loss(pred.float(), target.float()) + F.mse_loss(pred_prior.float(), target_prior.float())
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            loss.detach().item()  # the script logs the loss every step

    return step


def _timed(steps: int, fn: Callable[[], None], repeats: int, device: str) -> Measurement:
    """Times ``steps`` calls of ``fn``; peak memory is the allocator peak (GPU) or the RSS growth (CPU)."""
    before = _rss_mb() if device == "cpu" else 0.0

    def run() -> None:
        for _ in range(steps):
            fn()

    measurement = measure(run, repeats=repeats, warmup=1, device=device)
    if measurement.peak_memory_mb is not None and before is not None:
        measurement.peak_memory_mb -= before
    return measurement


def run(arch: str = "tiny", steps: int = 10, repeats: int = 5, batch_size: int = 1, mixed_precision: str = "no",
        sfsl_arch: str = "resnet50.tv_in1k") -> dict[str, Any]:
    import torch

    from spurgen._sd_builders import build_stable_diffusion
    from spurgen.config import FinetuneConfig
    from spurgen.finetune import prepare_finetune

    root = Path(tempfile.mkdtemp(prefix="spurgen-bench-finetune-"))
    base = build_stable_diffusion(root / "sd", arch, seed=0)
    workspace = _workspace(root, references=6)
    flags = [_sfsl_classifier(root, sfsl_arch)]

    def trainer(preset: str, bound: int) -> Any:
        config = FinetuneConfig(classes=["94"], model=str(base), preset=preset, rank=RANK, batch_size=batch_size,
                                steps=10_000, num_class_images=4, sample_steps=2, sample_batch_size=4,
                                mixed_precision=mixed_precision, sfsl_max_timestep=bound, run_name=f"{preset}-{bound}")
        config.validate()
        setup = prepare_finetune(config, workspace, flags)
        return setup.trainer(setup.plans[0], config, workspace), config

    plain, config = trainer("dreambooth-te", 600)
    device = plain.accelerator.device.type
    counter = iter(range(10**9))
    reference = _timed(steps, _reference_step(plain, config), repeats, device)
    ours = _timed(steps, lambda: plain.train_step(next(counter)), repeats, device)
    plain.close()
    label = f"finetune step ({arch}, {device}, {plain.accelerator.mixed_precision}, batch {batch_size}+{batch_size})"
    result = compare(label, ours, reference, items=steps, unit="steps", target=0.95)
    print(f"  seconds/step: reference {reference.median / steps:.4f}, ours {ours.median / steps:.4f} "
          f"({ours.median / reference.median:.3f}x)")
    result["sfsl"] = {"model": sfsl_arch}
    for bound in (999, FinetuneConfig().sfsl_max_timestep):
        with_sfsl, _ = trainer("sfsl", bound)
        counter = iter(range(10**9))
        measured = _timed(steps, lambda: with_sfsl.train_step(next(counter)), repeats, device)
        with_sfsl.close()
        overhead = measured.median / ours.median - 1
        share = 1 - ours.median / measured.median
        memory = f", peak {measured.peak_memory_mb:.0f} MB" if measured.peak_memory_mb is not None else ""
        print(f"  ours + SFSL ({sfsl_arch}, rows with t <= {bound}): {measured.median / steps:.4f} s/step{memory}; "
              f"overhead +{overhead:.1%} over ours, SFSL {share:.1%} of the step")
        result["sfsl"][str(bound)] = {"seconds_per_step": measured.median / steps, "overhead": overhead, "share": share,
                                      "peak_mb": measured.peak_memory_mb, "seconds": measured.seconds}
    if device == "cuda":
        result["device_name"] = torch.cuda.get_device_name()
    save_result("finetune", result)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="tiny", choices=["tiny", "full", "full-v2"])
    parser.add_argument("--steps", type=int, default=10, help="steps per timed repetition")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    parser.add_argument("--sfsl-arch", default="resnet50.tv_in1k", help="timm architecture of the SFSL classifier")
    args = parser.parse_args()
    run(args.arch, args.steps, args.repeats, args.batch_size, args.mixed_precision, args.sfsl_arch)


if __name__ == "__main__":
    main()
