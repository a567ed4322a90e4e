"""LoRA adapters for the denoiser and the CLIP text encoders, saved in the format plain diffusers loads.

Each model family names its target modules (:attr:`spurgen.families.ModelFamily.lora_targets`), those of its
diffusers DreamBooth-LoRA script; ``UNET_TARGETS`` and ``TEXT_ENCODER_TARGETS`` are Stable Diffusion's.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["ADAPTER_METADATA_FIELDS", "LORA_WEIGHTS_NAME", "UNET_TARGETS", "TEXT_ENCODER_TARGETS", "add_lora",
           "save_lora"]

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_v_proj")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def add_lora(model: "torch.nn.Module", targets: tuple[str, ...], rank: int, alpha: float) -> None:
    """Adds a trainable LoRA adapter (peft) to ``model`` in place and freezes everything else.

    ``init_lora_weights="gaussian"`` starts B at zero, so the adapted model equals the base model at step 0.
    """
    from peft import LoraConfig

    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets)))


def save_lora(folder: Path, pipeline_class: type, models: dict[str, "torch.nn.Module"], base_model: str) -> Path:
    """Writes ``pytorch_lora_weights.safetensors`` for ``pipeline_class.load_lora_weights``.

    The adapter metadata (rank, alpha, targets) goes into the file: without it a loader assumes
    alpha = rank and silently scales the update differently (method.md §5).

    Args:
        folder: Where the file goes.
        pipeline_class: The diffusers pipeline class whose ``save_lora_weights`` writes the file
            (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``).
        models: The adapted models by the pipeline's part names (``unet``, ``text_encoder``, ``text_encoder_2``);
            a part that was not trained is left out.
        base_model: The base model as a shared file may name it (``_base_model.shared_name``): peft would record
            the folder the weights were loaded from, a path on the trainer's machine.

    Returns:
        The written file.
    """
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    def layers(name: str, model: "torch.nn.Module") -> dict[str, "torch.Tensor"]:
        # Embeddings are never adapted; saying so keeps peft from probing the hub for the base model's config.
        state = convert_state_dict_to_diffusers(get_peft_model_state_dict(model, save_embedding_layers=False))
        return _classic_text_encoder_keys(state) if name.startswith("text_encoder") else state

    arguments = {}
    for name, model in models.items():
        arguments[f"{name}_lora_layers"] = layers(name, model)
        arguments[f"{name}_lora_adapter_metadata"] = _adapter_metadata(model, base_model)
    pipeline_class.save_lora_weights(folder, **arguments, safe_serialization=True)
    _sort_header(Path(folder) / LORA_WEIGHTS_NAME)
    return Path(folder) / LORA_WEIGHTS_NAME


# The LoraConfig fields written as adapter metadata. diffusers rebuilds the adapter with LoraConfig(**metadata),
# which refuses a field that the reader's peft does not know, so only fields that exist since the peft floor
# (pyproject.toml) go into the file; every other field keeps its default, as it does when we train. Writing the
# whole to_dict() made a LoRA saved under peft 0.21 fail to load under the floor, 0.15 (tests/floors/ checks it).
ADAPTER_METADATA_FIELDS = ("r", "lora_alpha", "target_modules", "lora_dropout", "bias", "init_lora_weights",
                           "use_rslora", "use_dora", "rank_pattern", "alpha_pattern", "fan_in_fan_out",
                           "base_model_name_or_path")


def _classic_text_encoder_keys(layers: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    """The text encoder's LoRA layers under CLIP's classic names, ``text_model.encoder.layers...``.

    transformers 5 dropped the ``text_model`` level of CLIPTextModel, so its names read ``encoder.layers...``.
    transformers 4 (with diffusers 0.34, our floors) loads such a file without an error but leaves the text
    encoder's LoRA at its initialisation (diffusers 0.32 failed with an IndexError); the classic names, those of
    the LoRA files on the hub, load under transformers 4 and 5 alike (tests/floors/ checks both directions).
    """
    return {key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in layers.items()}


def _adapter_metadata(model: "torch.nn.Module", base_model: str) -> dict:
    """The adapter's peft config, restricted to ADAPTER_METADATA_FIELDS; its target modules, a set in peft, sorted
    so that the file is the same in every process (a set's order follows the process's string hash seed), and
    ``base_model`` (a hub id or a folder's name) where peft would record the trainer's local path."""
    config = model.peft_config["default"].to_dict()
    metadata = {field: config[field] for field in ADAPTER_METADATA_FIELDS if field in config}
    return {**metadata, "target_modules": sorted(config["target_modules"]), "base_model_name_or_path": base_model}


def _sort_header(path: Path) -> None:
    """Rewrites a safetensors file's JSON header with sorted keys, leaving the tensor bytes as they are.

    safetensors writes the metadata in the order of a Rust HashMap, which changes from process to process: the
    same weights would give files of different SHA-256, and generation.json fingerprints the LoRA by it.
    """
    import json
    import struct

    from .workspace import atomic_write_bytes

    data = path.read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.dumps(json.loads(data[8:8 + size]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format's 8-byte alignment of the tensor data
    atomic_write_bytes(path, struct.pack("<Q", len(header)) + header + data[8 + size:])
