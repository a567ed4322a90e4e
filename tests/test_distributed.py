"""Stages under `accelerate launch` with 2 CPU processes (gloo) give the same results as 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def accelerate_launch(*args: str, processes: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs ``accelerate launch --multi_gpu --num_processes N -m spurgen ARGS`` on the CPU (gloo).

    ``--cpu --num_processes N`` would start a single process unless mpirun is set up; ``--multi_gpu`` on a
    machine without GPUs starts N torch.distributed processes that fall back to the gloo backend.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "spurgen", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


def _selection_without_timestamps(path: Path) -> dict:
    manifest = json.loads(path.read_text())
    for key in ("created", "computed_predictions", "processes"):
        manifest.pop(key)
    return manifest


def test_select_refs_with_two_processes_equals_one(rigged, tmp_path):
    args = ["select-refs", "--dataset", str(rigged.dataset), "--classes", "hummingbird,koala", "-k", "3",
            "--classifiers", "res-a,conv-b,vit-c", "--num-workers", "0",
            *[f"--classifier={f}" for f in rigged.flags.values()]]
    single = subprocess.run([sys.executable, "-m", "spurgen", *args, "-w", str(tmp_path / "one")],
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr
    double = accelerate_launch(*args, "-w", str(tmp_path / "two"))
    assert double.returncode == 0, double.stderr[-3000:]
    for folder in ("94-hummingbird", "105-koala"):
        one = _selection_without_timestamps(tmp_path / "one" / "refs" / folder / "selection.json")
        two = _selection_without_timestamps(tmp_path / "two" / "refs" / folder / "selection.json")
        assert one == two
        names = sorted(p.name for p in (tmp_path / "two" / "refs" / folder).iterdir())
        assert names == sorted(p.name for p in (tmp_path / "one" / "refs" / folder).iterdir())
    one = json.loads((tmp_path / "one" / "refs" / "94-hummingbird" / "selection.json").read_text())
    two = json.loads((tmp_path / "two" / "refs" / "94-hummingbird" / "selection.json").read_text())
    assert (one["processes"], two["processes"]) == (1, 2)
    # each process computed its half, the main process wrote them: every image once per classifier
    shards = list((tmp_path / "two" / "cache" / "predictions").rglob("*.safetensors"))
    assert len(shards) == 3
