"""The world's models: the classifiers it trains, and where a built model is found.

spurgen ships every model of the world under ``assets/``, and those files are read-only: an installation may be
shared, or a read-only site-packages. ``spurgen world build`` writes what it trains into an output folder, by
default the user cache (:func:`default_out_dir`), and every user of a model looks there first, then in the
shipped assets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SpurgenError

if TYPE_CHECKING:  # --help imports this module (OUT_ENV); classifiers pulls in the progress and workspace modules
    from ..classifiers import ClassifierSpec

__all__ = [
    "ARCHITECTURES",
    "ASSETS_DIR",
    "CLASSIFIERS_FOLDER",
    "METRICS_FILE",
    "OUT_ENV",
    "SD_DIR",
    "SD_FOLDER",
    "SD_MODEL_FILE",
    "SHIPPED_DIR",
    "TEXT_TO_IMAGE_MODELS",
    "TextToImageModel",
    "WorldArchitecture",
    "default_out_dir",
    "find_built",
    "text_to_image_dir",
    "text_to_image_model",
    "world_classifier_specs",
]

SHIPPED_DIR = Path(__file__).parent / "assets"
CLASSIFIERS_FOLDER = "classifiers"
SD_FOLDER = "sd"
# The shipped models; `spurgen world build --out DIR` writes the same layout under DIR.
ASSETS_DIR = SHIPPED_DIR / CLASSIFIERS_FOLDER
SD_DIR = SHIPPED_DIR / SD_FOLDER
# A classifier's folder holds it once it has been trained and measured; a text-to-image folder once trained.
METRICS_FILE = "metrics.json"
SD_MODEL_FILE = "model_index.json"
OUT_ENV = "SPURGEN_WORLD_DIR"


@dataclass(frozen=True)
class WorldArchitecture:
    """One classifier of the world.

    Args:
        name: Registry and folder name (``resnet``).
        arch: timm architecture.
        model_args: Arguments that shrink the architecture to the world's size.
        epochs: Passes over the training split.
        lr: Peak learning rate of the one-cycle schedule.
        robust: Train against L2 PGD (the SFSL model).
        description: One line for ``spurgen classifiers``.
    """

    name: str
    arch: str
    model_args: dict[str, Any] = field(default_factory=dict)
    epochs: int = 8
    lr: float = 2e-3
    robust: bool = False
    description: str = ""


ARCHITECTURES: tuple[WorldArchitecture, ...] = (
    WorldArchitecture("resnet", "resnet10t", {"channels": (32, 64, 128, 256), "stem_width": 16},
                      epochs=10, description="narrow ResNet-10-T"),
    WorldArchitecture("convnext", "convnext_atto", {"dims": (24, 48, 96, 192), "depths": (2, 2, 4, 2)},
                      epochs=8, description="narrow ConvNeXt-atto"),
    WorldArchitecture("regnet", "regnetx_002", epochs=8, description="RegNetX-200MF"),
    WorldArchitecture("vit", "vit_tiny_patch16_224",
                      {"patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3},
                      epochs=6, lr=1e-3, description="ViT, patch 4, width 96, depth 4"),
    WorldArchitecture("robust-resnet", "resnet18", {"channels": (24, 48, 96, 192), "stem_width": 24},
                      epochs=5, robust=True, description="narrow ResNet-18, L2 PGD adversarial training (SFSL model)"),
)


@dataclass(frozen=True)
class TextToImageModel:
    """One text-to-image model of the world.

    Args:
        name: The name ``--model`` and ``--text-to-image`` take (``v``, ``epsilon``).
        folder: Its folder inside the layout (``sd``).
        prediction_type: What its UNet predicts (the scheduler's ``prediction_type``).
        base: The model whose autoencoder and text encoder it reuses and whose UNet it starts from; empty when
            trained from scratch.
        description: One line for the docs and errors.
    """

    name: str
    folder: str
    prediction_type: str
    base: str = ""
    description: str = ""


# The v model is the world's first; the epsilon one is what SD 1.x users fine-tune (SD's scaled_linear schedule).
TEXT_TO_IMAGE_MODELS: dict[str, TextToImageModel] = {model.name: model for model in (
    TextToImageModel("v", SD_FOLDER, "v_prediction", description="v-prediction, DDPM linear schedule"),
    TextToImageModel("epsilon", "sd-epsilon", "epsilon", base="v",
                     description="epsilon prediction, SD's scaled_linear schedule, offset noise"),
)}


def default_out_dir() -> Path:
    """Where ``spurgen world build`` writes and the world's users look first.

    ``$SPURGEN_WORLD_DIR`` if set, else ``spurgen/world`` in the user cache (``$XDG_CACHE_HOME``, by default
    ``~/.cache``, the convention huggingface_hub follows for its own cache).
    """
    if os.environ.get(OUT_ENV):
        return Path(os.environ[OUT_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "spurgen" / "world"


def find_built(relative: str, marker: str, out: Path | None = None) -> Path | None:
    """The folder ``relative`` that holds ``marker``: under ``out`` first, then in the shipped assets.

    Args:
        relative: The model's folder inside the layout (``sd``, ``classifiers/resnet``).
        marker: The file that a finished model's folder holds (``model_index.json``, ``metrics.json``).
        out: The build's output folder; ``None`` is :func:`default_out_dir`.

    Returns:
        The folder, or ``None`` when neither place has the model.
    """
    for root in (out if out is not None else default_out_dir(), SHIPPED_DIR):
        if (root / relative / marker).is_file():
            return root / relative
    return None


def world_classifier_specs(out: Path | None = None) -> tuple[ClassifierSpec, ...]:
    """The world's classifiers, each pointing at its built folder (``out`` first, then shipped).

    Registered with the ``world`` label set. A classifier built nowhere points at its shipped folder, so
    loading it names the path that is missing.
    """
    from ..classifiers import ClassifierSpec

    specs = []
    for architecture in ARCHITECTURES:
        relative = f"{CLASSIFIERS_FOLDER}/{architecture.name}"
        folder = find_built(relative, METRICS_FILE, out) or SHIPPED_DIR / relative
        specs.append(ClassifierSpec(name=architecture.name, arch=architecture.arch, path=str(folder),
                                    description=f"world: {architecture.description}"))
    return tuple(specs)


def text_to_image_model(name: str) -> TextToImageModel:
    """The entry of :data:`TEXT_TO_IMAGE_MODELS` called ``name``.

    Raises:
        SpurgenError: no such model.
    """
    if name not in TEXT_TO_IMAGE_MODELS:
        raise SpurgenError(f"unknown world text-to-image model {name!r}; choose from {', '.join(TEXT_TO_IMAGE_MODELS)}")
    return TEXT_TO_IMAGE_MODELS[name]


def text_to_image_dir(out: Path | None = None, model: str = "v") -> Path:
    """A world text-to-image model: built (under ``out``, by default the user cache) first, then shipped.

    Args:
        out: The build's output folder; ``None`` is :func:`default_out_dir`.
        model: A name of :data:`TEXT_TO_IMAGE_MODELS`.

    Raises:
        SpurgenError: unknown model, or neither place has it.
    """
    folder_name = text_to_image_model(model).folder
    folder = find_built(folder_name, SD_MODEL_FILE, out)
    if folder is None:
        where = out if out is not None else default_out_dir()
        raise SpurgenError(f"the world's {model} text-to-image model is neither built ({where / folder_name}) nor in "
                           f"this installation ({SHIPPED_DIR / folder_name}); build it first with `spurgen world "
                           f"build --text-to-image {model}` (resumable; up to an hour on 2 CPU cores)")
    return folder
