"""Batched classifier predictions over image files, with a content-addressed cache.

Images are decoded once, in DataLoader workers, and transformed for every classifier that still
needs them; predictions already in the cache (keyed by the classifier's fingerprint and the file's
SHA-256) are not recomputed, so adding a classifier to a run only computes that classifier.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ._file_hashes import sha256_all
from ._runtime import distributed_state, progress_bar, warn
from .images import UnreadableImage, load_rgb
from .workspace import atomic_write_bytes

if TYPE_CHECKING:
    from .classifiers import Classifier

__all__ = ["PredictionCache", "Predictions", "predict_files", "consistency"]


class PredictionCache:
    """Logits per (classifier fingerprint, image SHA-256), stored as safetensors shards.

    Each run adds one shard per classifier instead of rewriting a growing file, so a crash can
    lose at most the predictions of that run, never older ones.

    Args:
        folder: ``cache/predictions`` in the workspace.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def load(self, fingerprint: str) -> dict[str, np.ndarray]:
        from safetensors.numpy import load_file
        from safetensors import SafetensorError

        entries: dict[str, np.ndarray] = {}
        for shard in sorted((self.folder / fingerprint).glob("*.safetensors")):
            try:
                entries.update(load_file(str(shard)))
            except (SafetensorError, OSError, ValueError):
                warn(f"ignoring unreadable prediction cache shard {shard}; it will be recomputed")
        return entries

    def add(self, fingerprint: str, entries: dict[str, np.ndarray]) -> None:
        from safetensors.numpy import save

        if entries:
            atomic_write_bytes(self.folder / fingerprint / f"{uuid.uuid4().hex}.safetensors",
                               save({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in entries.items()}))


@dataclass
class Predictions:
    """Logits of every readable file for every classifier.

    Attributes:
        files: The readable files, in input order; rows of every logits array follow it.
        hashes: SHA-256 of each readable file.
        logits: ``{classifier name: array [len(files), num_classes]}``.
        unreadable: ``{file: reason}`` for files that could not be decoded.
        computed: ``{classifier name: rows computed in this call}`` (the rest came from the cache).
    """

    files: list[Path]
    hashes: list[str]
    logits: dict[str, np.ndarray]
    unreadable: dict[Path, str] = field(default_factory=dict)
    computed: dict[str, int] = field(default_factory=dict)

    def probabilities(self, classifier: str) -> np.ndarray:
        logits = self.logits[classifier].astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def rows(self, files: Sequence[Path]) -> list[int]:
        """Row indices of ``files`` (readable ones only, in the given order)."""
        position = {f: i for i, f in enumerate(self.files)}
        return [position[f] for f in files if f in position]


class _DecodeDataset:
    """Decodes file i once and applies the transform of each classifier that needs it."""

    def __init__(self, files: Sequence[Path], transforms: Sequence[Any], needs: np.ndarray) -> None:
        self.files, self.transforms, self.needs = list(files), list(transforms), needs

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, list[Any] | None, str | None]:
        try:
            image = load_rgb(self.files[index])
        except UnreadableImage as exc:
            return index, None, str(exc)
        return index, [t(image) if self.needs[c, index] else None for c, t in enumerate(self.transforms)], None

    def collate(self, batch: list[tuple[int, list[Any] | None, str | None]]) -> _Batch:
        """Stacks each classifier's images of a batch (in the worker, so the main process only feeds the GPU)."""
        import torch

        inputs = []
        for c in range(len(self.transforms)):
            rows = [(i, tensors[c]) for i, tensors, _ in batch if tensors is not None and tensors[c] is not None]
            inputs.append(([i for i, _ in rows], torch.stack([t for _, t in rows])) if rows else None)
        return _Batch(len(batch), inputs, [(i, reason) for i, _, reason in batch if reason is not None])


@dataclass
class _Batch:
    """A decoded batch: its size, per classifier the dataset rows and their stacked images (``None`` when no
    row needs the classifier), and the unreadable rows with their reasons."""

    size: int
    inputs: list[tuple[list[int], Any] | None]
    unreadable: list[tuple[int, str]]

    def pin_memory(self) -> _Batch:
        """Page-locked inputs, so that copying them to the GPU does not block (DataLoader's pin_memory hook)."""
        inputs = [None if entry is None else (entry[0], entry[1].pin_memory()) for entry in self.inputs]
        return _Batch(self.size, inputs, self.unreadable)


def predict_files(files: Sequence[Path], classifiers: Sequence["Classifier"], *, cache: PredictionCache | None = None,
                  batch_size: int = 32, num_workers: int = 2, description: str = "predicting") -> Predictions:
    """Logits of every classifier on every file, computing only what the cache lacks.

    Args:
        files: Image files; unreadable ones are reported in :attr:`Predictions.unreadable`.
        classifiers: Loaded classifiers (each on its device).
        cache: Where predictions are looked up and stored; ``None`` computes everything.
        batch_size: Images per forward pass.
        num_workers: DataLoader worker processes decoding images.
        description: Progress bar label.
    """
    import torch
    from torch.utils.data import DataLoader

    # Under `accelerate launch` every process decodes and classifies its own share of the images, then
    # all results are gathered to every process; alone, the share is everything.
    state = distributed_state()
    files = list(files)
    hashes = sha256_all(files)
    fingerprints = [c.fingerprint() for c in classifiers]
    known = [cache.load(fp) if cache else {} for fp in fingerprints]
    needs = np.array([[h not in k for h in hashes] for k in known], dtype=bool).reshape(len(classifiers), len(files))
    # Files with the same content (a reference image and its original in the data set) are decoded and
    # classified once.
    first_of: dict[str, int] = {}
    for i, digest in enumerate(hashes):
        first_of.setdefault(digest, i)
    to_decode = [i for i in range(len(files)) if first_of[hashes[i]] == i and needs[:, i].any()]
    mine = to_decode[state.process_index::state.num_processes]
    new: list[dict[str, np.ndarray]] = [{} for _ in classifiers]
    unreadable: dict[Path, str] = {}
    if mine:
        dataset = _DecodeDataset([files[i] for i in mine], [c.transform() for c in classifiers], needs[:, mine])
        on_gpu = any(c.device.type == "cuda" for c in classifiers)
        loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=dataset.collate,
                            pin_memory=on_gpu)
        # Logits stay on the device until the end: reading each batch back would make the GPU wait for the
        # next batch's copy instead of overlapping it.
        pending: list[list[tuple[list[int], Any]]] = [[] for _ in classifiers]
        with progress_bar() as progress, torch.inference_mode():
            task = progress.add_task(description, total=len(mine))
            for batch in loader:
                for c, (classifier, inputs) in enumerate(zip(classifiers, batch.inputs)):
                    if inputs is not None:
                        rows, images = inputs
                        pending[c].append((rows, classifier.logits(images.to(classifier.device, non_blocking=True)).float()))
                for i, reason in batch.unreadable:
                    unreadable[files[mine[i]]] = reason
                progress.advance(task, batch.size)
        for c, batches in enumerate(pending):
            for rows, logits in batches:
                for i, row in zip(rows, logits.cpu().numpy()):
                    new[c][hashes[mine[i]]] = row
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        for part_new, part_unreadable in gather_object([(new, unreadable)]):
            for c, entries in enumerate(part_new):
                new[c].update(entries)
            unreadable.update(part_unreadable)
    if cache and state.is_main_process:
        for fingerprint, entries in zip(fingerprints, new):
            cache.add(fingerprint, entries)
    bad_content = {h: unreadable[f] for f, h in zip(files, hashes) if f in unreadable}
    unreadable = {f: bad_content[h] for f, h in zip(files, hashes) if h in bad_content}
    readable = [i for i, f in enumerate(files) if f not in unreadable]
    logits = {}
    for c, classifier in enumerate(classifiers):
        table = {**known[c], **new[c]}
        logits[classifier.name] = np.stack([table[hashes[i]] for i in readable]) if readable else np.zeros((0, classifier.num_classes), np.float32)
    return Predictions(files=[files[i] for i in readable], hashes=[hashes[i] for i in readable], logits=logits,
                       unreadable=unreadable, computed={c.name: len(n) for c, n in zip(classifiers, new)})


def consistency(predictions: Predictions, rows: list[int], class_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per classifier and image: top-1 index, probability of the class; and the consistency mask.

    Returns:
        ``top1`` [classifiers, images], ``prob`` [classifiers, images], ``consistent`` [images].
    """
    top1 = np.stack([predictions.logits[name][rows].argmax(axis=1) for name in predictions.logits])
    prob = np.stack([predictions.probabilities(name)[rows, class_index] for name in predictions.logits])
    return top1, prob, (top1 == class_index).all(axis=0)
