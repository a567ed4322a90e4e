"""``spurgen export-lora``: a run's LoRA (or one of its checkpoints) as one file for other tools.

``--format diffusers`` writes the file diffusers' ``load_lora_weights`` reads, as the run saved it; ``--format kohya``
renames the weights the way kohya's sd-scripts does (``lora_unet_<module>`` and ``lora_te_text_model_<module>``, for
SDXL ``lora_te1_``/``lora_te2_`` and the UNet's Stability AI block names, each with ``.lora_down.weight``,
``.lora_up.weight`` and ``.alpha``), the format AUTOMATIC1111's WebUI, ComfyUI, SD.Next and InvokeAI load. Either
way the metadata names the base model by its hub id or folder name, never by a local path.
"""

from __future__ import annotations

import json
import re
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


def _run_lora(config: ExportLoraConfig, workspace: Workspace, cls: ClassInfo) -> tuple[str, Path, dict[str, Any]]:
    """The run to export (--run, else the class's only finished LoRA run), its LoRA file (or --checkpoint's) and its
    training.json.

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
        return run, *checkpoint_lora(workspace, cls, run, config.checkpoint)
    if run not in finished or finished[run].get("weights") != "lora":
        raise SpurgenError(f"{workspace.model_dir(cls, run)} holds no finished LoRA run (finished LoRA runs of {cls}: "
                           f"{', '.join(lora_runs) or 'none'}); pick one with --run, or a checkpoint with --checkpoint")
    return run, workspace.model_dir(cls, run) / LORA_WEIGHTS_NAME, finished[run]


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


# kohya's sd-scripts (networks/lora.py) names each part's modules with a prefix per family: SD's one text encoder
# ``lora_te``, SDXL's two ``lora_te1`` and ``lora_te2``. A family without keys of its own (FLUX.1) gets SD's, and a
# LoRA with a part they cannot name is refused rather than written without it.
KOHYA_PREFIXES: dict[str, dict[str, str]] = {
    "sd": {"unet": "lora_unet", "text_encoder": "lora_te"},
    "sdxl": {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"},
}
# The part of each prefix that diffusers' convert_state_dict_to_kohya writes.
_DIFFUSERS_KOHYA_PARTS = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
# An adapted attention of a diffusers UNet, dots as underscores (only attention projections are LoRA targets).
_UNET_ATTENTION = re.compile(r"(down_blocks|up_blocks)_(\d+)_attentions_(\d+)_|mid_block_attentions_0_")


def _sgm_unet_modules(modules: list[str]) -> dict[str, str]:
    """Each diffusers UNet module (``down_blocks_1_attentions_0_...``) under Stability AI's (SGM) block names, as
    kohya's sd-scripts names SDXL's UNet (``input_blocks_4_1_...``; it converts diffusers names when it loads).

    With L = layers_per_block, a down block holds L resnet + attention layers and a downsampler, an up block L + 1
    and an upsampler: down_blocks.b.attentions.l is input_blocks.(1 + b(L + 1) + l).1 (input_blocks.0 is conv_in),
    mid_block.attentions.0 is middle_block.1 and up_blocks.b.attentions.l is output_blocks.(b(L + 1) + l).1. L is
    read from the modules themselves: every attention is adapted, and an up block's last one has index L.

    Raises:
        SpurgenError: a module outside the UNet's attentions.
    """
    matches = {module: _UNET_ATTENTION.match(module) for module in modules}
    outside = [module for module, match in matches.items() if match is None]
    if outside:
        raise SpurgenError(f"the LoRA adapts {outside[0]}, outside the UNet's attentions, which kohya's SDXL names "
                           "are not written for here; export it with --format diffusers")
    layers = max((int(m[3]) for m in matches.values() if m[1] == "up_blocks"), default=0)
    names = {}
    for module, match in matches.items():
        kind, block, layer = match[1], int(match[2] or 0), int(match[3] or 0)
        sgm = ("middle_block_1_" if kind is None else
               f"input_blocks_{1 + block * (layers + 1) + layer}_1_" if kind == "down_blocks" else
               f"output_blocks_{block * (layers + 1) + layer}_1_")
        names[module] = sgm + module[match.end():]
    return names


def to_kohya(tensors: dict[str, "torch.Tensor"], adapters: dict[str, Any],
             family: str = "sd") -> dict[str, "torch.Tensor"]:
    """Renames a diffusers LoRA state dict to kohya's keys (diffusers' ``convert_state_dict_to_kohya``), with each
    module's real alpha and the family's prefixes (:data:`KOHYA_PREFIXES`).

    diffusers' conversion writes alpha = rank (a scale of 1) and the SDXL prefixes ``lora_te1_``/``lora_te2_``
    whatever the family; kohya's loaders scale by alpha / rank, so the adapter's ``lora_alpha`` is written instead,
    and a text encoder's modules follow its prefix with the CLIP module path from ``text_model`` (which
    transformers 5 no longer has as a module). SDXL's UNet modules get the block names kohya's SDXL LoRAs have
    (:func:`_sgm_unet_modules`); SD's keep diffusers' block names, as kohya's SD LoRAs do.

    Args:
        tensors: The file's tensors, with diffusers' keys (``unet.<module>.lora.down.weight``, ...).
        adapters: The adapters' peft configs, ``{"unet.lora_alpha": 16, "text_encoder.lora_alpha": 16, ...}``.
        family: The run's model family (``sd``, ``sdxl``).

    Raises:
        SpurgenError: a part that the family's kohya keys cannot name (FLUX.1's transformer), or one without its
            ``lora_alpha`` in the metadata.
    """
    import torch
    from diffusers.utils import convert_state_dict_to_kohya
    from diffusers.utils.state_dict_utils import convert_all_state_dict_to_peft

    kohya_family = family if family in KOHYA_PREFIXES else "sd"
    prefixes = KOHYA_PREFIXES[kohya_family]
    foreign = sorted({key.split(".")[0] for key in tensors} - set(prefixes))
    if foreign:
        raise SpurgenError(f"the LoRA adapts {', '.join(foreign)}, which the kohya format of "
                           f"{'SDXL' if kohya_family == 'sdxl' else 'SD 1.x/2.x'} has no keys for; export it with "
                           "--format diffusers")
    # diffusers saves the UNet's keys as ".lora.down" and the text encoder's as ".lora_linear_layer.down", and its
    # conversion to peft infers one key style per dict: each part is converted on its own.
    peft: dict[str, torch.Tensor] = {}
    for part in prefixes:
        layers = {key: value for key, value in tensors.items() if key.startswith(f"{part}.")}
        peft.update(convert_all_state_dict_to_peft(layers) if layers else {})
    kohya = convert_state_dict_to_kohya(peft)
    part_of = {module: part for module in {key.partition(".")[0] for key in kohya}
               for prefix, part in _DIFFUSERS_KOHYA_PARTS.items() if module.startswith(prefix)}
    names: dict[str, str] = {}  # diffusers' kohya module name -> ours
    unet = []
    for module, part in part_of.items():
        if part == "unet":
            unet.append(module.removeprefix("lora_unet_"))
        else:
            tail = module[len("lora_te1_"):]  # lora_te2_ is as long
            names[module] = f"{prefixes[part]}_text_model_" + tail.removeprefix("text_model_")
    unet_names = _sgm_unet_modules(unet) if family == "sdxl" else {module: module for module in unet}
    names.update({f"lora_unet_{module}": f"lora_unet_{name}" for module, name in unet_names.items()})
    renamed: dict[str, torch.Tensor] = {}
    for key, value in kohya.items():
        module, _, suffix = key.partition(".")
        if suffix == "alpha":
            alpha = adapters.get(f"{part_of[module]}.lora_alpha")
            if alpha is None:
                raise SpurgenError(f"the LoRA file names no {part_of[module]} lora_alpha; kohya's loaders would scale "
                                   "its update wrongly. Export a run saved by spurgen")
            value = torch.tensor(float(alpha))
        renamed[f"{names[module]}.{suffix}"] = value
    return renamed


def export_lora(config: ExportLoraConfig, workspace: Workspace) -> LoraExport:
    """Writes a run's LoRA (or a checkpoint's) to ``--out`` in ``--format``.

    Raises:
        SpurgenError: see :func:`_run_lora`; nothing is written then.
    """
    from safetensors.torch import save

    cls = get_label_set(config.labels).resolve_many(config.classes)[0]
    run, source, training = _run_lora(config, workspace, cls)
    name = f"{run}-checkpoint-{config.checkpoint}" if config.checkpoint is not None else run
    out = (Path(config.out) if config.out
           else workspace.root / LORA_EXPORTS / cls.dirname / f"{name}-{config.format}.safetensors")
    tensors, adapters = _read(source)
    adapters = _without_local_paths(adapters)
    if config.format == "kohya":
        family = training.get("family", "sd")  # runs saved before spurgen had families are SD's
        exported = to_kohya(tensors, adapters, family)
        # The ss_* keys are what kohya's tools and the WebUI show of a LoRA; safetensors metadata values are strings.
        # The WebUI tells an SDXL LoRA by ss_base_model_version, which sd-scripts writes as below for SDXL base.
        metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(adapters.get("unet.r", "")),
                    "ss_network_alpha": str(adapters.get("unet.lora_alpha", "")),
                    "ss_sd_model_name": str(adapters.get("unet.base_model_name_or_path") or ""),
                    **({"ss_base_model_version": "sdxl_base_v1-0"} if family == "sdxl" else {})}
    else:
        exported, metadata = tensors, {"format": "pt", _ADAPTER_METADATA: json.dumps(adapters, sort_keys=True)}
    atomic_write_bytes(out, save({key: value.contiguous() for key, value in exported.items()}, metadata=metadata))
    return LoraExport(cls, run, source, out, config.format, len(exported))
