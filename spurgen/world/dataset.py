"""Writing the synthetic world to a folder: its splits, its spurious set and its captions.

::

    world.json                         the config, the classes and the image counts
    captions.jsonl                     one row per image: file, caption, kind, split, label
    train/0-circle/00000.png           biased: the class's texture behind the object with prob. ``bias``
    val/0-circle/00000.png             unbiased: background independent of the class
    features/0-circle/00000.png        texture without object (text-to-image training)
    spurious/images/timestamp.txt      Spurious ImageNet's layout: texture without object,
    spurious/images/spurious_imagenet_0_circle_0/00.png    ``spurious_per_class`` per class

Every split draws from its own seeded stream, so one split's size never changes another's images,
and the same config gives byte-identical files.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import require, setting
from ..images import SpuriousImageNetFolder, load_rgb
from ..labels import ClassInfo
from ..workspace import atomic_directory, read_json
from .labels import world_label_set
from .render import CLASS_COLOUR_PROB, NONE, TEXTURE_STRENGTH, render

__all__ = ["WorldConfig", "build_world", "load_split", "spurious_folder_name", "spurious_set"]

# Images rendered per call: bounds memory (the supersampled masks) and fixes the random stream layout.
_CHUNK = 500
_SPLITS = ("train", "val", "features", "spurious")
CAPTIONS_FILE = "captions.jsonl"
MANIFEST_FILE = "world.json"


@dataclass
class WorldConfig:
    """Settings of the synthetic world."""

    seed: int = setting(0, "Seed of every random choice; the same seed gives byte-identical files.")
    image_size: int = setting(32, "Side of the square images in pixels (32 or 64).")
    train_size: int = setting(6000, "Images in the biased training split.")
    val_size: int = setting(1200, "Images in the unbiased validation split.")
    spurious_per_class: int = setting(75, "Texture-only images per class in the spurious set (Spurious ImageNet has "
                                          "75).")
    features_per_class: int = setting(150, "Texture-only images per class for text-to-image training, apart from the "
                                           "spurious set.")
    bias: float = setting(0.9, "Probability that a training image shows its class's texture behind the object.")
    class_colour_prob: float = setting(CLASS_COLOUR_PROB, "Probability that an object has its class's colour rather "
                                                          "than a random one.")
    texture_strength: float = setting(TEXTURE_STRENGTH, "Lowest opacity of a background texture (each image draws one "
                                                        "in [this, 1]).")

    def validate(self) -> None:
        require(self.image_size >= 16 and self.image_size % 8 == 0,
                f"image size must be a multiple of 8 from 16 up, got {self.image_size}; use 32 or 64")
        require(min(self.train_size, self.val_size, self.spurious_per_class, self.features_per_class) >= 0,
                "split sizes must be 0 or more")
        require(0.0 <= self.bias <= 1.0, f"bias must be in [0, 1], got {self.bias}")
        require(0.0 <= self.class_colour_prob <= 1.0,
                f"class colour probability must be in [0, 1], got {self.class_colour_prob}")
        require(0.0 <= self.texture_strength <= 1.0, f"texture strength must be in [0, 1], got {self.texture_strength}")


def spurious_folder_name(info: ClassInfo) -> str:
    """Spurious ImageNet's sub-folder name: class index third, component index (0) last."""
    return f"spurious_imagenet_{info.index}_{info.slug.replace('_', '')}_0"


def _caption(obj: int, background: int, classes: dict[int, ClassInfo]) -> tuple[str, str]:
    """(kind, caption) of an image with object ``obj`` on ``background``."""
    if obj == NONE:
        return "feature", f"a photo of {classes[background].spurious_feature}"
    if background == NONE:
        return "object", f"a photo of a {classes[obj].name}"
    return "object_on_feature", f"a photo of a {classes[obj].name} on {classes[background].spurious_feature}"


def _stream(config: WorldConfig, split: str, key: int) -> np.random.Generator:
    """Independent random stream ``key`` of a split: 0 plans the split, 1 + n renders its chunk n."""
    return np.random.default_rng(np.random.SeedSequence([config.seed, _SPLITS.index(split)], spawn_key=(key,)))


def _plan(split: str, config: WorldConfig, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class label, object and background index of every image of a split, in file order."""
    if split in ("features", "spurious"):
        per_class = config.features_per_class if split == "features" else config.spurious_per_class
        labels = np.repeat(np.arange(num_classes), per_class)
        return labels, np.full_like(labels, NONE), labels.copy()
    rng = _stream(config, split, 0)
    size = config.train_size if split == "train" else config.val_size
    labels = rng.permutation(np.arange(size) % num_classes)
    # Choices for a background: neutral (NONE) or any texture.
    options = np.arange(NONE, num_classes)
    if split == "val":
        return labels, labels, rng.choice(options, size=size)
    # Off-bias images get neutral or another class's texture, uniformly.
    others = np.stack([options[options != label] for label in range(num_classes)])
    off = others[labels, rng.integers(0, num_classes, size=size)]
    return labels, labels, np.where(rng.uniform(size=size) < config.bias, labels, off)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def build_world(config: WorldConfig, root: Path) -> Path:
    """Renders every split of the world into ``root`` (replaced atomically when done).

    Args:
        config: Seed, sizes and bias of the world.
        root: Output folder; an existing one is replaced only once the new one is complete.

    Returns:
        ``root``.
    """
    config.validate()
    label_set = world_label_set()
    classes = label_set.classes
    rows: list[dict[str, object]] = []
    counts: dict[str, int] = {}
    with atomic_directory(Path(root)) as staging:
        spurious_root = staging / "spurious" / "images"
        spurious_root.mkdir(parents=True)
        # Spurious ImageNet ships this file; a fixed text keeps the build byte-identical.
        (spurious_root / "timestamp.txt").write_text(f"spurgen world, seed {config.seed}\n", encoding="utf-8")
        for split in _SPLITS:
            labels, objects, backgrounds = _plan(split, config, label_set.num_classes)
            counts[split] = len(labels)
            if split == "spurious":
                folders = {i: spurious_root / spurious_folder_name(c) for i, c in classes.items()}
            else:
                folders = {i: staging / split / c.dirname for i, c in classes.items()}
            for folder in folders.values():
                folder.mkdir(parents=True)
            for start in range(0, len(labels), _CHUNK):
                stop = start + _CHUNK
                pixels = render(
                    objects[start:stop],
                    backgrounds[start:stop],
                    _stream(config, split, 1 + start // _CHUNK),
                    config.image_size,
                    class_colour_prob=config.class_colour_prob,
                    texture_strength=config.texture_strength,
                )
                for i, image in enumerate(pixels, start=start):
                    label, obj, background = int(labels[i]), int(objects[i]), int(backgrounds[i])
                    # Spurious ImageNet numbers images within their class folder (the plan lists them by class).
                    name = f"{i - label * config.spurious_per_class:03d}.png" if split == "spurious" else f"{i:05d}.png"
                    (folders[label] / name).write_bytes(_png(image))
                    kind, caption = _caption(obj, background, classes)
                    rows.append({"file": (folders[label] / name).relative_to(staging).as_posix(), "caption": caption,
                                 "kind": kind, "split": split, "label": label})
        (staging / CAPTIONS_FILE).write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        manifest = {
            "config": asdict(config),
            "classes": [{"index": c.index, "name": c.name, "spurious_feature": c.spurious_feature}
                        for c in classes.values()],
            "counts": counts,
        }
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return Path(root)


def load_split(root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Decodes one split of a built world.

    Args:
        root: The world folder written by :func:`build_world`.
        split: ``train``, ``val`` or ``features``.

    Returns:
        ``uint8`` images ``(N, H, W, 3)`` and their ``int64`` class labels ``(N,)``, in file order.
    """
    read_json(Path(root) / MANIFEST_FILE)  # a clear error when the world was never built
    rows = [json.loads(line) for line in (Path(root) / CAPTIONS_FILE).read_text(encoding="utf-8").splitlines()]
    rows = [row for row in rows if row["split"] == split]
    require(bool(rows), f"the world at {root} has no '{split}' images; rebuild it with a non-zero size for that split")
    images = np.stack([np.asarray(load_rgb(Path(root) / row["file"])) for row in rows])
    return images, np.array([row["label"] for row in rows], dtype=np.int64)


def spurious_set(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """The spurious set, read through the Spurious ImageNet folder parser select-refs uses.

    Returns:
        ``uint8`` images ``(N, H, W, 3)`` and the class index of each one's folder ``(N,)``.
    """
    folder = SpuriousImageNetFolder(Path(root) / "spurious" / "images")
    paths = [(index, path) for index in sorted(folder.folders) for path in folder.class_images(index)]
    images = np.stack([np.asarray(load_rgb(path)) for _, path in paths])
    return images, np.array([index for index, _ in paths], dtype=np.int64)
