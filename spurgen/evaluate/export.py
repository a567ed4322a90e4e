"""``spurgen evaluate --export``: the consistently spurious generated images as a new spurious test set."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from .._runtime import warn
from ..errors import SpurgenError
from ..workspace import EXPORT_MANIFEST, atomic_directory, atomic_write_json, read_json
from .results import Evaluation

__all__ = ["check_export_target", "export_images"]


def check_export_target(folder: Path) -> None:
    """An export replaces its folder whole, so only an empty folder or an earlier export may be there."""
    if not folder.exists():
        return
    earlier = folder / EXPORT_MANIFEST
    ours = earlier.is_file() and read_json(earlier).get("stage") == "export"
    if folder.is_dir() and (not any(folder.iterdir()) or ours):
        return
    raise SpurgenError(f"--export {folder} already holds other files; choose a new or empty folder "
                       "(an earlier spurgen export there is replaced)")


def export_images(evaluation: Evaluation, folder: Path, min_quality: float | None, drop_object_present: bool,
                  manifest_base: dict[str, Any]) -> int:
    """Writes the consistently spurious generated images in Spurious ImageNet's layout; returns their count.

    With ``drop_object_present``, images that most raters said show the class object are left out.

    ``images/<prefix>_<index>_<name>_<component>/<run>_<file>``, ``images/timestamp.txt`` (a Unix time),
    ``spurious_imagenet_classes.tsv`` and ``manifest.json`` (per image: source, predictions, quality).
    """
    entries = []
    with atomic_directory(folder) as staging:
        images = staging / "images"
        images.mkdir()
        # Spurious ImageNet's scripts read this file with int(line) to tell data set versions apart: a Unix time,
        # nothing else. The readable provenance is in manifest.json.
        timestamp = int(time.time())
        (images / "timestamp.txt").write_text(f"{timestamp}\n", encoding="utf-8")
        rows = ["imagenet_index\tclass_name\tspurious_feature\tspurious_npca_components"]
        for cls in evaluation.classes:
            component = cls.npca_components[0] if cls.npca_components else 0
            class_folder = images / f"spurgen_generated_{cls.index}_{cls.slug}_{component}"
            count = 0
            for result in (r for r in evaluation.results if r.cls.index == cls.index and r.source.kind == "generated"):
                for i, path in enumerate(result.files):
                    keep = bool(result.consistent[i]) and (
                        min_quality is None or evaluation.quality.passes(float(result.quality[i]), min_quality)) and (  # type: ignore[union-attr, index]
                        not drop_object_present or result.rating is None
                        or result.hashes[i] not in result.rating.object_seen)
                    if not keep:
                        continue
                    class_folder.mkdir(exist_ok=True)
                    name = f"{result.source.name}_{path.name}"
                    shutil.copyfile(path, class_folder / name)
                    count += 1
                    entries.append({
                        "file": f"images/{class_folder.name}/{name}", "class": cls.index, "run": result.source.name,
                        "source_file": str(path), "sha256": result.hashes[i],
                        "quality": None if result.quality is None else float(result.quality[i]),
                        "predictions": {name_c: {"top1": int(result.top1[c, i]),
                                                 "probability": float(result.probability[c, i])}
                                        for c, name_c in enumerate(evaluation.classifiers)}})
            if count:
                rows.append(f"{cls.index}\t{cls.name.replace(' ', '_')}\t{cls.spurious_feature or ''}\t"
                            f"{list(cls.npca_components)}")
            else:
                warn(f"{cls}: no generated image is consistently spurious"
                     f"{' and above --min-quality' if min_quality is not None else ''}; nothing exported for it")
        (staging / "spurious_imagenet_classes.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        atomic_write_json(staging / EXPORT_MANIFEST, {**manifest_base, "stage": "export", "timestamp": timestamp,
                                                      "min_quality": min_quality,
                                                      "drop_object_present": drop_object_present, "images": entries})
    return len(entries)
