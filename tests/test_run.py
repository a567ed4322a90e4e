"""`spurgen run` over 20 classes of a generated Spurious-ImageNet-layout folder with tiny models.

One tiny timm classifier is solved so that it predicts every image's own class; the tiny Stable Diffusion trains
2 steps per class. The run is killed once the first class's model is finished and restarted: the restart redoes
nothing that was complete (run.json says what ran; manifests keep their times), and the memory of the process
tree, recorded in run.json after each class, does not grow with the number of classes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from spurgen.cli import app
from spurgen.labels import get_label_set

from _crash import spurgen_env
from conftest import small_settings, solved_classifier, spurious_folder

CLASSES = get_label_set("imagenet").resolve_many(["all"])[:20]
MISSING = get_label_set("imagenet").resolve_many(["all"])[20]  # requested, but the data set has no folder for it
IMAGES_PER_CLASS = 2


@pytest.fixture(scope="module")
def setup(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A workspace whose spurgen.toml sets up every stage small; returns it and the --classifier flag."""
    root = tmp_path_factory.mktemp("run")
    dataset = root / "images"
    spurious_folder(dataset, CLASSES, IMAGES_PER_CLASS)
    classifier = solved_classifier(dataset, root / "tiny.safetensors")
    workspace = root / "ws"
    workspace.mkdir()
    (workspace / "spurgen.toml").write_text(small_settings(tiny_sd_dir, dataset))
    return workspace, classifier


def _command(workspace: Path, classifier: str, *extra: str) -> list[str]:
    classes = ",".join(str(c.index) for c in [*CLASSES[:10], MISSING, *CLASSES[10:]])
    return [sys.executable, "-m", "spurgen", "run", "-w", str(workspace), "--classes", classes,
            f"--classifier={classifier}", *extra]


# The tests marked slow below read one 20-class `spurgen run`, killed and restarted (about a minute): CI runs them,
# make test-fast does not.
@pytest.fixture(scope="module")
def finished(setup: tuple[Path, str]) -> tuple[Path, dict, dict[str, float]]:
    """Runs `spurgen run`, kills it once the first class's model is complete, and runs it again to the end.

    Returns the workspace, run.json of the restart, and the times of the first class's manifests at the kill.
    """
    workspace, classifier = setup
    first_model = workspace / "models" / CLASSES[0].dirname / "dreambooth" / "training.json"
    process = subprocess.Popen(_command(workspace, classifier), env=spurgen_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (first_model.is_file() and json.loads(first_model.read_text())["status"] == "complete"):
        assert process.poll() is None and time.monotonic() < deadline, "the first class never finished training"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first_refs = workspace / "refs" / CLASSES[0].dirname / "selection.json"
    manifests = {str(p): p.stat().st_mtime_ns for p in (first_model, first_refs)}
    restart = subprocess.run(
        _command(workspace, classifier), env=spurgen_env(), capture_output=True, text=True, timeout=600, check=False
    )
    assert restart.returncode == 1, restart.stderr[-3000:]  # the class without images failed, the others finished
    assert f"failed: {MISSING}" in restart.stderr
    return workspace, json.loads((workspace / "run.json").read_text()), manifests


@pytest.mark.slow
def test_every_class_completes_and_the_failing_one_is_reported(finished) -> None:
    workspace, summary, _ = finished
    assert list(summary["failures"]) == [str(MISSING)]
    for cls in CLASSES:
        generation = json.loads((workspace / "generated" / cls.dirname / "dreambooth" / "generation.json").read_text())
        assert generation["status"] == "complete"
    evaluation = json.loads((workspace / "reports" / "evaluation.json").read_text())
    assert sorted(evaluation["settings"]["classes"]) == sorted(c.index for c in CLASSES)
    assert (workspace / "reports" / "report.html").is_file()


@pytest.mark.slow
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


@pytest.mark.slow
def test_memory_does_not_grow_with_the_number_of_classes(finished) -> None:
    _, summary, _ = finished
    rss = [entry["rss_mb"] for entry in summary["classes"] if "stages" in entry]
    assert len(rss) == len(CLASSES)
    # After the third class every model has been loaded once; a class's models left behind would add up.
    assert max(rss[3:]) - rss[2] < 64, rss


@pytest.mark.slow
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


def test_the_paper_example_settings_resolve_for_every_stage(tmp_path: Path) -> None:
    import shutil

    from spurgen.config import EvaluateConfig, FinetuneConfig, GenerateConfig, SelectRefsConfig, resolve_config
    from spurgen.workspace import Workspace

    shutil.copy(Path(__file__).parents[1] / "examples" / "paper.toml", tmp_path / "spurgen.toml")
    settings = Workspace(tmp_path).settings()
    for config_class, stage in ((SelectRefsConfig, "select-refs"), (FinetuneConfig, "finetune"),
                                (GenerateConfig, "generate"), (EvaluateConfig, "evaluate")):
        resolve_config(config_class, settings, stage, {"classes": ["hummingbird"]})
    finetune = resolve_config(FinetuneConfig, settings, "finetune", {"classes": ["hummingbird"]})
    assert finetune.sfsl_every == 1  # the paper's schedule (also spurgen's default)
    assert finetune.sfsl_row_weighting == "none"  # Eq. 6 as written
    assert finetune.model == "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.mark.parametrize("family, guidance, sampler", [("sd", 7.5, "DPM-Solver++"), ("flux", 3.5, "model")])
def test_the_skip_check_reads_an_unset_guidance_and_sampler_as_the_runs_family(
        family: str, guidance: float, sampler: str, tmp_path: Path) -> None:
    from spurgen.config import GenerateConfig, resolve_config
    from spurgen.run import RESUME, SKIP, _generation_action

    model, images = tmp_path / "model", tmp_path / "images"
    for folder, record in ((model, {"family": family}),
                           (images, {"status": "complete", "num_images": 1, "settings": {
                               "steps": 2, "guidance": guidance, "scheduler": sampler, "seed": 0}})):
        folder.mkdir()
        (folder / ("training.json" if folder == model else "generation.json")).write_text(json.dumps(record))

    def action(**settings: object) -> str:
        config = resolve_config(GenerateConfig, {}, "generate", {"num_images": 1, "steps": 2, **settings})
        return _generation_action(config, images, model)

    assert action() == action(guidance=guidance, scheduler=sampler.lower()) == SKIP
    assert action(scheduler="Euler") == action(guidance=1.0) == RESUME  # generate then refuses or remakes them


def test_run_trains_the_model_the_stage_commands_train(tiny_sd_dir: Path, tmp_path: Path) -> None:
    """`spurgen run` and select-refs + finetune with the same settings train the same LoRA, tensor for tensor, and
    record the same settings.

    The solved classifier scores a class's images alike (logit 5): which one becomes the reference is decided in the
    predictions' last float digits, which depend on the images batched together (with 2 threads here). select-refs
    over both classes used to batch them together where `spurgen run` selects one class at a time, and picked
    another reference for the second class: LoRAs ~6e-4 apart."""
    import torch
    from safetensors.torch import load_file

    classes = CLASSES[:2]
    spurious_folder(tmp_path / "images", classes, IMAGES_PER_CLASS)
    classifier = solved_classifier(tmp_path / "images", tmp_path / "tiny.safetensors")
    flags = ["--classes", ",".join(str(c.index) for c in classes), f"--classifier={classifier}"]
    stages, whole = tmp_path / "stages", tmp_path / "run"
    for workspace in (stages, whole):
        workspace.mkdir()
        (workspace / "spurgen.toml").write_text(small_settings(tiny_sd_dir, tmp_path / "images"))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for args in (["select-refs"], ["finetune", "--preset", "dreambooth", "--resume"]):
            result = CliRunner().invoke(app, [*args, "-w", str(stages), *flags])
            assert result.exit_code == 0, result.output
        result = CliRunner().invoke(app, ["run", "-w", str(whole), *flags])
        assert result.exit_code == 0, result.output
    finally:
        torch.set_num_threads(threads)
    for cls in classes:
        run = Path("models") / cls.dirname / "dreambooth"
        trained = [json.loads((workspace / run / "training.json").read_text()) for workspace in (stages, whole)]
        assert trained[0]["settings"] == trained[1]["settings"]
        assert [r["sha256"] for r in trained[0]["references"]] == [r["sha256"] for r in trained[1]["references"]]
        loras = [load_file(str(workspace / run / "pytorch_lora_weights.safetensors")) for workspace in (stages, whole)]
        assert sorted(loras[0]) == sorted(loras[1])
        assert all(torch.equal(loras[0][name], loras[1][name]) for name in loras[0]), cls
