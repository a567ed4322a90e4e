"""Model families, in the manner of timm's: one interface, one module per family of text-to-image models.

A :class:`ModelFamily` says everything that differs between families for training and sampling: the pipeline
class, the parts a folder holds, how prompts are encoded (one CLIP text encoder, SDXL's two with pooled
embeddings, FLUX.1's CLIP and T5), how noise is added and what the denoiser must predict, the one-step
clean-latent estimate that SFSL decodes and its gain (for SFSL's per-row weighting), how latents are decoded with
gradients, which modules LoRA adapts and how the adapters are saved for the family's plain diffusers pipeline. The
rest of spurgen asks the family and never the pipeline class.

A base model's family is detected from its ``model_index.json`` (``_class_name``); ``--family`` overrides it.
Families that spurgen knows but does not train yet are refused with a one-line error that names them.
"""

from __future__ import annotations

import functools
from typing import Any

from ..errors import SpurgenError
from .base import ModelFamily

__all__ = ["ModelFamily", "get_family", "detect_family"]


@functools.cache
def _registry() -> dict[str, ModelFamily]:
    """One instance per family, shared (base models of one family compare equal)."""
    from .flux import Flux
    from .sd import StableDiffusion
    from .sdxl import StableDiffusionXL

    return {family.name: family for family in (StableDiffusion(), StableDiffusionXL(), Flux())}


# Families whose folders spurgen recognises but does not train yet: pipeline class -> how users call it.
_UNSUPPORTED = {"StableDiffusion3Pipeline": "Stable Diffusion 3",
                "PixArtAlphaPipeline": "PixArt-alpha", "KandinskyV22Pipeline": "Kandinsky 2.2"}


def _supported_text() -> str:
    return ", ".join(f"{f.title} ({f.pipeline_class_name}, --family {f.name})" for f in _registry().values())


def get_family(name: str) -> ModelFamily:
    """The family of a ``--family`` value.

    Raises:
        SpurgenError: no family has that name.
    """
    families = _registry()
    if name not in families:
        raise SpurgenError(f"unknown --family {name!r}; use one of {', '.join(families)}")
    return families[name]


def detect_family(index: dict[str, Any], where: str, override: str | None = None) -> ModelFamily:
    """The family of a model folder from its ``model_index.json``, or ``override`` (``--family``) when given.

    Args:
        index: The folder's ``model_index.json``.
        where: The folder as the message names it.
        override: ``--family``.

    Raises:
        SpurgenError: ``override`` is unknown, or the folder's pipeline is of a family spurgen does not train.
    """
    if override:
        return get_family(override)
    class_name = index.get("_class_name")
    for family in _registry().values():
        if family.pipeline_class_name == class_name:
            return family
    what = f"a {_UNSUPPORTED[class_name]} model ({class_name})" if class_name in _UNSUPPORTED else (
        f"a {class_name} pipeline" if class_name else "a folder whose model_index.json names no pipeline class")
    raise SpurgenError(f"{where} is {what}, which spurgen does not support; it supports {_supported_text()}")

