"""Reading images and image folders: Spurious ImageNet's layout and plain folders of one class.

Every image becomes 8-bit RGB whatever its mode (L, LA, P, RGBA, CMYK, 16-bit, float). Unreadable,
truncated and oversized files raise :class:`UnreadableImage`; callers skip them with a warning and
count them in their manifest.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image

from .errors import SpurgenError

if TYPE_CHECKING:
    from .labels import ClassInfo

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "UnreadableImage",
    "load_rgb",
    "list_images",
    "file_sha256",
    "SpuriousImageNetFolder",
    "class_image_files",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# Larger than any photo in these data sets by far; a bigger file is a decompression bomb or a mistake.
MAX_IMAGE_PIXELS = 64_000_000


class UnreadableImage(Exception):
    """An image file that cannot be decoded; the message says why."""


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # PIL's own I -> L conversion clips at 255 instead of rescaling, turning 16-bit images white.
        array = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if image.mode.startswith("I;16") or array.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(array / scale * 255.0 + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "F":
        array = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(array * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Transparent pixels carry arbitrary colours; show them on white as a viewer would.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_rgb(path: Path | str, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decodes an image file to 8-bit RGB (the first frame of an animation).

    Raises:
        UnreadableImage: empty, truncated, corrupt, not an image, or more than ``max_pixels``.
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise UnreadableImage("empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise UnreadableImage(f"{width}x{height} pixels is more than the {max_pixels} allowed")
                image.seek(0)
                image.load()
                return _to_rgb(image)
    except UnreadableImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise UnreadableImage(f"decompression bomb refused ({exc})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise UnreadableImage(str(exc) or type(exc).__name__) from None


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (by extension, hidden files skipped), sorted by name."""
    return sorted(p for p in Path(folder).iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)


def file_sha256(path: Path) -> str:
    """Content hash of a file, the key of every cache that depends on an image or weight file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class SpuriousClassFolder:
    """One sub-folder of Spurious ImageNet's ``images/``: a class and its neural-PCA component."""

    path: Path
    class_index: int
    component: int


class SpuriousImageNetFolder:
    """Spurious ImageNet's ``images/`` folder: ``timestamp.txt`` and one sub-folder per class.

    A sub-folder's name has the ImageNet class index as its third ``_``-separated field and the
    neural-PCA component index as its last (``name.split('_')[2]``, ``name.split('_')[-1]``); the
    rest of the name is not documented and not relied on.

    Args:
        root: The ``images/`` folder (the folder holding the class sub-folders), or the folder above it.

    Raises:
        SpurgenError: the folder is missing or a sub-folder's name does not follow the layout.
    """

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).expanduser()
        if (self.root / "images").is_dir():
            # The data set's top folder (images/ beside spurious_imagenet_classes.tsv) is accepted as well.
            self.root = self.root / "images"
        if not self.root.is_dir():
            raise SpurgenError(f"dataset folder {self.root} does not exist; pass Spurious ImageNet's 'images' folder "
                               "to --dataset")
        self.folders: dict[int, list[SpuriousClassFolder]] = {}
        for sub in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            fields = sub.name.split("_")
            if len(fields) < 4 or not re.fullmatch(r"\d+", fields[2]) or not re.fullmatch(r"\d+", fields[-1]):
                raise SpurgenError(
                    f"{sub} does not follow Spurious ImageNet's layout (third '_' field the class index, last "
                    "field the component index, e.g. spurious_imagenet_94_hummingbird_1); pass the 'images' folder to "
                    "--dataset"
                )
            entry = SpuriousClassFolder(sub, int(fields[2]), int(fields[-1]))
            self.folders.setdefault(entry.class_index, []).append(entry)
        if not self.folders:
            raise SpurgenError(f"{self.root} has no class sub-folders; pass Spurious ImageNet's 'images' folder to "
                               "--dataset")

    def class_images(self, class_index: int) -> list[Path]:
        """The images of one class (all its component folders), sorted by folder then name."""
        return [image for folder in self.folders.get(class_index, []) for image in list_images(folder.path)]

    def __contains__(self, class_index: int) -> bool:
        return class_index in self.folders


def class_image_files(classes: Sequence[ClassInfo], dataset: str | None, images: str | None) -> dict[int, list[Path]]:
    """The image files of each class, from Spurious ImageNet's layout or a plain one-class folder.

    Raises:
        SpurgenError: no source given, a class missing from the data set, or an empty folder.
    """
    if images:
        folder = Path(images).expanduser()
        if len(classes) != 1:
            raise SpurgenError("--images holds one class; pass exactly one class with --classes")
        if not folder.is_dir():
            raise SpurgenError(f"image folder {folder} does not exist; check the --images path")
        found = {classes[0].index: list_images(folder)}
    elif dataset:
        spurious = SpuriousImageNetFolder(dataset)
        missing = [str(c) for c in classes if c.index not in spurious]
        if missing:
            raise SpurgenError(f"{spurious.root} has no folder for {', '.join(missing[:5])}"
                               f"{' ...' if len(missing) > 5 else ''}; check --classes or the --dataset path")
        found = {c.index: spurious.class_images(c.index) for c in classes}
    else:
        raise SpurgenError("no images given; pass --dataset SPURIOUS_IMAGENET/images or --images DIR")
    empty = [str(c) for c in classes if not found[c.index]]
    if empty:
        raise SpurgenError(f"no image files for {', '.join(empty)}; check that the folder holds .png/.jpg images")
    return found
