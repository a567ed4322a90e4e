"""The base model: finding it (a folder or a hub id), describing it, and loading its parts.

Training needs the parts separately (tokenizers, text encoders, VAE, UNet, the training noise schedule) and
samples images with a pipeline assembled from them (:meth:`.families.ModelFamily.sampling_pipeline`), so the
weights are loaded once and shared. Which parts a folder holds is its family's (:mod:`.families`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._runtime import dtype_argument
from .errors import SpurgenError

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    from .families import ModelFamily

__all__ = ["BaseModel", "Components", "resolve_base_model", "base_model_license", "shared_name", "vae_config",
           "load_components", "image_generator"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
# Bytes read from each end of a weight file for the fingerprint: enough to tell apart two checkpoints of the
# same architecture, without reading gigabytes on every run.
_FINGERPRINT_BYTES = 1 << 20
# The licence ids (as the hub's model cards write them) of the usual base models, for when their own card is not
# on disk: diffusers downloads a pipeline without its README.md.
_KNOWN_LICENSES = {
    **dict.fromkeys(["stable-diffusion-v1-5/stable-diffusion-v1-5", "runwayml/stable-diffusion-v1-5",
                     "CompVis/stable-diffusion-v1-1", "CompVis/stable-diffusion-v1-2", "CompVis/stable-diffusion-v1-3",
                     "CompVis/stable-diffusion-v1-4"], "creativeml-openrail-m"),
    **dict.fromkeys(["stabilityai/stable-diffusion-2", "stabilityai/stable-diffusion-2-base",
                     "stabilityai/stable-diffusion-2-1", "stabilityai/stable-diffusion-2-1-base"], "openrail++"),
}


def _sd_family() -> "ModelFamily":
    from .families import get_family

    return get_family("sd")


@dataclass(frozen=True)
class BaseModel:
    """Where a base model is and what it is.

    Args:
        name: The id or path as the user gave it (recorded as is in manifests).
        path: The local diffusers folder (for a hub id, its snapshot in the Hugging Face cache).
        local: The user gave a folder (not a hub id).
        revision: The hub commit of the snapshot; ``None`` for a local folder.
        fingerprint: A hash of the folder's configs and weight files, the cache key of what it generates.
        prediction_type: What the denoiser predicts: ``epsilon``, ``v_prediction`` or ``sample``; ``flow`` for
            FLUX.1's velocity.
        resolution: The native image side (:meth:`.families.ModelFamily.geometry`).
        size_multiple: Image sides must be a multiple of this.
        family: The model family (detected from ``model_index.json``, or ``--family``); SD 1.x/2.x when not
            given.
    """

    name: str
    path: Path
    local: bool
    revision: str | None
    fingerprint: str
    prediction_type: str
    resolution: int
    size_multiple: int
    family: "ModelFamily" = field(default_factory=_sd_family)

    @property
    def hub_id(self) -> str | None:
        """The model's hub id: the id as given, or read from a hub cache snapshot's path
        (``.../models--ORG--NAME/snapshots/REV``); ``None`` for any other folder."""
        if not self.local:
            return self.name
        repo = self.path.parent.parent.name
        if self.path.parent.name == "snapshots" and repo.startswith("models--"):
            return repo[len("models--"):].replace("--", "/")
        return None


def base_model_license(base: BaseModel) -> str | None:
    """The base model's licence id (``creativeml-openrail-m``), or ``None`` when unknown.

    Read from the model's own card (``README.md`` in its folder, or in the hub cache), else from the licences of
    the usual Stable Diffusion checkpoints.

    Args:
        base: The resolved base model.
    """
    from huggingface_hub import metadata_load, try_to_load_from_cache

    card: Path | None = base.path / "README.md"
    if not card.is_file() and base.hub_id:
        cached = try_to_load_from_cache(base.hub_id, "README.md", revision=base.revision)
        card = Path(cached) if isinstance(cached, str) else None
    if card is not None and card.is_file():
        try:
            license_id = (metadata_load(card) or {}).get("license")
        except Exception:  # noqa: BLE001 - a malformed card: fall back to the known ids below
            license_id = None
        if isinstance(license_id, str) and license_id:
            return license_id
    return _KNOWN_LICENSES.get(base.hub_id or "")


def _read_config(path: Path, where: str) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise SpurgenError(f"{where}: cannot read {path} ({exc}); give a complete diffusers Stable Diffusion "
                           "folder") from None


def _fingerprint(folder: Path, parts: tuple[str, ...]) -> str:
    """Hash of the configs and of each weight file's size and first and last megabyte, over the folder's ``parts``."""
    digest = hashlib.sha256()
    for part in parts:
        for file in sorted((folder / part).glob("*")):
            if not file.is_file():
                continue
            digest.update(f"{part}/{file.name}:{file.stat().st_size}".encode())
            with open(file, "rb") as handle:
                digest.update(handle.read(_FINGERPRINT_BYTES))
                handle.seek(max(0, file.stat().st_size - _FINGERPRINT_BYTES))
                digest.update(handle.read())
    return digest.hexdigest()[:16]


def _download(name: str) -> Path:
    from diffusers import DiffusionPipeline

    try:
        # The safety checker (1.2 GB, SD 1.x) is never used for training: passing None skips its download.
        return Path(DiffusionPipeline.download(name, safety_checker=None, feature_extractor=None))
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, gated repository, network failure
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpurgenError(f"cannot find base model '{name}': not a local folder, and the hub gave: {first}; "
                           "pass --model with a diffusers folder, or check the id and the network") from None


def resolve_base_model(name: str, family: str | None = None) -> BaseModel:
    """Finds a base model and reads what training needs to know from its configs (no weights loaded).

    Args:
        name: A diffusers folder or a hub id.
        family: ``--family``: the model family, instead of the one ``model_index.json`` names.

    Raises:
        SpurgenError: the folder does not exist, is of a family spurgen does not support or lacks a part of its
            family, or the hub id cannot be fetched.
    """
    from .families import detect_family

    folder = Path(name).expanduser()
    local = folder.exists() or not _HUB_ID.fullmatch(name)
    if local and not folder.is_dir():
        raise SpurgenError(f"base model folder {folder} does not exist; check --model (a diffusers folder or a hub id)")
    path = folder.resolve() if local else _download(name)
    where = f"base model {name}"
    index = _read_config(path / "model_index.json", where)
    model_family = detect_family(index, where, family)
    missing = [part for part in model_family.parts if part not in index or not (path / part).is_dir()]
    if missing:
        raise SpurgenError(f"{where} has no {', '.join(missing)}; give a {model_family.title} pipeline folder "
                           f"(model_index.json with {', '.join(model_family.parts)})")
    denoiser = _read_config(path / model_family.denoiser / "config.json", where)
    vae = _read_config(path / "vae" / "config.json", where)
    scheduler = _read_config(path / "scheduler" / "scheduler_config.json", where)
    resolution, size_multiple = model_family.geometry(denoiser, vae)
    return BaseModel(
        name=name, path=path, local=local,
        revision=None if local else path.name,
        fingerprint=_fingerprint(path, model_family.parts),
        prediction_type=model_family.prediction_type(scheduler),
        resolution=resolution,
        size_multiple=size_multiple,
        family=model_family,
    )


def shared_name(name_or_path: str) -> str:
    """A base model's name for files that leave this machine (LoRA metadata): never a local path.

    A hub id as it is; a folder inside the Hugging Face cache (``models--org--name/snapshots/<commit>``) by the hub
    id it is a snapshot of; any other folder by its own name only.
    """
    path = Path(name_or_path).expanduser()
    if not (path.is_absolute() or path.exists()):
        return name_or_path
    path = path.resolve()
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.removeprefix("models--").replace("--", "/")
    return path.name


def vae_config(base: BaseModel, vae: str | None = None) -> dict[str, Any]:
    """The config of the VAE that training decodes with: ``--vae``'s when given, else the base model's.

    Raises:
        SpurgenError: ``--vae`` is no AutoencoderKL folder or hub id (in the cache, offline).
    """
    if not vae:
        return _read_config(base.path / "vae" / "config.json", f"base model {base.name}")
    from diffusers import AutoencoderKL

    try:
        config = AutoencoderKL.load_config(vae)
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, a folder without config.json
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpurgenError(f"cannot read --vae '{vae}': {first}; give an AutoencoderKL folder or hub id, e.g. "
                           "madebyollin/sdxl-vae-fp16-fix") from None
    if config.get("_class_name") != "AutoencoderKL":
        raise SpurgenError(f"--vae '{vae}' holds {config.get('_class_name') or 'no model class'}, not an "
                           "AutoencoderKL; give a VAE folder or hub id, e.g. madebyollin/sdxl-vae-fp16-fix")
    return dict(config)


@dataclass
class Components:
    """The parts of a pipeline, loaded for training.

    ``tokenizers`` and ``text_encoders`` are in the family's order (SDXL: CLIP ViT-L, then OpenCLIP bigG);
    ``noise_scheduler`` adds the training noise (DDPM with the model's training schedule) and gives velocities;
    ``sampler`` is the model's own inference scheduler, used for class and validation images.
    """

    tokenizers: list[Any]
    text_encoders: list["torch.nn.Module"]
    vae: "AutoencoderKL"
    unet: "UNet2DConditionModel"
    noise_scheduler: "DDPMScheduler"
    sampler: "SchedulerMixin"

    @property
    def tokenizer(self) -> Any:
        """The first tokenizer (SD's only one)."""
        return self.tokenizers[0]

    @property
    def text_encoder(self) -> "torch.nn.Module":
        """The first text encoder (SD's only one)."""
        return self.text_encoders[0]


def load_components(base: BaseModel, attention: str = "sdpa", *, unet_dtype: "torch.dtype | None" = None,
                    text_encoder_dtype: "torch.dtype | None" = None, vae_dtype: "torch.dtype | None" = None,
                    vae: str | None = None) -> Components:
    """Loads the parts of the base model on the CPU, each with the class its ``model_index.json`` names.

    Args:
        base: The resolved base model.
        attention: ``sdpa`` (PyTorch's fused attention) or ``eager`` (the plain matmul-softmax kernels).
        unet_dtype, text_encoder_dtype, vae_dtype: Weight precision of each part (default float32). Loading
            in the final precision avoids casting afterwards.
        vae: ``--vae``: an AutoencoderKL folder or hub id used instead of the base model's VAE (SDXL's own
            overflows in float16; madebyollin/sdxl-vae-fp16-fix does not).

    Raises:
        SpurgenError: a part is missing or its weights do not load.
    """
    import diffusers
    import torch
    import transformers
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    path, family = base.path, base.family
    index = _read_config(path / "model_index.json", base.name)
    # Explicit, since a folder may store half-precision weights that training must not inherit by accident.
    float32 = torch.float32

    def part_class(part: str) -> Any:
        library, class_name = index[part]
        return getattr(transformers if library == "transformers" else diffusers, class_name)

    try:
        text_dtype = dtype_argument(text_encoder_dtype or float32, "transformers")
        vae_source = {"pretrained_model_name_or_path": vae} if vae else {"pretrained_model_name_or_path": path,
                                                                        "subfolder": "vae"}
        components = Components(
            tokenizers=[part_class(part).from_pretrained(path, subfolder=part) for part in family.tokenizers],
            text_encoders=[part_class(part).from_pretrained(path, subfolder=part, attn_implementation=attention,
                                                            **text_dtype) for part in family.text_encoders],
            vae=diffusers.AutoencoderKL.from_pretrained(**vae_source, **dtype_argument(vae_dtype or float32)),
            unet=part_class(family.denoiser).from_pretrained(path, subfolder=family.denoiser,
                                                             **dtype_argument(unet_dtype or float32)),
            noise_scheduler=getattr(diffusers, family.noise_scheduler_class).from_pretrained(path,
                                                                                            subfolder="scheduler"),
            sampler=part_class("scheduler").from_pretrained(path, subfolder="scheduler"),
        )
    except SpurgenError:
        raise
    except Exception as exc:  # noqa: BLE001 - corrupt files, unknown classes, mismatched shapes
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        what = f"--vae '{vae}' or base model '{base.name}'" if vae else f"base model '{base.name}'"
        raise SpurgenError(f"cannot load {what} from {path}: {first}; check that it is a complete "
                           f"{family.title} folder") from None
    processor = AttnProcessor2_0() if attention == "sdpa" else AttnProcessor()
    if family.denoiser == "unet":  # FLUX.1's transformer has its own processor, scaled dot-product attention
        components.unet.set_attn_processor(processor)
    components.vae.set_attn_processor(processor)
    return components


def image_generator(seed: int) -> "torch.Generator":
    """A CPU generator: the same seed gives the same image on every device."""
    import torch

    return torch.Generator("cpu").manual_seed(seed)
