"""FLUX.1: CLIP's pooled embedding and T5's hidden states, a 2 x 2-packed transformer on rectified flow.

Flow matching, as diffusers' ``train_dreambooth_lora_flux.py`` trains it (weighting scheme ``none``): with sigma in
(0, 1], x_t = (1 - sigma) x0 + sigma eps and the transformer predicts the velocity v = eps - x0, so the one-step
estimate is x0_hat = x_t - sigma v_hat.

spurgen's timesteps are integers t in [0, T) (T = the scheduler's ``num_train_timesteps``, 1,000), drawn uniformly
by the trainer and bounded by ``--sfsl-max-timestep`` for every family. Here t indexes the scheduler's training
table backwards: sigma_t = ``scheduler.sigmas[T - 1 - t]``, the transformer's timestep input
``scheduler.timesteps[T - 1 - t] / 1000``. A uniform t is then the script's uniform index (``(u * T).long()``), and
t = 0 is the least noisy. FLUX.1-dev's and -schnell's tables are unshifted, sigma_t = (t + 1) / 1000, so
``--sfsl-max-timestep 600`` means sigma <= 0.601; a folder with a static ``shift`` gets its shifted table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from .._lora import TEXT_ENCODER_TARGETS
from ..config import MODEL_SCHEDULER
from ..errors import SpurgenError
from .base import ModelFamily

if TYPE_CHECKING:
    import torch

    from ..config import FinetuneConfig

__all__ = ["Flux", "flow_sigmas", "pack_latents", "unpack_latents", "latent_image_ids"]

# train_dreambooth_lora_flux.py's default --lora_layers: the attention projections of both kinds of block (the
# text stream's too) and the feed-forward layers of the double-stream blocks.
_TRANSFORMER_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                        "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2",
                        "ff_context.net.0.proj", "ff_context.net.2")
# The script's --guidance_scale: the distilled guidance FLUX.1-dev is trained at (schnell has no such input).
TRAINING_GUIDANCE = 3.5
# The T5 prompt length of FluxPipeline's default max_sequence_length (and the script's): the pipeline pads to it
# and attends over the padding, so training must encode prompts the same way.
MAX_SEQUENCE_LENGTH = 512


def _table_row(scheduler: Any, table: "torch.Tensor", timesteps: "torch.Tensor") -> "torch.Tensor":
    """The rows of t in one of the scheduler's tables (which run from the noisiest to the cleanest), float32 on
    ``timesteps``' device; indexed there, so that a step reads nothing back from the device."""
    import torch

    return table.to(timesteps.device, torch.float32)[scheduler.config.num_train_timesteps - 1 - timesteps]


def flow_sigmas(scheduler: Any, timesteps: "torch.Tensor") -> "torch.Tensor":
    """sigma_t of each row, float32 [N] on ``timesteps``' device.

    Args:
        scheduler: The training ``FlowMatchEulerDiscreteScheduler``, its table as built (it never samples).
        timesteps: spurgen's t of each row.
    """
    return _table_row(scheduler, scheduler.sigmas, timesteps)


def pack_latents(latents: "torch.Tensor") -> "torch.Tensor":
    """[N, C, H, W] latents -> FLUX's sequence [N, H/2 * W/2, 4C] of 2 x 2 patches (``FluxPipeline._pack_latents``)."""
    n, c, h, w = latents.shape
    return latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, h // 2 * (w // 2), c * 4)


def unpack_latents(packed: "torch.Tensor", height: int, width: int) -> "torch.Tensor":
    """The inverse of :func:`pack_latents`: [N, H/2 * W/2, 4C] -> [N, C, H, W] (H, W: the latents' side)."""
    n, _, channels = packed.shape
    return (packed.view(n, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
            .reshape(n, channels // 4, height, width))


def latent_image_ids(height: int, width: int, device: "torch.device", dtype: "torch.dtype") -> "torch.Tensor":
    """The rotary positions (0, row, column) of the packed patches of [.., H, W] latents, [H/2 * W/2, 3]."""
    import torch

    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


class Flux(ModelFamily):
    """``FluxPipeline``: FLUX.1-dev (guidance-distilled, with a guidance input) and FLUX.1-schnell (without one).

    LoRA only, on the transformer and, with text-encoder training, on CLIP's text encoder; T5 stays frozen, as in
    diffusers' ``train_dreambooth_lora_flux.py`` (its LoRA covers CLIP only: T5-XXL has 4.7 B parameters). T5's
    prompt embeddings are therefore computed once and T5 waits on the CPU. Full fine-tuning is refused: the
    12 B-parameter transformer's float32 weights, gradients and AdamW moments take about 190 GB, more than any
    single GPU holds, and spurgen's data parallelism replicates them on every GPU instead of sharding them.
    """

    name = "flux"
    title = "FLUX.1"
    pipeline_class_name = "FluxPipeline"
    tokenizers = ("tokenizer", "tokenizer_2")
    text_encoders = ("text_encoder", "text_encoder_2")
    denoiser = "transformer"
    noise_scheduler_class = "FlowMatchEulerDiscreteScheduler"
    lora_targets: ClassVar[dict[str, tuple[str, ...]]] = {"transformer": _TRANSFORMER_TARGETS,
                                                          "text_encoder": TEXT_ENCODER_TARGETS}
    frozen_text_encoders = ("text_encoder_2",)
    # FluxPipeline's default: the value fed to FLUX.1-dev's distilled guidance embedding (not classifier-free
    # guidance: one transformer call per step), as training feeds it. FLUX.1-schnell has no such input and ignores it.
    default_guidance = TRAINING_GUIDANCE
    # diffusers' DDPM-family samplers know nothing of flow matching's sigmas (nor of FLUX.1-dev's shift by size).
    swaps_samplers = False
    default_scheduler = MODEL_SCHEDULER
    # FluxPipeline uses a negative prompt only for true classifier-free guidance (true_cfg_scale > 1, a second
    # transformer call per step), which spurgen does not offer: FLUX.1-dev is distilled to sample without it.
    negative_prompts = False

    def check_config(self, config: "FinetuneConfig") -> None:
        """Refuses full fine-tuning (see the class), eager attention (the transformer has its own processor) and
        DDPM's loss knobs, which have no flow-matching meaning here: min-SNR weights need abar_t, and flow matching
        already reaches pure noise (sigma = 1). ``--noise-offset`` stays: offset noise is still noise, and the
        target eps - x0 holds for it."""
        if not config.lora:
            raise SpurgenError("--full is not offered for FLUX.1: its 12 B-parameter transformer with float32 "
                               "gradients and AdamW moments needs ~190 GB on every GPU; train LoRA (drop --full)")
        if config.attention != "sdpa":
            raise SpurgenError(f"--attention {config.attention} is not offered for FLUX.1: its transformer runs its "
                               "own attention processor (scaled dot-product); drop the flag")
        if config.snr_gamma:
            raise SpurgenError("--snr-gamma weights DDPM timesteps and has no flow-matching form for FLUX.1; drop it")
        if config.zero_terminal_snr:
            raise SpurgenError("--zero-terminal-snr rescales DDPM schedules; FLUX.1's flow matching reaches pure noise "
                               "at sigma = 1 already: drop the flag")

    def prediction_type(self, scheduler_config: dict[str, Any]) -> str:
        return "flow"

    def geometry(self, denoiser_config: dict[str, Any], vae_config: dict[str, Any]) -> tuple[int, int]:
        """FluxPipeline's default side, 128 latent pixels (1,024 px); sides are multiples of 2 latent pixels (the
        2 x 2 packing)."""
        vae_scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
        return 128 * vae_scale, 2 * vae_scale

    def latent_shift(self, vae_config: dict[str, Any]) -> float:
        """FLUX.1's VAE latents are shifted, then scaled: (z - shift_factor) * scaling_factor."""
        return vae_config.get("shift_factor") or 0.0

    def tokenize(self, tokenizers: list[Any], prompts: list[str]) -> list["torch.Tensor"]:
        """CLIP's ids padded to its 77 tokens and T5's to :data:`MAX_SEQUENCE_LENGTH`, as FluxPipeline pads them."""
        clip, t5 = tokenizers
        lengths = (clip.model_max_length, MAX_SEQUENCE_LENGTH)
        return [tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                          return_tensors="pt").input_ids for tokenizer, length in zip((clip, t5), lengths)]

    def encode_prompts(self, text_encoders: list["torch.nn.Module | None"], ids: list["torch.Tensor"],
                       resolution: int) -> dict[str, "torch.Tensor"]:
        """As ``FluxPipeline.encode_prompt``: CLIP's pooled output and T5's last hidden states (FLUX.1 has no
        micro-conditioning: ``resolution`` is unused). The text positions (all zero) are made in :meth:`predict`."""
        clip, t5 = text_encoders
        conditioning = {}
        if clip is not None:
            conditioning["pooled_prompt_embeds"] = clip(ids[0], output_hidden_states=False).pooler_output
        if t5 is not None:
            conditioning["prompt_embeds"] = t5(ids[1], output_hidden_states=False)[0]
        return conditioning

    def denoiser_timesteps(self, scheduler: Any, timesteps: "torch.Tensor") -> "torch.Tensor":
        """The scheduler's timestep of t over 1,000, as the script and FluxPipeline pass it (sigma_t)."""
        return _table_row(scheduler, scheduler.timesteps, timesteps) / 1000

    def predict(self, denoiser: "torch.nn.Module", noisy: "torch.Tensor", timesteps: "torch.Tensor",
                conditioning: dict[str, "torch.Tensor"]) -> "torch.Tensor":
        """The transformer on the packed latents with their positions, the text's and, for FLUX.1-dev, the guidance
        :data:`TRAINING_GUIDANCE`; its output unpacked to [N, C, H, W]."""
        import torch

        n, _, height, width = noisy.shape
        prompt_embeds = conditioning["prompt_embeds"]
        config = getattr(denoiser, "module", denoiser).config  # through DDP's wrapper
        guidance = (torch.full((n,), TRAINING_GUIDANCE, device=noisy.device, dtype=torch.float32)
                    if config.guidance_embeds else None)
        output = denoiser(hidden_states=pack_latents(noisy), timestep=timesteps, guidance=guidance,
                          pooled_projections=conditioning["pooled_prompt_embeds"], encoder_hidden_states=prompt_embeds,
                          txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=noisy.device, dtype=noisy.dtype),
                          img_ids=latent_image_ids(height, width, noisy.device, noisy.dtype), return_dict=False)[0]
        return unpack_latents(output, height, width)

    def add_noise(self, scheduler: Any, latents: "torch.Tensor", noise: "torch.Tensor",
                  timesteps: "torch.Tensor") -> "torch.Tensor":
        sigma = flow_sigmas(scheduler, timesteps).view(-1, 1, 1, 1)
        return (1 - sigma) * latents + sigma * noise

    def training_target(self, scheduler: Any, latents: "torch.Tensor", noise: "torch.Tensor",
                        timesteps: "torch.Tensor") -> "torch.Tensor":
        return noise - latents

    def predicted_original(self, scheduler: Any, noisy: "torch.Tensor", output: "torch.Tensor",
                           timesteps: "torch.Tensor") -> "torch.Tensor":
        return noisy.float() - flow_sigmas(scheduler, timesteps).view(-1, 1, 1, 1) * output.float()

    def sfsl_row_weight(self, scheduler: Any, timesteps: "torch.Tensor", weighting: str) -> "torch.Tensor":
        """``v-profile``: 1 / sqrt((1 - sigma)^2 + sigma^2); ``none``: 1.

        The estimate's gain is |d x0_hat / d v_hat| = sigma. x_t = (1 - sigma) x0 + sigma eps is a DDPM state scaled
        by c = sqrt((1 - sigma)^2 + sigma^2): x_t / c = sqrt(abar) x0 + sqrt(1 - abar) eps with sqrt(abar) =
        (1 - sigma) / c and sqrt(1 - abar) = sigma / c, the same signal-to-noise ratio ((1 - sigma) / sigma)^2. At
        that abar v-prediction's profile is sqrt(1 - abar) = sigma / c, so the weight is (sigma / c) / sigma = 1 / c:
        1 at both ends of the flow, at most sqrt(2) at sigma = 1/2, and weight x gain <= 1 as on DDPM's models.
        """
        import torch

        sigma = flow_sigmas(scheduler, timesteps)
        if weighting == "none":
            return torch.ones_like(sigma)
        return ((1 - sigma).square() + sigma.square()).rsqrt()

    def decode(self, decoder: "torch.nn.Module", latents: "torch.Tensor") -> "torch.Tensor":
        """``decoder.decode(latents / scaling_factor + shift_factor)``, as FluxPipeline decodes; TAEF1
        (AutoencoderTiny, scale 1 and no shift) decodes the transformer's latents as they are."""
        config = decoder.config
        return decoder.decode(latents.to(decoder.dtype) / config.scaling_factor
                              + (config.get("shift_factor") or 0.0)).sample
