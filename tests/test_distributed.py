"""Stages under `accelerate launch` with 2 CPU processes (gloo) give the same results as 1 process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Two-process accelerate launches on the CPU: CI runs them, the everyday loop (make test-fast) does not.
pytestmark = pytest.mark.slow


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


def assert_same_results(one, two, where: str = "") -> None:
    """``one == two``, naming the first difference (a key path) when they differ."""
    if isinstance(one, dict) and isinstance(two, dict):
        assert one.keys() == two.keys(), where
        for key in one:
            assert_same_results(one[key], two[key], f"{where}.{key}")
    elif isinstance(one, list) and isinstance(two, list):
        assert len(one) == len(two), where
        for index, (a, b) in enumerate(zip(one, two)):
            assert_same_results(a, b, f"{where}[{index}]")
    else:
        assert one == two, where


def _selection_without_timestamps(path: Path) -> dict:
    manifest = json.loads(path.read_text())
    for key in ("created", "computed_predictions", "processes"):
        manifest.pop(key)
    return manifest


def test_select_refs_with_two_processes_equals_one(rigged, tmp_path):
    args = ["select-refs", "--dataset", str(rigged.dataset), "--classes", "hummingbird,koala", "-k", "3",
            "--classifiers", "res-a,conv-b,vit-c", "--num-workers", "0",
            *[f"--classifier={f}" for f in rigged.flags.values()]]
    single = _spurgen(*args, "-w", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    double = accelerate_launch(*args, "-w", str(tmp_path / "two"))
    assert double.returncode == 0, double.stderr[-3000:]
    for folder in ("94-hummingbird", "105-koala"):
        one = _selection_without_timestamps(tmp_path / "one" / "refs" / folder / "selection.json")
        two = _selection_without_timestamps(tmp_path / "two" / "refs" / folder / "selection.json")
        assert_same_results(one, two)
        names = sorted(p.name for p in (tmp_path / "two" / "refs" / folder).iterdir())
        assert names == sorted(p.name for p in (tmp_path / "one" / "refs" / folder).iterdir())
    one = json.loads((tmp_path / "one" / "refs" / "94-hummingbird" / "selection.json").read_text())
    two = json.loads((tmp_path / "two" / "refs" / "94-hummingbird" / "selection.json").read_text())
    assert (one["processes"], two["processes"]) == (1, 2)
    # each process computed its share, the main process wrote them: every image once per classifier
    from safetensors import safe_open

    for folder in (tmp_path / "two" / "cache" / "predictions").iterdir():
        keys = []
        for shard in folder.glob("*.safetensors"):
            with safe_open(str(shard), "pt") as entries:
                keys += list(entries.keys())
        assert len(keys) == len(set(keys)) == len(rigged.files[94]) + len(rigged.files[105]), folder.name


def _spurgen(*args: str) -> subprocess.CompletedProcess:
    """One process, as a user runs it without accelerate."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "spurgen", *args], capture_output=True, text=True, timeout=600, env=env
    )


def _without(manifest: dict, *keys: str) -> dict:
    return {k: v for k, v in manifest.items() if k not in keys}


# One model per family; FLUX.1 samples with its own scheduler, at 64 px instead of its folder's 256.
@pytest.mark.parametrize("model, extra", [("tiny_sd_dir", []), ("tiny_sdxl_dir", []),
                                          ("tiny_flux_dir", ["--scheduler", "model", "--resolution", "64"])])
def test_generate_with_two_processes_makes_the_same_images_as_one(model, extra, request, tmp_path):
    args = ["generate", "--base", "--model", str(request.getfixturevalue(model)), "--classes", "hummingbird",
            "--num-images", "5", "--steps", "2", "--batch-size", "2", "--device", "cpu", *extra]
    single = _spurgen(*args, "-w", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    double = accelerate_launch(*args, "-w", str(tmp_path / "two"))
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = (tmp_path / name / "generated" / "94-hummingbird" / "base" for name in ("one", "two"))
    names = sorted(p.name for p in one.iterdir())
    assert names == ["00000.png", "00001.png", "00002.png", "00003.png", "00004.png", "generation.json"]
    assert sorted(p.name for p in two.iterdir()) == names
    for name in names[:-1]:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    manifests = [json.loads((folder / "generation.json").read_text()) for folder in (one, two)]
    assert manifests[1]["status"] == "complete"
    assert _without(manifests[0], "created", "updated") == _without(manifests[1], "created", "updated")


def _generated_copies(workspace: Path, rigged) -> None:
    """Two finished generated runs of hummingbird whose images are copies of the rigged data set's images."""
    for run, indices in {"run-a": [0, 1, 2, 3], "run-b": [4, 5, 6, 7]}.items():
        folder = workspace / "generated" / "94-hummingbird" / run
        folder.mkdir(parents=True)
        for n, i in enumerate(indices):
            shutil.copyfile(rigged.files[94][i], folder / f"{n:05d}.png")
        (folder / "generation.json").write_text(json.dumps({"stage": "generate", "status": "complete",
                                                            "num_images": len(indices), "images": []}))


def test_evaluate_with_two_processes_reports_the_same_numbers_as_one(rigged, tmp_path):
    for name in ("one", "two"):
        _generated_copies(tmp_path / name, rigged)
    args = [
        "evaluate",
        "--dataset",
        str(rigged.dataset),
        "--classes",
        "hummingbird",
        "--no-refs",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--classifiers",
        "res-a,conv-b,vit-c",
        *[f"--classifier={f}" for f in rigged.flags.values()],
    ]
    single = _spurgen(*args, "-w", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr
    double = accelerate_launch(*args, "-w", str(tmp_path / "two"))
    assert double.returncode == 0, double.stderr[-3000:]
    # the tables are printed once, by the main process
    assert double.stdout.count("Table 1") == single.stdout.count("Table 1") == 1
    reports = [tmp_path / name / "reports" for name in ("one", "two")]
    assert sorted(p.name for p in reports[1].iterdir()) == sorted(p.name for p in reports[0].iterdir())
    assert (reports[0] / "evaluation.csv").read_text() == (reports[1] / "evaluation.csv").read_text()
    one, two = (json.loads((folder / "evaluation.json").read_text().replace(str(folder.parent), "WS"))
                for folder in reports)
    for key in ("results", "means", "images", "sources", "classes"):
        assert_same_results(one[key], two[key], key)


def test_run_with_two_processes_takes_every_class_through_every_stage(tiny_sd_dir, rigged, tmp_path):
    settings = f"""\
model = "{tiny_sd_dir}"
device = "cpu"
[select-refs]
dataset = "{rigged.dataset}"
classifiers = ["res-a", "conv-b"]
k = 2
num-workers = 0
[finetune]
steps = 2
rank = 4
prior-preservation = false
num-validation-images = 0
validation-steps = 0
checkpointing-steps = 0
[generate]
num-images = 3
steps = 2
[evaluate]
classifiers = ["res-a", "conv-b"]
num-workers = 0
"""
    args = ["run", "--classes", "hummingbird,koala", "--presets", "dreambooth",
            *[f"--classifier={rigged.flags[name]}" for name in ("res-a", "conv-b")]]
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "spurgen.toml").write_text(settings)
    single = _spurgen(*args, "-w", str(tmp_path / "one"))
    assert single.returncode == 0, single.stderr[-3000:]
    double = accelerate_launch(*args, "-w", str(tmp_path / "two"))
    assert double.returncode == 0, double.stderr[-3000:]
    runs = [json.loads((tmp_path / name / "run.json").read_text()) for name in ("one", "two")]
    assert [entry["stages"] for entry in runs[0]["classes"]] == [entry["stages"] for entry in runs[1]["classes"]]
    assert runs[1]["classes"][0]["stages"] == {"select-refs": "ran", "finetune/dreambooth": "trained",
                                               "generate/dreambooth": "ran"}
    for folder in ("94-hummingbird", "105-koala"):
        one = _selection_without_timestamps(tmp_path / "one" / "refs" / folder / "selection.json")
        two = _selection_without_timestamps(tmp_path / "two" / "refs" / folder / "selection.json")
        assert_same_results(one, two)
        generation = json.loads(
            (tmp_path / "two" / "generated" / folder / "dreambooth" / "generation.json").read_text()
        )
        assert generation["status"] == "complete" and len(generation["images"]) == 3
    evaluation = json.loads((tmp_path / "two" / "reports" / "evaluation.json").read_text())
    assert evaluation["settings"]["classes"] == [94, 105]


@pytest.mark.parametrize("model, family, extra", [("tiny_sdxl_dir", "sdxl", []),
                                                  ("tiny_flux_dir", "flux", ["--resolution", "64"])])
def test_finetune_with_two_processes_trains_one_lora_plain_diffusers_loads(model, family, extra, request, rigged,
                                                                           tmp_path):
    from test_finetune import write_refs

    from spurgen.families import get_family

    base = request.getfixturevalue(model)
    workspace = write_refs(tmp_path)
    done = accelerate_launch("finetune", "-w", str(workspace.root), "--classes", "94", "--model", str(base),
                             "--steps", "2", "--num-class-images", "2", "--sample-steps", "2",
                             "--num-validation-images", "0", "--rank", "4", "--sfsl-model", "res-a",
                             f"--classifier={rigged.flags['res-a']}", "--sfsl-max-timestep", "999", "--sfsl-every", "1",
                             *extra)
    assert done.returncode == 0, done.stderr[-3000:]
    folder = tmp_path / "models" / "94-hummingbird" / "sfsl"
    info = json.loads((folder / "training.json").read_text())
    assert (info["status"], info["family"], info["distributed"]["processes"]) == ("complete", family, 2)
    assert info["loss"]["sfsl_rows"] == 4  # 2 steps x 2 processes x 1 row
    get_family(family).pipeline_class().from_pretrained(base).load_lora_weights(folder)
