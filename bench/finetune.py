"""finetune's training step per preset against a reference step written the way diffusers'
train_dreambooth(_lora).py computes it, on the same random Stable Diffusion model, batch and precision, in the
same process, in turns.

Both train LoRA adapters (rank 4) with prior preservation: per step b reference images and b class images at
the model's resolution. The reference encodes the 2b images with the VAE every step, and, when it trains the
text encoder, the 2b prompt rows too, as the diffusers script does; ours samples cached latent distributions
and encodes the two prompts once per step. Presets: ``dreambooth`` (UNet; reference without
--train_text_encoder), ``dreambooth-te`` (UNet + text encoder) and ``sfsl`` (dreambooth-te + the spurious
feature similarity loss through a ResNet-50 with random weights, at the default timestep bound and
--sfsl-every, so SFSL is computed on every step; diffusers has no counterpart, so its row shows SFSL's cost
over the reference). Target: ours at most 0.9x the reference's time per step (rate ratio >= 1/0.9 = 1.11), with
no more peak memory. Peak memory is each side's growth over the step (torch's allocator on a GPU, the resident
set on a CPU), so that the other side's weights in the same process do not count.
``bench.sfsl`` measures what each of SFSL's cost-cutting measures buys; ``bench.sdxl`` the step of SDXL against
train_dreambooth_lora_sdxl.py's, ``bench.flux`` FLUX.1's against train_dreambooth_lora_flux.py's
(:func:`reference_step` follows the base model's family).

    python -m bench.finetune [--size tiny|full] [--steps 10] [--repeats 5] [--batch-size 1]
                             [--mixed-precision no|fp16|bf16] [--presets dreambooth,dreambooth-te,sfsl]
"""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
from PIL import Image

from ._common import (add_common_arguments, add_training_arguments, apply_threads, compare, measure_interleaved,
                      random_stable_diffusion, save_run)

if TYPE_CHECKING:
    import torch

RANK = 4
# Issue target: a step in at most 0.9x the reference's time, i.e. a rate at least 1/0.9 of the reference's.
TIME_TARGET_RATE = 1 / 0.9
PRESETS = ("dreambooth", "dreambooth-te", "sfsl")
# run()'s arguments per --size: the full size is SD 1.5's architecture with gradient checkpointing (a CPU
# with 24 GB holds one model and its reference at batch 1+1).
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"arch": "tiny", "sfsl_arch": "resnet50.tv_in1k", "steps": 10},
    "full": {"arch": "full", "sfsl_arch": "resnet50.tv_in1k", "steps": 1, "gradient_checkpointing": True},
}
# A GPU takes a step in a fraction of a second: several steps per timed turn; and it holds SD 1.5 at batch 1+1
# without gradient checkpointing, as users train it there.
GPU_SIZES: dict[str, dict[str, Any]] = {"full": {"steps": 5, "gradient_checkpointing": False}}



def _workspace(root: Path, references: int) -> Any:
    from spurgen.labels import get_label_set
    from spurgen.workspace import Workspace, atomic_write_json

    workspace = Workspace(root)
    folder = workspace.refs_dir(get_label_set("imagenet").resolve("94"))
    folder.mkdir(parents=True, exist_ok=True)  # a cached workspace: the same references are written again
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


@dataclass
class Bench:
    """A random Stable Diffusion model, a workspace with references and an SFSL classifier, in a temporary folder
    removed at exit (the model is cached with ``SPURGEN_BENCH_CACHE=DIR``: :func:`random_stable_diffusion`).

    Args:
        arch: Random Stable Diffusion architecture.
        sfsl_arch: timm architecture of the SFSL classifier.
        batch_size: Reference (and class) images per step.
        mixed_precision: ``no``, ``fp16`` or ``bf16``; ``None``: bf16 on a GPU, no on a CPU.
        gradient_checkpointing: finetune's --gradient-checkpointing.
        device: ``auto`` (the GPU when present) or ``cpu``.
    """

    arch: str = "tiny"
    sfsl_arch: str = "resnet50.tv_in1k"
    batch_size: int = 1
    mixed_precision: str | None = None
    gradient_checkpointing: bool = False
    device: str = "auto"

    def __post_init__(self) -> None:
        import torch

        if self.mixed_precision is None:
            self.mixed_precision = "bf16" if self.device != "cpu" and torch.cuda.is_available() else "no"
        self.root = Path(tempfile.mkdtemp(prefix="spurgen-bench-finetune-"))
        atexit.register(shutil.rmtree, self.root, True)
        cache = os.environ.get("SPURGEN_BENCH_CACHE")
        self.base = random_stable_diffusion(self.arch, self.root)
        # In the cache, the workspace keeps its class images (generated once per model and resolution).
        self.workspace = _workspace(Path(cache) / f"ws-{self.arch}" if cache else self.root / "ws", references=6)
        self.flags = [_sfsl_classifier(self.root, self.sfsl_arch)]

    def trainer(self, preset: str, **settings: Any) -> tuple[Any, Any]:
        """finetune's Trainer for a preset (and any FinetuneConfig settings), and its config."""
        from spurgen.config import FinetuneConfig
        from spurgen.finetune import prepare_finetune

        settings = {"sfsl_max_timestep": FinetuneConfig().sfsl_max_timestep, **settings}
        config = FinetuneConfig(classes=["94"], model=str(self.base), preset=preset, rank=RANK,
                                batch_size=self.batch_size, steps=10_000, num_class_images=2, sample_steps=2,
                                sample_batch_size=2, mixed_precision=self.mixed_precision,
                                gradient_checkpointing=self.gradient_checkpointing, device=self.device,
                                run_name=f"{preset}-{len(list(self.workspace.root.glob('models/*/*')))}", **settings)
        config.validate()
        setup = prepare_finetune(config, self.workspace, self.flags)
        return setup.trainer(setup.plans[0], config, self.workspace), config


def reference_step(trainer: Any, config: Any) -> Callable[[int], None]:
    """One step of the family's diffusers DreamBooth LoRA script (train_dreambooth_lora.py for SD,
    train_dreambooth_lora_sdxl.py for SDXL, train_dreambooth_lora_flux.py for FLUX.1) on the trainer's data, with its
    own models and optimizer; it trains the text encoders when the trainer does (FLUX.1's CLIP, not T5, as its
    script).

    Args:
        trainer: The finetune Trainer whose base model, references, prompts and accelerator the step uses.
        config: The trainer's FinetuneConfig (batch size, gradient checkpointing).
    """
    import torch

    from spurgen._base_model import load_components
    from spurgen._lora import add_lora
    from spurgen.finetune.trainer import frozen_dtype, load_pixels

    accelerator, family = trainer.accelerator, trainer.family
    if family.name not in _REFERENCE_CONDITIONING:
        raise ValueError(f"no reference step for {family.title}: add its script's conditioning to bench.finetune")
    half = frozen_dtype(accelerator)
    # The SDXL script keeps its VAE in float32 whatever the mixed precision (SDXL's overflows in float16).
    vae_dtype = torch.float32 if family.name == "sdxl" else half
    parts = load_components(trainer.base, unet_dtype=half, text_encoder_dtype=half, vae_dtype=vae_dtype)
    for model in (parts.unet, *parts.text_encoders, parts.vae):
        model.requires_grad_(False).to(accelerator.device)
    train_text_encoder = trainer.train_text_encoder
    # The encoders the script adapts, by position (all but FLUX.1's T5); it adapts every layer of them, used or not.
    adapted = [i for i, name in enumerate(family.text_encoders)
               if train_text_encoder and name in family.trained_text_encoders]
    # The family's targets are its script's.
    add_lora(parts.unet, family.lora_targets[family.denoiser], RANK, RANK)
    for i in adapted:
        add_lora(parts.text_encoders[i], family.lora_targets[family.text_encoders[i]], RANK, RANK)
    params = [p for m in (parts.unet, *parts.text_encoders) for p in m.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    parts.unet.train()
    for i in adapted:  # the others stay in eval mode, as from_pretrained leaves them (T5's dropout)
        parts.text_encoders[i].train()
    if config.gradient_checkpointing:  # the script's --gradient_checkpointing
        parts.unet.enable_gradient_checkpointing()
        for encoder in (parts.text_encoders[i] for i in adapted):  # transformers 5.23 renamed the method
            enable = getattr(encoder, "activation_checkpointing_enable", None)
            (enable or encoder.gradient_checkpointing_enable)()
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2)
    unet, *encoders, optimizer = accelerator.prepare(parts.unet, *parts.text_encoders, optimizer)
    trained = (unet, *[encoders[i] for i in adapted])
    b = config.batch_size
    # The script's collate_fn: b instance examples then b class examples (which images fill the rows does not
    # change the work).
    pixels = load_pixels(trainer.plan.references[:1], trainer.resolution).repeat(2 * b, 1, 1, 1)
    pixels = pixels.to(accelerator.device, parts.vae.dtype)
    condition = _REFERENCE_CONDITIONING[family.name](trainer, encoders, b, half)
    loss_of = _REFERENCE_LOSS[family.name](accelerator, parts, unet, condition)
    # 0 but for FLUX.1's VAE, whose script shifts its latents before scaling them.
    shift, scale = family.latent_shift(dict(parts.vae.config)), parts.vae.config.scaling_factor

    def step(_: int) -> None:  # the step number, which the script does not need
        with accelerator.accumulate(*trained):
            latents = parts.vae.encode(pixels).latent_dist.sample()  # every step: the scripts cache no latents
            loss = loss_of(((latents - shift) * scale).to(half))
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad()
            loss.detach().item()  # the script logs the loss every step

    return step


# A reference step's conditioning of its 2b rows: the denoiser's encoder hidden states and its other conditioning.
Conditioning = Callable[[], tuple["torch.Tensor", "dict[str, torch.Tensor] | None"]]
# A reference step's loss of its 2b rows (b instance rows, then b class rows) from their clean latents.
ReferenceLoss = Callable[["torch.Tensor"], "torch.Tensor"]


def _ddpm_loss(accelerator: Any, parts: Any, unet: Any, condition: Conditioning) -> ReferenceLoss:
    """train_dreambooth_lora(_sdxl).py's: uniform integer timesteps, the scheduler's noise, the UNet, and the MSE of
    the instance and the class halves against epsilon or v, added.

    Args:
        accelerator: The trainer's accelerator (autocast).
        parts: The reference's loaded components (its noise scheduler).
        unet: The reference's prepared UNet.
        condition: The family's :data:`Conditioning`.
    """
    import torch
    import torch.nn.functional as F

    scheduler = parts.noise_scheduler

    def loss(model_input: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(model_input)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(model_input),),
                                  device=model_input.device)
        noisy = scheduler.add_noise(model_input, noise, timesteps)
        with accelerator.autocast():
            hidden, added = condition()
            pred = unet(noisy, timesteps, hidden, added_cond_kwargs=added).sample
        target = (
            noise
            if scheduler.config.prediction_type == "epsilon"
            else scheduler.get_velocity(model_input, noise, timesteps)
        )
        pred, pred_prior = torch.chunk(pred, 2, dim=0)
        target, target_prior = torch.chunk(target, 2, dim=0)
        return F.mse_loss(pred.float(), target.float()) + F.mse_loss(pred_prior.float(), target_prior.float())

    return loss


def _flow_loss(accelerator: Any, parts: Any, transformer: Any, condition: Conditioning) -> ReferenceLoss:
    """train_dreambooth_lora_flux.py's, weighting scheme ``none`` (its default): u from
    compute_density_for_timestep_sampling, the timesteps at the indices u * T of the scheduler's table and their
    sigmas looked up as its get_sigmas does, x_t = (1 - sigma) x + sigma noise packed into 2 x 2 patches with
    their positions, the guidance input when the transformer has one, the transformer at ``timestep / 1000``, its
    output unpacked, the target noise - x weighted by compute_loss_weighting_for_sd3, and the instance and class
    halves' per-row mean squared errors, averaged and added.

    Args:
        accelerator: The trainer's accelerator (autocast).
        parts: The reference's loaded components (its noise scheduler and VAE).
        transformer: The reference's prepared transformer.
        condition: :func:`_flux_conditioning`'s.
    """
    import torch
    from diffusers import FluxPipeline
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    from spurgen.families.flux import TRAINING_GUIDANCE

    scheduler, device = parts.noise_scheduler, accelerator.device  # the script's noise_scheduler_copy
    vae_scale_factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
    # the script's --guidance_scale default, FLUX.1-dev's distilled guidance; FLUX.1-schnell has no such input
    has_guidance = accelerator.unwrap_model(transformer).config.guidance_embeds
    guidance = torch.tensor([TRAINING_GUIDANCE], device=device) if has_guidance else None

    def get_sigmas(timesteps: torch.Tensor, n_dim: int, dtype: torch.dtype) -> torch.Tensor:
        """The script's: each timestep's row of the table found on the device and read back (one wait per row)."""
        sigmas = scheduler.sigmas.to(device=device, dtype=dtype)
        schedule_timesteps = scheduler.timesteps.to(device)
        indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps.to(device)]
        sigma = sigmas[indices].flatten()
        return sigma.view(-1, *[1] * (n_dim - 1))

    def loss(model_input: torch.Tensor) -> torch.Tensor:
        n, channels, height, width = model_input.shape
        latent_image_ids = FluxPipeline._prepare_latent_image_ids(n, height // 2, width // 2, device,
                                                                  model_input.dtype)
        noise = torch.randn_like(model_input)
        u = compute_density_for_timestep_sampling(weighting_scheme="none", batch_size=n, logit_mean=0.0,
                                                  logit_std=1.0, mode_scale=1.29)
        indices = (u * scheduler.config.num_train_timesteps).long()
        timesteps = scheduler.timesteps[indices].to(device=device)
        sigmas = get_sigmas(timesteps, model_input.ndim, model_input.dtype)
        noisy = (1.0 - sigmas) * model_input + sigmas * noise
        packed = FluxPipeline._pack_latents(noisy, n, channels, height, width)
        with accelerator.autocast():
            prompt_embeds, added = condition()
            pred = transformer(hidden_states=packed, timestep=timesteps / 1000,
                               guidance=None if guidance is None else guidance.expand(n),
                               encoder_hidden_states=prompt_embeds, img_ids=latent_image_ids, return_dict=False,
                               **added)[0]
        pred = FluxPipeline._unpack_latents(pred, height * vae_scale_factor, width * vae_scale_factor,
                                            vae_scale_factor)
        weighting = compute_loss_weighting_for_sd3(weighting_scheme="none", sigmas=sigmas)
        target = noise - model_input
        halves = zip(torch.chunk(pred, 2), torch.chunk(target, 2), torch.chunk(weighting, 2))
        # instance loss + prior_loss_weight (1) x the class images' loss
        return sum(torch.mean((w.float() * (p.float() - t.float()) ** 2).reshape(len(t), -1), 1).mean()
                   for p, t, w in halves)

    return loss


def _sd_conditioning(trainer: Any, encoders: list[Any], b: int, dtype: Any) -> Conditioning:
    """train_dreambooth_lora.py's: the text encoder's last hidden states of one row of prompt ids per example,
    every step (without gradients when it is frozen); no added conditioning."""
    import torch

    prompt_ids = trainer.prompt_ids[0]  # SD has one tokenizer
    ids = torch.cat([prompt_ids[:1].repeat(b, 1), prompt_ids[1:].repeat(b, 1)])

    def condition() -> tuple[torch.Tensor, None]:
        with torch.set_grad_enabled(trainer.train_text_encoder):
            return encoders[0](ids)[0], None

    return condition


def _sdxl_conditioning(trainer: Any, encoders: list[Any], b: int, dtype: Any) -> Conditioning:
    """train_dreambooth_lora_sdxl.py's: its encode_prompt on the instance and class prompts' ids (each encoder's
    penultimate hidden states, concatenated, and the last encoder's pooled output), every step when the encoders
    train and once before the loop when they do not, repeated b times; and add_time_ids per example, the image's
    original size, the top left of its center crop and the target size (compute_time_ids)."""
    import torch

    def encode() -> tuple[torch.Tensor, torch.Tensor]:
        hidden = []
        for encoder, ids in zip(encoders, trainer.prompt_ids):
            output = encoder(ids, output_hidden_states=True, return_dict=False)
            pooled = output[0]
            hidden.append(output[-1][-2])
        return torch.cat(hidden, dim=-1), pooled

    if not trainer.train_text_encoder:
        with torch.no_grad():
            frozen = encode()
    res = trainer.resolution
    with Image.open(trainer.plan.references[0]) as image:
        height, width = image.height, image.width
    scale = res / min(height, width)  # resized shorter side first, then center-cropped
    top, left = round((height * scale - res) / 2), round((width * scale - res) / 2)
    time_ids = torch.tensor([[height, width, top, left, res, res]] * 2 * b, device=trainer.device, dtype=dtype)

    def condition() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden, pooled = encode() if trainer.train_text_encoder else frozen
        return hidden.repeat(b, 1, 1), {"text_embeds": pooled.repeat(b, 1), "time_ids": time_ids}

    return condition


def _flux_conditioning(trainer: Any, encoders: list[Any], b: int, dtype: Any) -> Conditioning:
    """train_dreambooth_lora_flux.py's encode_prompt on the instance and class prompts' ids, b rows each: T5's last
    hidden states, CLIP's pooled output and text_ids (zeros, one row per T5 token). When CLIP trains, both encoders
    run on the 2b rows of ids every step (T5 frozen, but not cached); when it does not, the prompts are encoded
    once before the loop.

    The script repeats the stacked [instance; class] ids len(prompts) times, and with prior preservation
    len(prompts) is already 2b: 4b rows of text for 2b latents, which the transformer refuses (diffusers issue
    13292, fixed in the FLUX.2 and Qwen-Image scripts with b repeats, grouped by prompt); its cached path
    concatenates the two prompts' text_ids to twice the text's length (issue 10722). Here: b instance rows, then b
    class rows, and one text_ids.

    Args:
        trainer: The finetune Trainer (its tokenized prompts: CLIP's, then T5's).
        encoders: CLIP's text encoder (as accelerate prepared it), then T5's.
        b: Reference images per step.
        dtype: The frozen weights' dtype, which the script casts the embeddings to.
    """
    import torch

    clip, t5 = encoders
    rows = [ids.repeat_interleave(b, dim=0) for ids in trainer.prompt_ids]

    def encode(ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = clip(ids[0], output_hidden_states=False).pooler_output.to(dtype)
        return t5(ids[1])[0].to(dtype), pooled

    if not trainer.train_text_encoder:
        with torch.no_grad():
            frozen = encode(rows)
    text_ids = torch.zeros(rows[1].shape[1], 3, device=trainer.device, dtype=dtype)

    def condition() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        prompt_embeds, pooled = encode(rows) if trainer.train_text_encoder else frozen
        return prompt_embeds, {"pooled_projections": pooled, "txt_ids": text_ids}

    return condition


# The reference step's conditioning and loss per family: what differs between the families' scripts.
_REFERENCE_CONDITIONING: dict[str, Callable[[Any, list[Any], int, Any], Conditioning]] = {
    "sd": _sd_conditioning, "sdxl": _sdxl_conditioning, "flux": _flux_conditioning}
_REFERENCE_LOSS: dict[str, Callable[[Any, Any, Any, Conditioning], ReferenceLoss]] = {
    "sd": _ddpm_loss, "sdxl": _ddpm_loss, "flux": _flow_loss}


def _steps(fn: Callable[[int], Any], steps: int) -> Callable[[], None]:
    """Calls ``fn(step)`` for ``steps`` consecutive steps, continuing the count on every call."""
    counter = iter(range(10**9))

    def run() -> None:
        for _ in range(steps):
            fn(next(counter))

    return run


def trainer_steps(trainer: Any, steps: int) -> Callable[[], None]:
    """Takes ``steps`` of the trainer's steps per call and reads their statistics as finetune's loop does (every
    ``trainer.read_every`` steps), so that the reads' waits are in the time."""
    def step(index: int) -> None:
        trainer.train_step(index)
        if (index + 1) % trainer.read_every == 0:
            trainer.read_rows()

    return _steps(step, steps)


def release(*trainers: Any) -> None:
    """Lets go of trainers' models, so that a full-size benchmark holds one model (and its reference) at a time."""
    import torch

    for trainer in trainers:
        trainer.close()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(arch: str = "tiny", steps: int = 10, repeats: int = 5, batch_size: int = 1, mixed_precision: str | None = None,
        sfsl_arch: str = "resnet50.tv_in1k", presets: tuple[str, ...] = PRESETS, gradient_checkpointing: bool = False,
        device: str = "auto") -> list[dict[str, Any]]:
    """Times finetune's step for each preset against the reference step, in turns; returns one record each.

    Args:
        arch: Random Stable Diffusion architecture.
        steps: Steps per timed turn.
        repeats: Timed turns of each side, after one warm-up turn.
        batch_size: Reference images per step (and as many class images).
        mixed_precision: ``no``, ``fp16`` or ``bf16``; default bf16 on a GPU, no on a CPU.
        sfsl_arch: timm architecture of the SFSL classifier.
        presets: Which presets.
        gradient_checkpointing: On both sides.
        device: ``auto`` or ``cpu``.
    """
    setup = Bench(arch, sfsl_arch, batch_size, mixed_precision, gradient_checkpointing, device)
    return [_preset(setup, preset, steps, repeats) for preset in presets]


def step_record(label: str, ours: Any, reference: Any, steps: int, batch_size: int, target: float | None,
                stage: str, device: str) -> dict[str, Any]:
    """:func:`compare`'s record of our step against a reference step, with both sides' seconds per step and images
    per second.

    Args:
        label: The record's name.
        ours, reference: The two sides' :class:`Measurement` of ``steps`` steps per call.
        steps: Steps per timed call.
        batch_size: Reference images per step (as many class images).
        target: The least rate ratio ours / reference (1 / the most time ratio); ``None``: a cost shown without a
            target (SFSL's, which diffusers' scripts have no counterpart of).
        stage: The bench stage.
        device: ``cpu`` or ``cuda`` (the record names the card).
    """
    record = compare(label, ours, reference, items=steps, unit="steps", target=target or 0.0, paired=True,
                     stage=stage)
    if target is None:
        record.update(target=None, target_text="n/a (SFSL's cost)", verdict="")
    else:
        record["target_text"] = f">= {target:.3g} (time <= {1 / target:.2g}x)"
    record["seconds_per_step"] = {"ours": ours.median / steps, "reference": reference.median / steps}
    record["images_per_s"] = {side: 2 * batch_size / seconds for side, seconds in record["seconds_per_step"].items()}
    if device == "cuda":
        import torch

        record["device_name"] = torch.cuda.get_device_name()
    return record


def _preset(setup: Bench, preset: str, steps: int, repeats: int) -> dict[str, Any]:
    """One preset's record; its trainer and reference are freed on return (one full-size pair at a time)."""
    ours, config = setup.trainer(preset)
    where = ours.accelerator.device.type
    times = measure_interleaved({"ours": trainer_steps(ours, steps),
                                 "reference": _steps(reference_step(ours, config), steps)},
                                repeats=repeats, device=where, relative_memory=True)
    label = (f"finetune {preset} step ({setup.arch}, {where}, {ours.accelerator.mixed_precision}, batch "
             f"{setup.batch_size}+{setup.batch_size}{', SFSL ' + setup.sfsl_arch if preset == 'sfsl' else ''})")
    # sfsl has no diffusers counterpart: its ratio shows SFSL's cost, without a target
    record = step_record(label, times["ours"], times["reference"], steps, setup.batch_size,
                         TIME_TARGET_RATE if preset != "sfsl" else None, "finetune", where)
    release(ours)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(parser, list(SIZES))
    parser.add_argument("--sfsl-arch", help="timm architecture of the SFSL classifier")
    parser.add_argument("--presets", default=",".join(PRESETS))
    add_common_arguments(parser, repeats=5)
    args = parser.parse_args()
    apply_threads(args.threads)
    given = {k: getattr(args, k) for k in ("arch", "steps", "sfsl_arch") if getattr(args, k) is not None}
    records = run(**{**SIZES[args.size], **given}, repeats=args.repeats, batch_size=args.batch_size,
                  mixed_precision=args.mixed_precision, presets=tuple(args.presets.split(",")),
                  device="cpu" if args.device == "cpu" else "auto")
    save_run(records, args.size, args.device)


if __name__ == "__main__":
    main()
