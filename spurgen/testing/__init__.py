"""Models built in code for spurgen's tests and benchmarks, as ``torch.testing`` serves torch's.

Nothing here is downloaded: Stable Diffusion pipelines with seeded random weights (:mod:`.stable_diffusion`,
with the real CLIP tokenizer from :mod:`.clip_tokenizer`) and timm classifiers whose last layer is solved to
give chosen logits (:mod:`.classifiers`). The synthetic world builds its text-to-image model's untrained
components with the same builder.
"""

from __future__ import annotations

from spurgen.testing.classifiers import solved_head_classifier
from spurgen.testing.clip_tokenizer import build_clip_tokenizer
from spurgen.testing.stable_diffusion import (
    CLIP_TEXT_IDS,
    PREDICTION_TYPES,
    SD_ARCHITECTURES,
    SDArchitecture,
    build_stable_diffusion,
    build_tiny_autoencoder,
    count_parameters,
    stable_diffusion_components,
)

__all__ = [
    "CLIP_TEXT_IDS",
    "PREDICTION_TYPES",
    "SD_ARCHITECTURES",
    "SDArchitecture",
    "build_clip_tokenizer",
    "build_stable_diffusion",
    "build_tiny_autoencoder",
    "count_parameters",
    "solved_head_classifier",
    "stable_diffusion_components",
]
