"""The workspace: fixed places for every stage's outputs, safe names, and writes that never leave half a file."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from spurgen.errors import SpurgenError
from spurgen.labels import get_label_set
from spurgen.workspace import (TRAINING_FILE, Workspace, atomic_directory, atomic_write_json, holds_json, read_json,
                               remove_tree, safe_name, sweep_leftovers, workspace_classes)

LABELS = get_label_set("imagenet")


@pytest.mark.parametrize("name", ["lora-r4", "run.1", "A_b"])
def test_safe_names_pass(name: str) -> None:
    assert safe_name(name) == name


@pytest.mark.parametrize("name", ["", "../up", "a/b", "a b", "-flag", "caf\u00e9", "a..b", "x" * 101])
def test_unsafe_names_are_refused(name: str) -> None:
    with pytest.raises(SpurgenError, match="invalid run name"):
        safe_name(name, "run name")


def test_stage_folders_are_named_by_class_and_run(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    hummingbird = LABELS.resolve("hummingbird")
    assert ws.refs_dir(hummingbird) == tmp_path / "refs" / "94-hummingbird"
    assert ws.model_dir(hummingbird, "lora") == tmp_path / "models" / "94-hummingbird" / "lora"
    assert ws.generated_dir(hummingbird, "base") == tmp_path / "generated" / "94-hummingbird" / "base"
    assert ws.npca_path("robust", hummingbird) == tmp_path / "npca" / "robust" / "94-hummingbird.safetensors"
    with pytest.raises(SpurgenError):
        ws.model_dir(hummingbird, "../elsewhere")


def test_finished_runs_are_those_whose_manifest_says_complete(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    cls = LABELS.resolve("koala")
    for run, status in (("done", "complete"), ("half", "running")):
        atomic_write_json(ws.model_dir(cls, run) / TRAINING_FILE, {"status": status, "steps": 3})
    ws.model_dir(cls, "empty").mkdir()
    assert ws.finished_runs(cls) == {"done": {"status": "complete", "steps": 3}}


def test_workspace_classes_reads_class_folders_only(tmp_path: Path) -> None:
    models = tmp_path / "models"
    for name in ("94-hummingbird", "105-koala", "94-wrong-name", "notes", "999999-x"):
        (models / name).mkdir(parents=True)
    (models / "3-tiger_shark").write_text("a file, not a folder")
    assert [c.dirname for c in workspace_classes(models, LABELS)] == ["94-hummingbird", "105-koala"]
    assert workspace_classes(tmp_path / "missing", LABELS) == []


def test_settings_file_errors_name_the_line(tmp_path: Path) -> None:
    ws = Workspace(tmp_path)
    assert ws.settings() == {}
    ws.settings_path.write_text("[finetune]\nsteps = \n")
    with pytest.raises(SpurgenError, match=r"spurgen.toml: .*line 2.*; fix the TOML syntax there"):
        ws.settings()


def test_atomic_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.json"
    atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_a_failed_atomic_directory_keeps_the_old_content(tmp_path: Path) -> None:
    final = tmp_path / "run"
    with atomic_directory(final) as staging:
        (staging / "a.txt").write_text("first")
    with pytest.raises(RuntimeError), atomic_directory(final) as staging:
        (staging / "a.txt").write_text("second")
        raise RuntimeError("crash half way")
    assert (final / "a.txt").read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_holds_json_ignores_only_the_time_stamps(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    atomic_write_json(path, {"created": "yesterday", "value": 1})
    assert holds_json(path, {"created": "today", "value": 1})
    assert not holds_json(path, {"created": "today", "value": 2})
    assert not holds_json(tmp_path / "missing.json", {"value": 1})


def test_remove_tree_and_read_json_errors(tmp_path: Path) -> None:
    folder = tmp_path / "gone"
    (folder / "x").mkdir(parents=True)
    remove_tree(folder)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(SpurgenError, match="is missing; run the stage that writes it first"):
        read_json(tmp_path / "training.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SpurgenError, match="is unreadable"):
        read_json(tmp_path / "bad.json")



def test_sweep_deletes_only_spurgen_leftovers_of_dead_writers(tmp_path: Path) -> None:
    """A killed run's hidden temporary files and folders go; user files, a live writer's files and folders that are
    not the owned one's stay."""
    owned = tmp_path / "models" / "94-hummingbird" / "sfsl"
    dead = _dead_pid()
    leftovers = [owned / f".training.json.{dead}-0123abcd.tmp", owned / "checkpoints" / ".checkpoint-4.tmp" / "x.bin",
                 owned / f".final-{dead}.tmp" / "a.png", owned / ".losses.csv.0123abcd.tmp",  # an older spurgen's name
                 owned.parent / f".sfsl.{dead}-k2j_x9q0.old" / "x", owned / ".spurgen-write-test"]
    kept = [owned / "training.json", owned / ".notes.tmp", owned / ".my.backup.old", owned / "x.12345678.tmp",
            owned / f".live.json.{os.getppid()}-0123abcd.tmp",  # its writer (the test's parent) still runs
            tmp_path / "models" / "105-koala" / ".sfsl.0123abcd.old" / "x",  # another class's folder: not owned
            owned.parent / ".other.0123abcd.tmp"]  # beside the owned folder, but no copy of it
    for path in leftovers + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    swept = sweep_leftovers(owned)
    assert not [path for path in leftovers if path.exists()], swept
    assert all(path.exists() for path in kept)
    assert len(swept) == len(leftovers)


def _dead_pid() -> int:
    """The id of a process that has ended."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid
