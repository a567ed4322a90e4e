"""``spurgen export-lora``: a run's LoRA (or one of its checkpoints) as one file for other tools.

``--format diffusers`` writes the file diffusers' ``load_lora_weights`` reads, as the run saved it; ``--format kohya``
renames the weights the way kohya's sd-scripts does (``lora_unet_<module>`` and ``lora_te_text_model_<module>``, each
with ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``), the format AUTOMATIC1111's WebUI, ComfyUI, SD.Next
and InvokeAI load. Either way the metadata names the base model by its hub id or folder name, never by a local path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._base_model import shared_name
from ._lora import LORA_WEIGHTS_NAME
from .config import ExportLoraConfig
from .errors import SpurgenError
from .labels import ClassInfo, get_label_set
from .workspace import LORA_EXPORTS, Workspace, atomic_write_bytes

if TYPE_CHECKING:
    import torch

__all__ = ["LoraExport", "export_lora", "to_kohya"]

# The safetensors metadata entry where diffusers keeps each adapter's peft config ("unet.r", "unet.lora_alpha", ...).
_ADAPTER_METADATA = "lora_adapter_metadata"


@dataclass(frozen=True)
class LoraExport:
    """What export-lora wrote: the source LoRA file, the exported file and its number of tensors."""

    cls: ClassInfo
    run: str
    source: Path
    out: Path
    format: str
    tensors: int


def _run_lora(config: ExportLoraConfig, workspace: Workspace, cls: ClassInfo) -> tuple[str, Path]:
    """The run to export (--run, else the class's only finished LoRA run) and its LoRA file (or --checkpoint's).

    Raises:
        SpurgenError: no such run, several runs and no --run, a full fine-tuning run, or no such checkpoint.
    """
    from .generate.runs import checkpoint_lora

    finished = workspace.finished_runs(cls)
    lora_runs = [name for name, training in finished.items() if training.get("weights") == "lora"]
    run = config.run
    if run is None:
        if len(lora_runs) != 1:
            raise SpurgenError(f"{cls} has {len(lora_runs)} finished LoRA runs ({', '.join(lora_runs) or 'none'}); "
                               "name the one to export with --run")
        run = lora_runs[0]
    if config.checkpoint is not None:
        return run, checkpoint_lora(workspace, cls, run, config.checkpoint)[0]
    if run not in finished or finished[run].get("weights") != "lora":
        raise SpurgenError(f"{workspace.model_dir(cls, run)} holds no finished LoRA run (finished LoRA runs of {cls}: "
                           f"{', '.join(lora_runs) or 'none'}); pick one with --run, or a checkpoint with --checkpoint")
    return run, workspace.model_dir(cls, run) / LORA_WEIGHTS_NAME


def _read(path: Path) -> tuple[dict[str, "torch.Tensor"], dict[str, Any]]:
    """A diffusers LoRA file's tensors and its adapters' peft configs (``{"unet.r": 16, ...}``)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = handle.metadata() or {}
    return tensors, json.loads(metadata.get(_ADAPTER_METADATA, "{}"))


def _without_local_paths(adapters: dict[str, Any]) -> dict[str, Any]:
    """The adapters' configs with every ``base_model_name_or_path`` reduced to a shareable name (files written
    before spurgen recorded names carry the trainer's local path)."""
    return {key: shared_name(value) if key.endswith("base_model_name_or_path") and value else value
            for key, value in adapters.items()}


def to_kohya(tensors: dict[str, "torch.Tensor"], adapters: dict[str, Any]) -> dict[str, "torch.Tensor"]:
    """Renames a diffusers LoRA state dict to kohya's keys (diffusers' ``convert_state_dict_to_kohya``), with each
    module's real alpha and Stable Diffusion 1.x/2.x's text-encoder prefix.

    diffusers' conversion writes alpha = rank (a scale of 1) and the SDXL prefix ``lora_te1_``; kohya's loaders
    scale by alpha / rank, so the adapter's ``lora_alpha`` is written instead, and one text encoder is ``lora_te_``
    followed by the CLIP module path from ``text_model`` (which transformers 5 no longer has as a module).

    Args:
        tensors: The file's tensors, with diffusers' keys (``unet.<module>.lora.down.weight``, ...).
        adapters: The adapters' peft configs, ``{"unet.lora_alpha": 16, "text_encoder.lora_alpha": 16, ...}``.

    Raises:
        SpurgenError: a component without its ``lora_alpha`` in the metadata, or one that kohya's SD 1.x/2.x keys
            cannot name (FLUX.1's transformer, SDXL's second text encoder): its weights would be left out.
    """
    import torch
    from diffusers.utils import convert_state_dict_to_kohya
    from diffusers.utils.state_dict_utils import convert_all_state_dict_to_peft

    # diffusers saves the UNet's keys as ".lora.down" and the text encoder's as ".lora_linear_layer.down", and its
    # conversion to peft infers one key style per dict: each component is converted on its own.
    foreign = sorted({key.split(".")[0] for key in tensors} - {"unet", "text_encoder"})
    if foreign:
        raise SpurgenError(f"the LoRA adapts {', '.join(foreign)}, which the kohya format of SD 1.x/2.x has no keys "
                           "for; export it with --format diffusers")
    peft: dict[str, torch.Tensor] = {}
    for component in ("unet", "text_encoder"):
        part = {key: value for key, value in tensors.items() if key.startswith(f"{component}.")}
        peft.update(convert_all_state_dict_to_peft(part) if part else {})
    kohya = convert_state_dict_to_kohya(peft)
    renamed: dict[str, torch.Tensor] = {}
    for key, value in kohya.items():
        module, _, suffix = key.partition(".")
        component = "unet" if module.startswith("lora_unet_") else "text_encoder"
        if module.startswith("lora_te1_"):
            module = "lora_te_text_model_" + module.removeprefix("lora_te1_").removeprefix("text_model_")
        if suffix == "alpha":
            alpha = adapters.get(f"{component}.lora_alpha")
            if alpha is None:
                raise SpurgenError(f"the LoRA file names no {component} lora_alpha; kohya's loaders would scale its "
                                   "update wrongly. Export a run saved by spurgen")
            value = torch.tensor(float(alpha))
        renamed[f"{module}.{suffix}"] = value
    return renamed


def export_lora(config: ExportLoraConfig, workspace: Workspace) -> LoraExport:
    """Writes a run's LoRA (or a checkpoint's) to ``--out`` in ``--format``.

    Raises:
        SpurgenError: see :func:`_run_lora`; nothing is written then.
    """
    from safetensors.torch import save

    cls = get_label_set(config.labels).resolve_many(config.classes)[0]
    run, source = _run_lora(config, workspace, cls)
    name = f"{run}-checkpoint-{config.checkpoint}" if config.checkpoint is not None else run
    out = (Path(config.out) if config.out
           else workspace.root / LORA_EXPORTS / cls.dirname / f"{name}-{config.format}.safetensors")
    tensors, adapters = _read(source)
    adapters = _without_local_paths(adapters)
    if config.format == "kohya":
        exported = to_kohya(tensors, adapters)
        # The ss_* keys are what kohya's tools and the WebUI show of a LoRA; safetensors metadata values are strings.
        metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(adapters.get("unet.r", "")),
                    "ss_network_alpha": str(adapters.get("unet.lora_alpha", "")),
                    "ss_sd_model_name": str(adapters.get("unet.base_model_name_or_path") or "")}
    else:
        exported, metadata = tensors, {"format": "pt", _ADAPTER_METADATA: json.dumps(adapters, sort_keys=True)}
    atomic_write_bytes(out, save({key: value.contiguous() for key, value in exported.items()}, metadata=metadata))
    return LoraExport(cls, run, source, out, config.format, len(exported))
