"""Batched classifier predictions over image files, with a content-addressed cache.

Images are decoded once, on threads or in DataLoader worker processes, and transformed for every classifier
that still needs them; predictions already in the cache (keyed by the classifier's fingerprint and the file's
SHA-256, remembered between commands in ``cache/sha256.json``) are not recomputed, so adding a classifier to a
run only computes that classifier.
"""

from __future__ import annotations

import os
import uuid
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal, Sequence

import numpy as np

from ._file_hashes import FileHashes, sha256_all
from ._runtime import distributed_state, progress_bar, warn
from .images import UnreadableImage, load_rgb
from .workspace import atomic_write_bytes

if TYPE_CHECKING:
    from .classifiers import Classifier

__all__ = ["PredictionCache", "Predictions", "predict_files", "consistency", "Decode", "DECODE_ENV"]

Decode = Literal["auto", "threads", "processes"]
# Overrides predict_files' choice of decoder (benchmarks compare them; a user can force one).
DECODE_ENV = "SPURGEN_DECODE"


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
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        entries: dict[str, np.ndarray] = {}
        for shard in sorted((self.folder / fingerprint).glob("*.safetensors")):
            try:
                entries.update(load_file(str(shard)))
            except (SafetensorError, OSError, ValueError):
                warn(f"ignoring unreadable prediction cache shard {shard}; it will be recomputed")
        return entries

    def sha256(self, files: Sequence[Path]) -> list[str]:
        """The files' SHA-256, remembered by file identity in ``sha256.json`` beside this cache's folder (the
        workspace's ``cache/sha256.json``, where generate remembers its model files'), so that a command run again
        on the same images does not read them all to hash them."""
        memo = FileHashes(self.folder.parent / "sha256.json")
        digests = memo.digests(files)
        memo.save()
        return digests

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
    """Decodes file i once and applies each distinct transform that a classifier needing the file has.

    Classifiers with the same preprocessing (equal transform reprs: the same resize, crop and input size) share
    one transformed tensor per image, so two ResNet-50s cost one resize and one batch of memory, not two.

    Args:
        files: The files to decode.
        transforms: Each classifier's transform.
        needs: ``[classifiers, files]``: whether the classifier still needs the file's logits.
    """

    def __init__(self, files: Sequence[Path], transforms: Sequence[Any], needs: np.ndarray) -> None:
        # A transform's repr names every parameter (timm's and torchvision's do; a lambda's holds its address, so
        # an unknown transform is never shared by mistake).
        distinct: dict[str, int] = {}
        self.group = [distinct.setdefault(repr(t), len(distinct)) for t in transforms]
        self.files, self.needs = list(files), needs
        self.transforms = [transforms[self.group.index(g)] for g in range(len(distinct))]
        self.group_needs = np.stack([needs[[c for c, gc in enumerate(self.group) if gc == g]].any(axis=0)
                                     for g in range(len(distinct))])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, list[Any] | None, str | None]:
        try:
            image = load_rgb(self.files[index])
        except UnreadableImage as exc:
            return index, None, str(exc)
        return index, [t(image) if self.group_needs[g, index] else None for g, t in enumerate(self.transforms)], None

    def collate(self, batch: list[tuple[int, list[Any] | None, str | None]]) -> _Batch:
        """Stacks each transform's images of a batch (in the decoder, so the main thread only feeds the model)."""
        import torch

        inputs = []
        for g in range(len(self.transforms)):
            rows = [(i, tensors[g]) for i, tensors, _ in batch if tensors is not None and tensors[g] is not None]
            inputs.append(([i for i, _ in rows], torch.stack([t for _, t in rows])) if rows else None)
        return _Batch(len(batch), inputs, [(i, reason) for i, _, reason in batch if reason is not None])

    def inputs_of(self, batch: _Batch, classifier: int) -> tuple[list[int], Any] | None:
        """The rows of ``batch`` that ``classifier`` needs and their images, or ``None`` if it needs none."""
        import torch

        entry = batch.inputs[self.group[classifier]]
        if entry is None:
            return None
        rows, images = entry
        keep = self.needs[classifier, rows]
        if keep.all():
            return entry
        # Another classifier of the group needs rows whose logits this one has cached.
        return ([r for r, k in zip(rows, keep) if k], images[torch.from_numpy(keep)]) if keep.any() else None


@dataclass
class _Batch:
    """A decoded batch: its size, per distinct transform the dataset rows and their stacked images (``None`` when
    no row needs the transform), and the unreadable rows with their reasons."""

    size: int
    inputs: list[tuple[list[int], Any] | None]
    unreadable: list[tuple[int, str]]

    def pin_memory(self) -> _Batch:
        """Page-locked inputs, so that copying them to the GPU does not block (DataLoader's pin_memory hook)."""
        inputs = [None if entry is None else (entry[0], entry[1].pin_memory()) for entry in self.inputs]
        return _Batch(self.size, inputs, self.unreadable)


def _usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _decoder(decode: Decode, num_workers: int) -> Decode:
    """``threads`` or ``processes``: the one asked for, else :data:`DECODE_ENV`'s, else by the host's cores.

    Worker processes decode in parallel without the GIL, but each costs a fork of this process at the start and a
    join at the end (1.6 s for 12 workers on a GPU host), and without a core of their own they only take turns
    with the main thread. Threads start at once and PIL decodes and resizes without the GIL; they are chosen when
    the host has fewer cores than the workers and the main thread would need.
    """
    chosen = decode if decode != "auto" else os.environ.get(DECODE_ENV, "auto")
    if chosen not in ("threads", "processes"):
        chosen = "threads" if _usable_cores() < num_workers + 1 else "processes"
    return chosen  # type: ignore[return-value]


def _decoded_batches(dataset: _DecodeDataset, batch_size: int, num_workers: int, pin_memory: bool,
                     decode: Decode) -> Iterator[_Batch]:
    """The dataset's batches in order, decoded ``num_workers`` batches at a time on threads or in worker processes
    (in this thread with ``num_workers=0``), at most two batches per worker ahead of the consumer."""
    if num_workers == 0 or _decoder(decode, num_workers) == "processes":
        from torch.utils.data import DataLoader

        yield from DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=dataset.collate,
                              pin_memory=pin_memory)
        return

    def decode_batch(start: int) -> _Batch:
        batch = dataset.collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        return batch.pin_memory() if pin_memory else batch

    starts = iter(range(0, len(dataset), batch_size))
    pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="spurgen-decode")
    try:
        ahead: deque[Future[_Batch]] = deque(pool.submit(decode_batch, start)
                                             for _, start in zip(range(2 * num_workers), starts))
        while ahead:
            batch = ahead.popleft().result()
            for start in starts:  # one batch queued for each one taken
                ahead.append(pool.submit(decode_batch, start))
                break
            yield batch
    finally:
        # Stopped early (an error in a forward): batches not started are dropped, not decoded.
        pool.shutdown(wait=True, cancel_futures=True)


def predict_files(files: Sequence[Path], classifiers: Sequence["Classifier"], *, cache: PredictionCache | None = None,
                  batch_size: int = 32, num_workers: int = 2, description: str = "predicting",
                  decode: Decode = "auto") -> Predictions:
    """Logits of every classifier on every file, computing only what the cache lacks.

    Args:
        files: Image files; unreadable ones are reported in :attr:`Predictions.unreadable`.
        classifiers: Loaded classifiers (each on its device).
        cache: Where predictions are looked up and stored, and file hashes remembered; ``None`` computes everything.
        batch_size: Images per forward pass.
        num_workers: Threads or worker processes decoding images (0: this thread decodes between forwards).
        description: Progress bar label.
        decode: ``threads``, ``processes``, or ``auto`` (see :func:`_decoder`); the predictions are the same.
    """
    import torch

    # Under `accelerate launch` every process decodes and classifies its own share of the images, then
    # all results are gathered to every process; alone, the share is everything.
    state = distributed_state()
    files = list(files)
    hashes = cache.sha256(files) if cache else sha256_all(files)
    fingerprints = [c.fingerprint() for c in classifiers]
    known = [cache.load(fp) if cache else {} for fp in fingerprints]
    needs = np.array([[h not in k for h in hashes] for k in known], dtype=bool).reshape(len(classifiers), len(files))
    # Files with the same content (a reference image and its original in the data set) are decoded and
    # classified once.
    first_of: dict[str, int] = {}
    for i, digest in enumerate(hashes):
        first_of.setdefault(digest, i)
    to_decode = [i for i in range(len(files)) if first_of[hashes[i]] == i and needs[:, i].any()]
    # Whole batches are dealt to the processes in turn: every image meets the same batch companions whatever the
    # number of processes, and so gets bitwise the same logits (a batch's size changes the order of the kernels'
    # sums, and near-ties in select-refs' ranking would follow that rounding).
    batches = [to_decode[start:start + batch_size] for start in range(0, len(to_decode), batch_size)]
    mine = [i for batch in batches[state.process_index::state.num_processes] for i in batch]
    new: list[dict[str, np.ndarray]] = [{} for _ in classifiers]
    unreadable: dict[Path, str] = {}
    if mine:
        dataset = _DecodeDataset([files[i] for i in mine], [c.transform() for c in classifiers], needs[:, mine])
        on_gpu = any(c.device.type == "cuda" for c in classifiers)
        # Logits stay on the device until the end: reading each batch back would make the GPU wait for the
        # next batch's copy instead of overlapping it.
        pending: list[list[tuple[list[int], Any]]] = [[] for _ in classifiers]
        with progress_bar() as progress, torch.inference_mode():
            task = progress.add_task(description, total=len(mine))
            for batch in _decoded_batches(dataset, batch_size, num_workers, on_gpu, decode):
                for c, classifier in enumerate(classifiers):
                    inputs = dataset.inputs_of(batch, c)
                    if inputs is not None:
                        rows, images = inputs
                        out = classifier.logits(images.to(classifier.device, non_blocking=True))
                        pending[c].append((rows, out.float()))
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
        logits[classifier.name] = (np.stack([table[hashes[i]] for i in readable]) if readable
                                   else np.zeros((0, classifier.num_classes), np.float32))
    return Predictions(files=[files[i] for i in readable], hashes=[hashes[i] for i in readable], logits=logits,
                       unreadable=unreadable, computed={c.name: len(n) for c, n in zip(classifiers, new)})


def consistency(predictions: Predictions, rows: list[int],
                class_index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per classifier and image: top-1 index, probability of the class; and the consistency mask.

    Returns:
        ``top1`` [classifiers, images], ``prob`` [classifiers, images], ``consistent`` [images].
    """
    top1 = np.stack([predictions.logits[name][rows].argmax(axis=1) for name in predictions.logits])
    prob = np.stack([predictions.probabilities(name)[rows, class_index] for name in predictions.logits])
    return top1, prob, (top1 == class_index).all(axis=0)
