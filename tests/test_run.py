"""`spurgen run` over 20 classes of a generated Spurious-ImageNet-layout folder with tiny models.

One tiny timm classifier is solved so that it predicts every image's own class; the tiny Stable Diffusion trains
2 steps per class. The run is killed once the first class's model is finished and restarted: the restart redoes
nothing that was complete (run.json says what ran; manifests keep their times), and the memory of the process
tree, recorded in run.json after each class, does not grow with the number of classes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spurgen.cli import app
from spurgen.labels import get_label_set

from conftest import _noise_image

CLASSES = get_label_set("imagenet").resolve_many(["all"])[:20]
MISSING = get_label_set("imagenet").resolve_many(["all"])[20]  # requested, but the data set has no folder for it
IMAGES_PER_CLASS = 2
ARCH = "test_resnet.r160_in1k"


def _classifier(dataset: Path, path: Path) -> None:
    """A tiny timm classifier whose last layer is solved to predict each image's class (logit 5, others -5)."""
    import timm
    import torch
    from safetensors.torch import save_file
    from timm.data import resolve_data_config

    from spurgen.classifiers import Classifier, ClassifierSpec
    from spurgen.images import load_rgb

    torch.manual_seed(0)
    model = timm.create_model(ARCH, pretrained=False).eval()
    wrapper = Classifier(ClassifierSpec("tiny", ARCH), model, resolve_data_config(model=model, use_test_size=True))
    files = sorted(dataset.glob("*/*.png"))
    transform = wrapper.transform()
    with torch.no_grad():
        features = wrapper.penultimate(torch.stack([transform(load_rgb(f)) for f in files])).double()
    target = torch.full((len(files), model.num_classes), -5.0, dtype=torch.float64)
    for row, file in enumerate(files):
        target[row, int(file.parent.name.split("_")[2])] = 5.0
    design = torch.cat([features, torch.ones(len(files), 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, target).solution
    head = model.get_classifier()
    head.weight.data = solution[:-1].T.float().contiguous()
    head.bias.data = solution[-1].float().contiguous()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))


@pytest.fixture(scope="module")
def setup(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A workspace whose spurgen.toml sets up every stage small; returns it and the --classifier flag."""
    root = tmp_path_factory.mktemp("run")
    dataset = root / "images"
    for cls in CLASSES:
        folder = dataset / f"spurious_imagenet_{cls.index}_{cls.slug}_0"
        folder.mkdir(parents=True)
        for i in range(IMAGES_PER_CLASS):
            _noise_image(cls.index * 10 + i).save(folder / f"{cls.slug}_{i}.png")
    weights = root / "tiny.safetensors"
    _classifier(dataset, weights)
    workspace = root / "ws"
    workspace.mkdir()
    (workspace / "spurgen.toml").write_text(f"""\
model = "{tiny_sd_dir}"
device = "cpu"

[run]
presets = ["dreambooth"]

[select-refs]
dataset = "{dataset}"
classifiers = ["tiny"]
k = 1
num-workers = 0

[finetune]
steps = 2
rank = 4
prior-preservation = false
num-validation-images = 0
validation-steps = 0
checkpointing-steps = 1

[generate]
num-images = 1
steps = 2

[evaluate]
classifiers = ["tiny"]
num-workers = 0
report-images = 1
""")
    return workspace, f"tiny={ARCH}@{weights}"


def _command(workspace: Path, classifier: str, *extra: str) -> list[str]:
    classes = ",".join(str(c.index) for c in [*CLASSES[:10], MISSING, *CLASSES[10:]])
    return [sys.executable, "-m", "spurgen", "run", "-w", str(workspace), "--classes", classes,
            f"--classifier={classifier}", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def finished(setup: tuple[Path, str]) -> tuple[Path, dict, dict[str, float]]:
    """Runs `spurgen run`, kills it once the first class's model is complete, and runs it again to the end.

    Returns the workspace, run.json of the restart, and the times of the first class's manifests at the kill.
    """
    workspace, classifier = setup
    first_model = workspace / "models" / CLASSES[0].dirname / "dreambooth" / "training.json"
    process = subprocess.Popen(_command(workspace, classifier), env=_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (first_model.is_file() and json.loads(first_model.read_text())["status"] == "complete"):
        assert process.poll() is None and time.monotonic() < deadline, "the first class never finished training"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first_refs = workspace / "refs" / CLASSES[0].dirname / "selection.json"
    manifests = {str(p): p.stat().st_mtime_ns for p in (first_model, first_refs)}
    restart = subprocess.run(_command(workspace, classifier), env=_env(), capture_output=True, text=True, timeout=600,
                             check=False)
    assert restart.returncode == 1, restart.stderr[-3000:]  # the class without images failed, the others finished
    assert f"failed: {MISSING}" in restart.stderr
    return workspace, json.loads((workspace / "run.json").read_text()), manifests


def test_every_class_completes_and_the_failing_one_is_reported(finished) -> None:
    workspace, summary, _ = finished
    assert list(summary["failures"]) == [str(MISSING)]
    for cls in CLASSES:
        generation = json.loads((workspace / "generated" / cls.dirname / "dreambooth" / "generation.json").read_text())
        assert generation["status"] == "complete"
    evaluation = json.loads((workspace / "reports" / "evaluation.json").read_text())
    assert sorted(evaluation["settings"]["classes"]) == sorted(c.index for c in CLASSES)
    assert (workspace / "reports" / "report.html").is_file()


def test_the_restart_redoes_nothing_that_was_complete(finished) -> None:
    _, summary, manifests = finished
    first = next(entry for entry in summary["classes"] if entry["class"] == CLASSES[0].index)
    assert first["stages"]["select-refs"] == "skipped"
    assert first["stages"]["finetune/dreambooth"] == "skipped"
    for path, mtime in manifests.items():
        assert Path(path).stat().st_mtime_ns == mtime, path
    later = [entry for entry in summary["classes"] if entry["class"] in {c.index for c in CLASSES[2:]}]
    assert all(entry["stages"] == {"select-refs": "ran", "finetune/dreambooth": "trained", "generate/dreambooth": "ran"}
               for entry in later)


def test_memory_does_not_grow_with_the_number_of_classes(finished) -> None:
    _, summary, _ = finished
    rss = [entry["rss_mb"] for entry in summary["classes"] if "stages" in entry]
    assert len(rss) == len(CLASSES)
    # After the third class every model has been loaded once; a class's models left behind would add up.
    assert max(rss[3:]) - rss[2] < 64, rss


def test_dry_run_prints_the_plan_of_a_grid(finished, setup) -> None:
    workspace, _ = setup
    classes = f"{CLASSES[0].index},{CLASSES[1].index}"
    result = CliRunner().invoke(app, ["run", "-w", str(workspace), "--classes", classes, "--presets", "dreambooth,sfsl",
                                      "--sfsl-weight", "0.05,0.1", "--dry-run"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "finetune sfsl-k0.05" in result.output and "generate sfsl-k0.1" in result.output
    row = next(line for line in result.output.splitlines() if CLASSES[0].name in line)
    assert row.count("skip (complete)") == 3 and row.count("will run") == 4
    assert "evaluate (every class): will run" in result.output
