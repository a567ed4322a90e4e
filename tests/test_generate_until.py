"""generate --until N --filter ...: over-generation with the tiny SD, a rigged classifier and a tiny open_clip model.

The classifier is conftest's rigged 'res-a', loaded and cached as usual, whose forward pass is replaced so that it
predicts hummingbird exactly when its [0, 1] input is brighter in the top half than in the bottom half by more than a
threshold. The threshold is the median of that statistic over the first images of the seed sequence, so half of them
pass, in no particular order, and the test knows in advance which image indices pass: every count below is exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from spurgen.cli import app
from spurgen.classifiers import Classifier, builtin_classifiers, load_classifier, parse_classifier
from spurgen.config import GenerateConfig, resolve_config
from spurgen.errors import SpurgenError
from spurgen.generate import generate
from spurgen.images import load_rgb
from spurgen.labels import get_label_set
from spurgen.workspace import Workspace

from _crash import spurgen_env

HUMMINGBIRD = get_label_set("imagenet")[94]
POOL = 12  # the images of the seed sequence the tests look at


def _config(tiny_sd_dir: Path, **overrides: object) -> GenerateConfig:
    values = {"classes": ["hummingbird"], "base": True, "model": str(tiny_sd_dir), "steps": 2, "scheduler": "DDIM",
              "device": "cpu", "batch_size": 2, "classifiers": ["res-a"]}
    return resolve_config(GenerateConfig, {}, "generate", {**values, **overrides})


def _manifest(ws: Workspace) -> dict:
    return json.loads((ws.generated_dir(HUMMINGBIRD, "base") / "generation.json").read_text())


@pytest.fixture(scope="module")
def pool(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Images 0..POOL-1 of the seed sequence, made by plain generate."""
    ws = Workspace(tmp_path_factory.mktemp("pool"))
    generate(_config(tiny_sd_dir, num_images=POOL), ws)
    return [ws.generated_dir(HUMMINGBIRD, "base") / f"{i:05d}.png" for i in range(POOL)]


def _statistic(images: torch.Tensor) -> torch.Tensor:
    """[images]: mean of the top half minus mean of the bottom half."""
    half = images.shape[2] // 2
    return images[:, :, :half].mean(dim=(1, 2, 3)) - images[:, :, half:].mean(dim=(1, 2, 3))


class RiggedForward:
    """Classifier.logits replaced: hummingbird (over 0 for every other class) iff the statistic > threshold."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.images = 0  # images that reached the forward pass (not the cache)

    def __call__(self, classifier: Classifier, images: torch.Tensor) -> torch.Tensor:
        self.images += len(images)
        logits = torch.zeros(len(images), classifier.num_classes)
        logits[:, HUMMINGBIRD.index] = _statistic(images) - self.threshold
        return logits


@pytest.fixture()
def rigged_forward(
    rigged, pool: list[Path], monkeypatch: pytest.MonkeyPatch
) -> tuple[RiggedForward, list[bool], list[str]]:
    """The rigged forward pass, which pool images pass, and the classifier flags."""
    spec = parse_classifier(rigged.flags["res-a"], builtin_classifiers("imagenet"))
    transform = load_classifier(spec).transform()
    statistic = _statistic(torch.stack([transform(load_rgb(p)) for p in pool])).numpy()
    threshold = float(np.median(statistic))
    forward = RiggedForward(threshold)
    monkeypatch.setattr(Classifier, "logits", lambda self, images: forward(self, images))
    return forward, [bool(x) for x in statistic > threshold], [rigged.flags["res-a"]]


def _stop(passes: list[bool], wanted: int) -> int:
    """Images made when sampling until ``wanted`` pass: up to and including the wanted-th passing index."""
    return [i for i, ok in enumerate(passes) if ok][wanted - 1] + 1


def _same_image(a: Path, b: Path) -> bool:
    # Batched and single forwards differ in the last float bits, which can move a pixel by one level.
    return bool(np.abs(np.asarray(load_rgb(a), np.int16) - np.asarray(load_rgb(b), np.int16)).max() <= 1)


def test_stops_at_exactly_n_accepted_and_records_every_verdict(rigged_forward, pool: list[Path], tiny_sd_dir: Path,
                                                               tmp_path: Path) -> None:
    forward, passes, flags = rigged_forward
    ws = Workspace(tmp_path)
    made = _stop(passes, 3)
    assert not all(passes[:made])  # some images are rejected on the way
    [result] = generate(_config(tiny_sd_dir, until=3, filter=["consistent"], max_images=POOL), ws, flags)
    assert (result.made, result.existing, result.total, result.accepted) == (made, 0, made, 3)
    manifest = _manifest(ws)
    assert manifest["status"] == "complete" and manifest["num_images"] == made
    assert [e["accepted"] for e in manifest["images"]] == passes[:made]
    for entry in manifest["images"]:
        assert entry["seed"] == entry["index"] and "sha256" in entry
        assert bool(entry["reasons"]) != entry["accepted"]
        assert all(r.startswith("not consistent: res-a predicts ") for r in entry["reasons"])
        assert _same_image(ws.generated_dir(HUMMINGBIRD, "base") / entry["file"], pool[entry["index"]])
    over = manifest["over_generation"]
    assert (over["until"], over["max_images"], over["judged"], over["accepted"]) == (3, POOL, made, 3)
    assert over["acceptance_rate"] == pytest.approx(3 / made) and over["filters"] == ["consistent"]
    assert [c["name"] for c in over["classifiers"]] == ["res-a"]
    assert forward.images == made  # each image classified once


def test_max_images_ends_the_run_with_fewer_accepted(rigged_forward, tiny_sd_dir: Path, tmp_path: Path) -> None:
    _, passes, flags = rigged_forward
    limit = 4
    wanted = sum(passes[:limit]) + 1  # more than the first `limit` images can give
    [result] = generate(
        _config(tiny_sd_dir, until=wanted, filter=["consistent"], max_images=limit), Workspace(tmp_path), flags
    )
    assert (result.made, result.total, result.accepted) == (limit, limit, wanted - 1)
    manifest = _manifest(Workspace(tmp_path))
    assert manifest["status"] == "complete" and len(manifest["images"]) == limit
    assert manifest["over_generation"]["acceptance_rate"] == pytest.approx((wanted - 1) / limit)


def test_a_rerun_after_a_stop_continues_without_judging_again(rigged_forward, tiny_sd_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    forward, passes, flags = rigged_forward
    ws = Workspace(tmp_path)
    made = _stop(passes, 3)
    first = made - 2
    generate(_config(tiny_sd_dir, until=3, filter=["consistent"], max_images=first), ws, flags)
    assert forward.images == first
    # an interrupted run (Ctrl-C after one more image) keeps its images and resumes from them
    import spurgen.generate.sampling as generate_module

    real_write, written = generate_module.atomic_write_bytes, []

    def interrupt_after_one(path: Path, data: bytes) -> None:
        if written:
            raise KeyboardInterrupt
        written.append(path)
        real_write(path, data)

    monkeypatch.setattr(generate_module, "atomic_write_bytes", interrupt_after_one)
    with pytest.raises(KeyboardInterrupt):
        generate(_config(tiny_sd_dir, until=3, filter=["consistent"], max_images=POOL), ws, flags)
    assert _manifest(ws)["status"] == "incomplete" and len(written) == 1
    monkeypatch.setattr(generate_module, "atomic_write_bytes", real_write)
    classified = forward.images
    [result] = generate(_config(tiny_sd_dir, until=3, filter=["consistent"], max_images=POOL), ws, flags)
    assert (result.existing, result.made, result.accepted) == (first + 1, made - first - 1, 3)
    # the resumed run judged the images already there from the prediction cache: no forward pass for them
    assert forward.images - classified == made - first - 1
    assert [e["accepted"] for e in _manifest(ws)["images"]] == passes[:made]


def test_bad_until_settings_are_one_line_errors(tiny_sd_dir: Path) -> None:
    for overrides, message in (({"until": 3}, "--until needs --filter"),
                               ({"filter": ["consistent"]}, "need --until N"),
                               ({"until": 3, "filter": ["consistent"], "max_images": 2}, "must be at least --until"),
                               ({"until": 3, "filter": ["sharp"]}, "unknown --filter 'sharp'"),
                               ({"until": 3, "filter": ["no-object"]}, "needs an open_clip model"),
                               ({"until": 3, "filter": ["no-object"], "clip_model": "ViT-B-32"}, "needs "
                                                                                                 "--clip-weights")):
        with pytest.raises(SpurgenError, match=message):
            _config(tiny_sd_dir, **overrides)


# --- the zero-shot no-object filter ------------------------------------------------------------------------------

TINY_CLIP = {"embed_dim": 16,
             "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """An open_clip architecture registered from a config file, and random weights saved as a state dict."""
    import open_clip

    folder = tmp_path_factory.mktemp("clip")
    (folder / "spurgen-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder / "spurgen-tiny-clip.json")
    torch.manual_seed(0)
    model = open_clip.create_model("spurgen-tiny-clip")
    torch.save(model.state_dict(), folder / "weights.pt")
    return "spurgen-tiny-clip", folder / "weights.pt"


def _clip_margins(arch: str, weights: Path, files: list[Path]) -> np.ndarray:
    """Class prompt logit minus feature prompt logit per image, computed here from the saved weights."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(arch)
    model.load_state_dict(torch.load(weights, weights_only=True))
    tokenizer = open_clip.get_tokenizer(arch)
    prompts = [f"a photo of a {HUMMINGBIRD.name}", f"a photo of {HUMMINGBIRD.spurious_feature}"]
    with torch.no_grad():
        text = model.encode_text(tokenizer(prompts))
        image = model.encode_image(torch.stack([preprocess(load_rgb(f)) for f in files]))
        text, image = text / text.norm(dim=-1, keepdim=True), image / image.norm(dim=-1, keepdim=True)
        logits = (model.logit_scale.exp() * image @ text.T).numpy()
    return logits[:, 0] - logits[:, 1]


def test_no_object_rejects_images_the_class_prompt_wins(tiny_clip, pool: list[Path], tiny_sd_dir: Path,
                                                        tmp_path: Path) -> None:
    arch, weights = tiny_clip
    margins = _clip_margins(arch, weights, pool)
    margin = float(np.median(margins))
    passes = [bool(x) for x in margins <= margin]
    made = _stop(passes, 2)
    assert not all(passes[:made])  # some images are rejected on the way
    ws = Workspace(tmp_path)
    [result] = generate(_config(tiny_sd_dir, until=2, filter=["no-object"], max_images=POOL, clip_model=arch,
                                clip_weights=str(weights), clip_margin=margin), ws)
    assert (result.made, result.accepted) == (made, 2)
    manifest = _manifest(ws)
    assert [e["accepted"] for e in manifest["images"]] == passes[:made]
    for entry, expected in zip(manifest["images"], margins):
        if not entry["accepted"]:
            reason = (f"object: CLIP scores 'a photo of a hummingbird' {expected:.2f} above "
                      f"'a photo of {HUMMINGBIRD.spurious_feature}'")
            assert entry["reasons"] == [reason]
    assert manifest["over_generation"]["clip"]["margin"] == margin


def test_cli_reports_the_acceptance_rate(rigged_forward, tiny_sd_dir: Path, tmp_path: Path) -> None:
    _, passes, flags = rigged_forward
    made = _stop(passes, 2)
    result = CliRunner().invoke(app, [
        "generate", "-w", str(tmp_path), "--classes", "hummingbird", "--base", "--model", str(tiny_sd_dir),
        "--steps", "2", "--scheduler", "DDIM", "--device", "cpu", "--until", "2", "--filter", "consistent",
        "--max-images", str(POOL), "--classifiers", "res-a", f"--classifier={flags[0]}"])
    assert result.exit_code == 0, result.output
    assert "accepted" in result.output and f"2 ({2 / made:.0%})" in result.output
    assert f"2 of {made} images passed --filter consistent (acceptance rate {2 / made:.0%})" in result.output


@pytest.mark.slow  # three processes, one killed: CI runs it, make test-fast does not
def test_sigkill_in_the_middle_then_rerun_equals_an_uninterrupted_run(
    rigged, tiny_sd_dir: Path, tmp_path: Path
) -> None:
    """A real process killed with SIGKILL mid-run: the re-run ends with the same images and verdicts as one run."""
    import signal
    import subprocess
    import sys
    import time

    def command(workspace: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "spurgen",
            "generate",
            "-w",
            str(workspace),
            "--base",
            "--model",
            str(tiny_sd_dir),
            "--classes",
            "hummingbird",
            "--until",
            "3",
            "--filter",
            "consistent",
            "--max-images",
            "8",
            "--classifiers",
            "res-a",
            "--classifier",
            rigged.flags["res-a"],
            "--steps",
            "2",
            "--scheduler",
            "DDIM",
            "--batch-size",
            "1",
            "--device",
            "cpu",
        ]

    env = spurgen_env()
    reference = subprocess.run(command(tmp_path / "reference"), capture_output=True, text=True, timeout=600, env=env)
    assert reference.returncode == 0, reference.stderr
    killed_ws = tmp_path / "killed"
    folder = Workspace(killed_ws).generated_dir(HUMMINGBIRD, "base")
    process = subprocess.Popen(command(killed_ws), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(list(folder.glob("*.png"))) < 2 and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "the run finished before it could be killed"
    for png in folder.glob("*.png"):  # whatever is visible under a final name is a whole image
        load_rgb(png)
    rerun = subprocess.run(command(killed_ws), capture_output=True, text=True, timeout=600, env=env)
    assert rerun.returncode == 0, rerun.stderr

    def outcome(workspace: Path) -> dict:
        manifest = _manifest(Workspace(workspace))
        files = {p.name: p.read_bytes() for p in Workspace(workspace).generated_dir(HUMMINGBIRD, "base").glob("*.png")}
        verdicts = {e["file"]: (e.get("accepted"), tuple(e.get("reasons", ()))) for e in manifest["images"]}
        return {"files": files, "verdicts": verdicts, "accepted": manifest["over_generation"]["accepted"]}

    assert outcome(killed_ws) == outcome(tmp_path / "reference")
