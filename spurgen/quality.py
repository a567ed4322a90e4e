"""No-reference image quality through pyiqa: TOPIQ (the paper's Table 3) or any other NR metric of pyiqa.

pyiqa is an optional extra (``pip install 'spurgen[quality]'``) because its licence is non-commercial;
spurgen itself does not need it. Its metrics download their weights to pyiqa's cache on first use;
``--quality-weights FILE`` gives the weights instead, read as safetensors or with
``torch.load(weights_only=True)`` (pyiqa's own loader unpickles arbitrary objects, so user files never go
through it). Scores are cached per metric, weights and image content, like the classifiers' predictions.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ._runtime import progress_bar, resolve_device
from .errors import SpurgenError
from .images import UnreadableImage, file_sha256, load_rgb
from .predict import PredictionCache

__all__ = ["INSTALL_HINT", "QualityMetric", "load_quality_metric", "score_files"]

INSTALL_HINT = "pip install 'spurgen[quality]'"
# The paper's "TOPIQ" is pyiqa's no-reference TOPIQ trained on KonIQ-10k.
ALIASES = {"topiq": "topiq_nr"}


@dataclass
class QualityMetric:
    """A loaded pyiqa no-reference metric.

    Attributes:
        name: pyiqa's metric name (``topiq_nr``).
        lower_better: Lower scores mean better quality (NIQE, BRISQUE, ...).
        weights: The user's weights file, or ``None`` for pyiqa's own.
        fingerprint: Cache key: metric, weights content and pyiqa version.
        model: pyiqa's ``InferenceModel``.
    """

    name: str
    lower_better: bool
    weights: str | None
    fingerprint: str
    model: Any

    def passes(self, score: float, bar: float) -> bool:
        """Whether a score is at least as good as the bar, in the metric's own direction."""
        return score <= bar if self.lower_better else score >= bar


def _import_pyiqa() -> Any:
    try:
        import pyiqa
    except ImportError:
        raise SpurgenError(f"--quality needs pyiqa, an optional extra; install it with {INSTALL_HINT} "
                           "(pyiqa's licence is non-commercial)") from None
    return pyiqa


def _metric_name(pyiqa: Any, requested: str) -> str:
    """pyiqa's name for a requested no-reference metric.

    Raises:
        SpurgenError: an unknown name (closest names suggested) or a full-reference metric.
    """
    name = ALIASES.get(requested.lower(), requested)
    no_reference = pyiqa.list_models(metric_mode="NR")
    if name in no_reference:
        return name
    if name in pyiqa.list_models(metric_mode="FR"):
        raise SpurgenError(f"quality metric '{requested}' needs a reference image (full-reference); "
                           "choose a no-reference one such as topiq, musiq, clipiqa or niqe")
    close = difflib.get_close_matches(name, no_reference, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}?" if close else f"choose one of {', '.join(no_reference)}"
    raise SpurgenError(f"unknown quality metric '{requested}'; {hint}")


def _create_without_weights(pyiqa: Any, name: str, device: Any) -> Any:
    """The metric's network with random weights: no download, neither of the metric nor of its backbone."""
    # pyiqa's architectures differ in which of these switches they accept; try the fullest set first.
    for switches in ({"pretrained": False, "backbone_pretrain": False}, {"pretrained": False}):
        try:
            return pyiqa.create_metric(name, device=device, **switches)
        except TypeError as exc:
            if "unexpected keyword argument" not in str(exc):
                raise
    raise SpurgenError(f"pyiqa's {name} takes no weights file; drop --quality-weights")


def load_quality_metric(requested: str, weights: str | None = None, device: str = "auto") -> QualityMetric:
    """Loads a pyiqa no-reference metric, with pyiqa's weights or with a local weights file.

    Raises:
        SpurgenError: pyiqa is not installed, the metric is unknown or full-reference, its weights cannot
            be downloaded, or the weights file does not fit it.
    """
    from importlib import metadata

    from .classifiers import load_state_dict_file

    pyiqa = _import_pyiqa()
    name = _metric_name(pyiqa, requested)
    target = resolve_device(device)
    if weights:
        path = Path(weights).expanduser()
        state = load_state_dict_file(path)
        model = _create_without_weights(pyiqa, name, target)
        try:
            model.net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise SpurgenError(f"{path} does not fit pyiqa's {name} ({str(exc).splitlines()[0]}); "
                               "give that metric's checkpoint") from None
        weights_key = file_sha256(path)
    else:
        try:
            model = pyiqa.create_metric(name, device=target)
        except Exception as exc:  # noqa: BLE001 - download and hub failures come in many types
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SpurgenError(f"pyiqa cannot load the weights of {name} ({first}); run once with network so they "
                               "reach pyiqa's cache, or pass --quality-weights FILE") from None
        weights_key = "pyiqa-default"
    model.eval()
    payload = json.dumps({"metric": name, "weights": weights_key, "pyiqa": metadata.version("pyiqa")}, sort_keys=True)
    return QualityMetric(name=name, lower_better=bool(model.lower_better), weights=weights,
                         fingerprint=f"{name}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}", model=model)


class _TensorDataset:
    """Decodes image i to a [3, H, W] tensor in [0, 1] at its own size (pyiqa's NR input)."""

    def __init__(self, files: Sequence[Path]) -> None:
        self.files = list(files)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, Any]:
        from torchvision.transforms.functional import to_tensor

        try:
            return index, to_tensor(load_rgb(self.files[index]))
        except UnreadableImage:
            return index, None  # already reported by the predictions; no score


def _first(batch: list[Any]) -> Any:
    return batch[0]


def score_files(metric: QualityMetric, files: Sequence[Path], hashes: Sequence[str], cache: PredictionCache,
                num_workers: int = 2) -> dict[str, float]:
    """Quality score of each file, by content hash; only images the cache lacks are scored.

    Images are scored one at a time at their own size, since no-reference metrics judge the pixels as
    they are (resizing would change the score).
    """
    import torch
    from torch.utils.data import DataLoader

    known = {h: float(v[0]) for h, v in cache.load(metric.fingerprint).items()}
    todo: dict[str, Path] = {}
    for path, digest in zip(files, hashes):
        if digest not in known:
            todo.setdefault(digest, path)
    new: dict[str, np.ndarray] = {}
    if todo:
        digests = list(todo)
        loader = DataLoader(_TensorDataset(list(todo.values())), batch_size=1, num_workers=num_workers,
                            collate_fn=_first)
        device = metric.model.device
        with progress_bar() as progress, torch.inference_mode():
            task = progress.add_task(f"quality ({metric.name})", total=len(todo))
            for index, image in loader:
                if image is not None:
                    score = metric.model(image.unsqueeze(0).to(device))
                    new[digests[index]] = np.array([float(score.flatten()[0])], dtype=np.float32)
                progress.advance(task)
        cache.add(metric.fingerprint, new)
    return {**known, **{h: float(v[0]) for h, v in new.items()}}
