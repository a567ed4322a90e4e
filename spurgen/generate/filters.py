"""The filters of ``spurgen generate --until N --filter ...``: which generated images to accept.

- ``consistent``: every classifier predicts the class (top-1), as evaluate's consistently spurious rate.
- ``quality>=X``: the ``--quality`` metric scores the image at least X (at most X for metrics where lower
  is better).
- ``no-object``: a zero-shot check with a user-supplied open_clip model: the image is rejected when the class
  prompt ("a photo of a <class>") outscores the feature prompt ("a photo of <feature>") by more than
  ``--clip-margin`` in CLIP logits (scaled cosine similarities), i.e. when it looks more like the class
  object than like its spurious feature.

Classifier predictions, quality scores and CLIP scores are all kept in the workspace's content-addressed
caches (``cache/predictions``, ``cache/quality``, ``cache/clip``), so a resumed run judges its earlier
images without recomputing anything.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .._file_hashes import sha256_all
from .._runtime import resolve_device
from ..classifiers import classifier_records, load_classifiers, load_state_dict_file
from ..config import GenerateConfig
from ..errors import SpurgenError
from ..images import file_sha256, load_rgb
from ..labels import ClassInfo, LabelSet
from ..predict import PredictionCache, consistency, predict_files
from ..quality import QualityMetric, load_quality_metric, score_files
from ..workspace import Workspace

if TYPE_CHECKING:
    import torch

__all__ = ["Verdict", "ImageFilters", "ZeroShot", "load_zero_shot"]

@dataclass(frozen=True)
class Verdict:
    """Whether an image passed every filter, and why not."""

    accepted: bool
    reasons: tuple[str, ...]


@dataclass
class ZeroShot:
    """An open_clip model with its image transform and tokenizer, and the cache key of its weights."""

    model: Any
    preprocess: Any
    tokenizer: Any
    fingerprint: str
    device: "torch.device"
    batch_size: int = 32

    def prompts(self, cls: ClassInfo) -> tuple[str, str]:
        """The class prompt and the feature prompt."""
        return f"a photo of a {cls.name}", f"a photo of {cls.spurious_feature}"

    def scores(self, cls: ClassInfo, files: Sequence[Path], hashes: Sequence[str],
               cache: PredictionCache) -> np.ndarray:
        """[images, 2]: CLIP logits of the class prompt and the feature prompt, from the cache where known."""
        import torch

        key = hashlib.sha256(f"{self.fingerprint}\0{self.prompts(cls)}".encode()).hexdigest()[:16]
        known = cache.load(key)
        todo = {h: f for f, h in zip(files, hashes) if h not in known}
        if todo:
            new: dict[str, np.ndarray] = {}
            with torch.inference_mode():
                text = self.model.encode_text(self.tokenizer(list(self.prompts(cls))).to(self.device))
                text = text / text.norm(dim=-1, keepdim=True)
                pending = list(todo.items())
                for start in range(0, len(pending), self.batch_size):
                    chunk = pending[start:start + self.batch_size]
                    image = self.model.encode_image(torch.stack([self.preprocess(load_rgb(f)) for _, f in chunk])
                                                    .to(self.device))
                    image = image / image.norm(dim=-1, keepdim=True)
                    logits = (self.model.logit_scale.exp() * image @ text.T).float().cpu().numpy()
                    new.update(zip((h for h, _ in chunk), logits))
            cache.add(key, new)
            known = {**known, **new}
        return np.stack([known[h] for h in hashes])


def load_zero_shot(arch: str, weights: str | None, device: "torch.device") -> ZeroShot:
    """An open_clip model: ``arch`` with a weight file (read safely), or an ``hf-hub:`` id on its own.

    Raises:
        SpurgenError: an unknown architecture, unreadable weights, or weights that do not fit it.
    """
    import open_clip

    # Read (and vetted) before the model is built: a refused file costs no model construction.
    state = load_state_dict_file(Path(weights).expanduser()) if weights else None
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(arch, device="cpu")
    except (RuntimeError, ValueError, OSError) as exc:
        raise SpurgenError(f"cannot create open_clip model {arch!r} ({str(exc).splitlines()[0]}); give an "
                           "open_clip architecture (open_clip.list_models()) or an hf-hub: id") from None
    if weights:
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise SpurgenError(f"--clip-weights {weights} do not fit open_clip model {arch!r} "
                               f"({str(exc).splitlines()[0]}); give the weights of that architecture") from None
        fingerprint = f"{arch}\0{file_sha256(Path(weights).expanduser())}"
    else:
        fingerprint = arch
    return ZeroShot(model.eval().to(device), preprocess, open_clip.get_tokenizer(arch),
                    hashlib.sha256(fingerprint.encode()).hexdigest()[:16], device)


class ImageFilters:
    """The parsed ``--filter`` list with the models it needs, loaded once for every class and run."""

    def __init__(self, config: GenerateConfig, workspace: Workspace, labels: LabelSet, classes: Sequence[ClassInfo],
                 classifier_flags: Sequence[str]) -> None:
        """Loads the models the filters need.

        Raises:
            SpurgenError: ``no-object`` for a class without a spurious feature, or a model that cannot load.
        """
        self.labels = labels
        self.filters = list(config.filter)
        self.bar = next((float(f.split(">=")[1]) for f in self.filters if f.startswith("quality>=")), None)
        if "no-object" in self.filters:
            featureless = [str(c) for c in classes if not c.spurious_feature]
            if featureless:
                raise SpurgenError(f"the no-object filter compares the class with its spurious feature, but "
                                   f"{', '.join(featureless)} has none in the '{labels.name}' label set; "
                                   "leave out no-object")
        self.predictions = PredictionCache(workspace.cache_dir("predictions"))
        self.quality_cache = PredictionCache(workspace.cache_dir("quality"))
        self.clip_cache = PredictionCache(workspace.cache_dir("clip"))
        self.batch_size = config.batch_size
        self.classifiers = (load_classifiers(config.classifiers, classifier_flags, labels, workspace.settings(),
                                             config.crop, config.device) if "consistent" in self.filters else [])
        self.metric: QualityMetric | None = (load_quality_metric(config.quality, config.quality_weights, config.device)
                                             if self.bar is not None else None)
        self.zero_shot = (load_zero_shot(config.clip_model, config.clip_weights, resolve_device(config.device))  # type: ignore[arg-type]
                          if "no-object" in self.filters else None)
        self.clip_margin = config.clip_margin

    def record(self) -> dict[str, Any]:
        """What generation.json records of the filters and their models."""
        return {"filters": self.filters, "classifiers": classifier_records(self.classifiers),
                "quality": {"metric": self.metric.name, "weights": self.metric.weights, "bar": self.bar}
                if self.metric else None,
                "clip": ({"fingerprint": self.zero_shot.fingerprint, "margin": self.clip_margin}
                         if self.zero_shot else None)}

    def judge(self, cls: ClassInfo, files: Sequence[Path]) -> list[Verdict]:
        """Every filter's verdict on each image of one class."""
        reasons: list[list[str]] = [[] for _ in files]
        hashes = sha256_all(files)
        if self.classifiers:
            # Generated PNGs were just written by spurgen, so they are readable.
            predictions = predict_files(files, self.classifiers, cache=self.predictions, batch_size=self.batch_size,
                                        num_workers=0, description="classifying")
            top1, _, consistent = consistency(predictions, predictions.rows(files), cls.index)
            for i in np.flatnonzero(~consistent):
                reasons[i].append("not consistent: " + ", ".join(
                    f"{c.name} predicts {self.labels.label(int(top1[n, i]))}"
                    for n, c in enumerate(self.classifiers) if top1[n, i] != cls.index))
        if self.metric is not None and self.bar is not None:
            scores = score_files(self.metric, files, hashes, self.quality_cache, num_workers=0)
            for i, digest in enumerate(hashes):
                if not self.metric.passes(scores[digest], self.bar):
                    relation = "above" if self.metric.lower_better else "below"
                    reasons[i].append(f"{self.metric.name} {scores[digest]:.3f} {relation} {self.bar:g}")
        if self.zero_shot is not None:
            logits = self.zero_shot.scores(cls, files, hashes, self.clip_cache)
            class_prompt, feature_prompt = self.zero_shot.prompts(cls)
            for i, (class_logit, feature_logit) in enumerate(logits):
                if class_logit - feature_logit > self.clip_margin:
                    reasons[i].append(f"object: CLIP scores '{class_prompt}' {class_logit - feature_logit:.2f} "
                                      f"above '{feature_prompt}'")
        return [Verdict(not r, tuple(r)) for r in reasons]
