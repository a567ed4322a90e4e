"""predict_files' decoders (threads, worker processes, this thread) and the image hash memo."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from spurgen._file_hashes import RACY_WINDOW_NS, FileHashes
from spurgen.classifiers import Classifier, load_classifier, parse_classifier
from spurgen.images import file_sha256
from spurgen.predict import PredictionCache, predict_files


@pytest.fixture(scope="module")
def classifiers(rigged) -> list[Classifier]:
    return [load_classifier(parse_classifier(rigged.flags[name], {})) for name in ("res-a", "conv-b")]


@pytest.fixture()
def images(rigged, tmp_path: Path) -> list[Path]:
    """The rigged images, a copy of one (same content), and an unreadable file, all written long enough ago
    for their hashes to be remembered."""
    files = [f for k in sorted(rigged.files) for f in rigged.files[k]]
    copy = tmp_path / "copy.png"
    shutil.copyfile(files[3], copy)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    for path in (copy, broken):
        _age(path)
    return [*files, copy, broken]


def _age(path: Path, seconds: float = 60.0) -> None:
    """Sets the file's modification time into the past, out of the racy window."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns - int(seconds * 1e9)))


@pytest.mark.parametrize("decode,workers", [("threads", 2), ("processes", 2), ("threads", 0)])
def test_every_decoder_gives_the_same_logits_and_cache_behaviour(classifiers, images, tmp_path: Path,
                                                                 decode: str, workers: int) -> None:
    reference = predict_files(images, classifiers, batch_size=5, num_workers=0)
    cache = PredictionCache(tmp_path / "ws" / "cache" / "predictions")
    first = predict_files(images, classifiers, cache=cache, batch_size=5, num_workers=workers, decode=decode)
    assert first.files == reference.files and first.hashes == reference.hashes
    assert set(first.unreadable) == {images[-1]}
    for name in reference.logits:
        np.testing.assert_allclose(first.logits[name], reference.logits[name], rtol=1e-5, atol=1e-5)
    assert first.computed == {"res-a": 24, "conv-b": 24}  # the copy is classified once, with its original
    again = predict_files(images, classifiers, cache=cache, batch_size=5, num_workers=workers, decode=decode)
    assert again.computed == {"res-a": 0, "conv-b": 0}
    for name in reference.logits:
        np.testing.assert_array_equal(again.logits[name], first.logits[name])


def test_classifiers_with_the_same_preprocessing_share_it_even_when_one_has_cached_rows(rigged, images,
                                                                                      tmp_path: Path) -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(7)
    other = tmp_path / "res-b.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("test_resnet.r160_in1k").state_dict().items()},
              str(other))
    res_a = load_classifier(parse_classifier(rigged.flags["res-a"], {}))
    res_b = load_classifier(parse_classifier(f"res-b=test_resnet.r160_in1k@{other}", {}))
    assert repr(res_a.transform()) == repr(res_b.transform())
    cache = PredictionCache(tmp_path / "cache" / "predictions")
    predict_files(images[:10], [res_a], cache=cache, num_workers=0)
    both = predict_files(images, [res_a, res_b], cache=cache, batch_size=4, num_workers=2, decode="threads")
    assert both.computed == {"res-a": 14, "res-b": 24}
    # Other batch sizes: float32 forwards then differ in the last bits (logits of magnitude 10).
    alone = predict_files(images, [res_b], batch_size=7, num_workers=0)
    np.testing.assert_allclose(both.logits["res-b"], alone.logits["res-b"], rtol=0, atol=1e-3)
    reference = predict_files(images, [res_a], batch_size=7, num_workers=0)
    np.testing.assert_allclose(both.logits["res-a"], reference.logits["res-a"], rtol=0, atol=1e-3)


def test_a_failed_forward_stops_the_decoders_and_stores_nothing(classifiers, images, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cache = PredictionCache(tmp_path / "cache" / "predictions")
    calls = []
    real = type(classifiers[0]).logits

    def failing(self, batch):
        calls.append(len(batch))
        if len(calls) == 3:
            raise RuntimeError("out of memory")
        return real(self, batch)

    monkeypatch.setattr(type(classifiers[0]), "logits", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        predict_files(images, classifiers, cache=cache, batch_size=2, num_workers=2, decode="threads")
    assert not [t for t in threading.enumerate() if t.name.startswith("spurgen-decode")]
    assert not list(cache.folder.rglob("*.safetensors"))  # a crash loses this run's predictions, never older ones
    monkeypatch.undo()
    resumed = predict_files(images, classifiers, cache=cache, batch_size=2, num_workers=2, decode="threads")
    assert resumed.computed == {"res-a": 24, "conv-b": 24}


def test_image_hashes_are_remembered_beside_the_prediction_cache(classifiers, images, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import spurgen._file_hashes as file_hashes

    hashed: list[Path] = []
    real = file_hashes.file_sha256
    monkeypatch.setattr(file_hashes, "file_sha256", lambda path: hashed.append(Path(path)) or real(path))
    cache = PredictionCache(tmp_path / "cache" / "predictions")
    files = images[-2:]  # the copy and the broken file: aged by the fixture
    predict_files(files, classifiers, cache=cache, num_workers=0)
    assert sorted(hashed) == sorted(files)
    memo = json.loads((tmp_path / "cache" / "sha256.json").read_text())
    assert {memo[os.path.abspath(f)]["sha256"] for f in files} == {file_sha256(f) for f in files}
    hashed.clear()
    assert predict_files(files, classifiers, cache=cache, num_workers=0).computed == {"res-a": 0, "conv-b": 0}
    assert hashed == []


def test_a_file_rewritten_in_place_with_the_same_size_is_hashed_again(tmp_path: Path) -> None:
    path = tmp_path / "image.bin"
    path.write_bytes(b"a" * 1000)
    _age(path)
    memo = FileHashes(tmp_path / "sha256.json")
    assert memo.digest(path) == file_sha256(path)
    memo.save()
    inode = path.stat().st_ino
    with open(path, "r+b") as handle:  # same inode, same size, new bytes: only the times change
        handle.write(b"b" * 1000)
    assert path.stat().st_ino == inode and path.stat().st_size == 1000
    assert FileHashes(tmp_path / "sha256.json").digest(path) == file_sha256(path)


def test_restoring_the_old_modification_time_does_not_hide_a_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "image.bin"
    path.write_bytes(b"a" * 1000)
    _age(path)
    memo = FileHashes(tmp_path / "sha256.json")
    memo.digest(path)
    memo.save()
    before = path.stat()
    path.write_bytes(b"b" * 1000)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # as cp -p or tar would; the change time moves
    assert FileHashes(tmp_path / "sha256.json").digest(path) == file_sha256(path)


def test_a_file_written_within_the_racy_window_is_not_remembered(tmp_path: Path) -> None:
    # Rewritten within the same timestamp tick, such a file could keep its identity with new bytes.
    path = tmp_path / "fresh.bin"
    path.write_bytes(b"a" * 1000)
    assert RACY_WINDOW_NS >= 1_000_000_000  # covers one-second timestamps (HFS+, ext3)
    memo = FileHashes(tmp_path / "sha256.json")
    assert memo.digest(path) == file_sha256(path)
    memo.save()
    assert not (tmp_path / "sha256.json").exists()
    _age(path)
    memo.digest(path)
    memo.save()
    assert os.path.abspath(path) in json.loads((tmp_path / "sha256.json").read_text())


def test_saving_keeps_what_another_command_remembered_meanwhile(tmp_path: Path) -> None:
    first, second = tmp_path / "a.bin", tmp_path / "b.bin"
    for path in (first, second):
        path.write_bytes(path.name.encode())
        _age(path)
    ours, theirs = FileHashes(tmp_path / "sha256.json"), FileHashes(tmp_path / "sha256.json")
    theirs.digest(second)
    theirs.save()
    ours.digest(first)
    ours.save()
    assert set(json.loads((tmp_path / "sha256.json").read_text())) == {os.path.abspath(first), os.path.abspath(second)}


def test_a_damaged_memo_is_ignored_and_rebuilt(tmp_path: Path) -> None:
    path = tmp_path / "a.bin"
    path.write_bytes(b"content")
    _age(path)
    (tmp_path / "sha256.json").write_text("{not json")
    memo = FileHashes(tmp_path / "sha256.json")
    assert memo.digest(path) == file_sha256(path)
    memo.save()
    assert json.loads((tmp_path / "sha256.json").read_text())[os.path.abspath(path)]["sha256"] == file_sha256(path)
