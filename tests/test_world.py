"""The synthetic world: rendering, the folder it is written to, its label set and its classifiers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from spurgen.images import SpuriousImageNetFolder, list_images
from spurgen.labels import get_label_set
from spurgen.world.dataset import CAPTIONS_FILE, WorldConfig, build_world, load_split, spurious_set
from spurgen.world.render import FEATURES, NONE, SHAPES, render

TINY = {"train_size": 24, "val_size": 12, "spurious_per_class": 3, "features_per_class": 2}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_world(WorldConfig(**TINY), tmp_path_factory.mktemp("world") / "world")


@pytest.mark.parametrize("size", [32, 64])
def test_render_is_seeded(size: int) -> None:
    objects = np.array([0, 1, 2, 3, 4, 5, NONE, 2])
    backgrounds = np.array([NONE, 0, 1, 2, 3, 4, 5, NONE])
    first = render(objects, backgrounds, np.random.default_rng(7), size)
    assert first.shape == (8, size, size, 3) and first.dtype == np.uint8
    assert first.tobytes() == render(objects, backgrounds, np.random.default_rng(7), size).tobytes()
    assert first.tobytes() != render(objects, backgrounds, np.random.default_rng(8), size).tobytes()


def test_render_draws_the_object_over_the_texture() -> None:
    backgrounds = np.zeros(4, dtype=np.int64)
    with_object = render(np.zeros(4, dtype=np.int64), backgrounds, np.random.default_rng(0), class_colour_prob=1.0)
    without = render(np.full(4, NONE), backgrounds, np.random.default_rng(0), class_colour_prob=1.0)
    # Same background stream, so only the object's pixels differ: a sizeable disc, not the whole frame.
    changed = (np.abs(with_object.astype(int) - without.astype(int)).max(axis=3) > 40).mean(axis=(1, 2))
    assert np.all((changed > 0.1) & (changed < 0.6))


def test_world_build_is_byte_identical_per_seed(world: Path, tmp_path: Path) -> None:
    files = _files(world)
    assert files == _files(build_world(WorldConfig(**TINY), tmp_path / "again"))
    other = _files(build_world(WorldConfig(seed=1, **TINY), tmp_path / "other"))
    images = {data for name, data in files.items() if name.endswith(".png")}
    assert not images & {data for name, data in other.items() if name.endswith(".png")}


def test_spurious_set_follows_spurious_imagenet_layout(world: Path) -> None:
    images = world / "spurious" / "images"
    assert (images / "timestamp.txt").is_file()
    folder = SpuriousImageNetFolder(images)
    assert sorted(folder.folders) == list(range(len(SHAPES)))
    for index, entries in folder.folders.items():
        (entry,) = entries
        fields = entry.path.name.split("_")
        # method.md section 4: the third field is the class index, the last the component index.
        assert len(fields) == 5 and int(fields[2]) == index and fields[-1] == "0"
        assert len(folder.class_images(index)) == TINY["spurious_per_class"]
    pixels, labels = spurious_set(world)
    assert pixels.shape == (len(SHAPES) * TINY["spurious_per_class"], 32, 32, 3)
    assert labels.tolist() == sorted(labels.tolist())


def test_every_image_has_a_caption_of_its_kind(world: Path) -> None:
    rows = [json.loads(line) for line in (world / CAPTIONS_FILE).read_text(encoding="utf-8").splitlines()]
    pngs = {p.relative_to(world).as_posix() for p in world.rglob("*.png")}
    assert {row["file"] for row in rows} == pngs and len(rows) == len(pngs)
    assert {row["kind"] for row in rows} == {"object", "feature", "object_on_feature"}
    labels = get_label_set("world")
    for row in rows:
        info = labels[row["label"]]
        if row["kind"] == "feature":
            assert row["caption"] in {f"a photo of {feature}" for feature in FEATURES}
            assert row["caption"] == f"a photo of {info.spurious_feature}"
        elif row["kind"] == "object":
            assert row["caption"] == f"a photo of a {info.name}"
        else:
            assert row["caption"].startswith(f"a photo of a {info.name} on ")
    spurious = [row for row in rows if row["split"] == "spurious"]
    assert len(spurious) == len(SHAPES) * TINY["spurious_per_class"]
    assert all(row["kind"] == "feature" for row in spurious)


def test_splits_load_with_labels_matching_folders(world: Path) -> None:
    images, labels = load_split(world, "train")
    assert images.shape == (TINY["train_size"], 32, 32, 3) and labels.shape == (TINY["train_size"],)
    for info in get_label_set("world").classes.values():
        assert len(list_images(world / "train" / info.dirname)) == int((labels == info.index).sum())


def test_training_split_is_biased_and_validation_is_not(tmp_path: Path) -> None:
    root = build_world(WorldConfig(train_size=1200, val_size=1200, spurious_per_class=0, features_per_class=0),
                       tmp_path / "world")
    labels = get_label_set("world")
    own: dict[str, list[bool]] = {"train": [], "val": []}
    for line in (root / CAPTIONS_FILE).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        info = labels[row["label"]]
        own[row["split"]].append(row["caption"] == f"a photo of a {info.name} on {info.spurious_feature}")
    assert 0.87 < np.mean(own["train"]) < 0.93
    assert np.mean(own["val"]) < 0.2


def test_world_label_set_resolves_names_and_features() -> None:
    labels = get_label_set("world")
    circle = labels.resolve("circle")
    assert (circle.index, circle.spurious_feature) == (0, "red dots")
    assert labels.resolve("5").name == "ring"
    assert [c.name for c in labels.resolve_many("all")] == list(SHAPES)


def test_world_label_set_is_found_without_importing_the_world() -> None:
    code = "from spurgen.labels import get_label_set; print(get_label_set('world').resolve('star').spurious_feature)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "purple checkerboard"


@pytest.mark.parametrize("half", [False, True])
def test_classifier_round_trips_through_timm_local_dir(world: Path, tmp_path: Path, half: bool) -> None:
    import copy

    import torch

    from spurgen.world.classifiers import (
        ClassifierTrainConfig,
        load_world_classifier,
        save_classifier,
        train_classifier,
    )
    from spurgen.world.models import ARCHITECTURES

    images, labels = load_split(world, "train")
    config = ClassifierTrainConfig(batch_size=8, max_steps=3, half=half)
    x = torch.from_numpy(images[:6]).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    for spec in ARCHITECTURES:
        model = train_classifier(spec, images, labels, config)
        save_classifier(model, tmp_path / spec.name, half=half)
        config_json = json.loads((tmp_path / spec.name / "config.json").read_text())
        assert config_json["architecture"] == spec.arch and config_json["num_classes"] == len(SHAPES)
        assert config_json["pretrained_cfg"]["crop_pct"] == 1.0
        assert config_json["pretrained_cfg"]["input_size"] == [3, 32, 32]
        assert "hf_hub_id" not in config_json["pretrained_cfg"]
        assert (tmp_path / spec.name / "model.safetensors").is_file()
        reloaded = load_world_classifier(tmp_path / spec.name)
        # Stored in float16, the reloaded model equals the trained one with its weights rounded.
        expected = copy.deepcopy(model).half().float() if half else model
        with torch.inference_mode():
            assert torch.equal(reloaded(x), expected(x)), spec.name


def test_train_world_classifiers_records_metrics_and_resumes(world: Path, tmp_path: Path) -> None:
    from spurgen.world.classifiers import ClassifierTrainConfig, train_world_classifiers

    config = ClassifierTrainConfig(batch_size=8, max_steps=1)
    messages: list[str] = []
    summary = train_world_classifiers(world, tmp_path, config, names=["resnet", "robust-resnet"],
                                      progress=messages.append)
    metrics = json.loads((tmp_path / "resnet" / "metrics.json").read_text())
    for key in ("params", "train_seconds", "val_acc", "spurious_acc", "size_bytes"):
        assert key in metrics and key in summary["models"]["resnet"]
    for name in ("resnet", "robust-resnet"):
        assert "val_acc_under_pgd" in json.loads((tmp_path / name / "metrics.json").read_text())
    assert 0.0 <= summary["spurious_all_standard_agree"] <= 1.0
    assert json.loads((tmp_path / "metrics.json").read_text()) == summary
    messages.clear()
    assert train_world_classifiers(world, tmp_path, config, names=["resnet"], progress=messages.append)
    assert any("kept" in m for m in messages)


def test_classifiers_trained_elsewhere_with_the_same_settings_are_kept(world: Path, tmp_path: Path) -> None:
    from spurgen.world.classifiers import ClassifierTrainConfig, train_world_classifiers

    config = ClassifierTrainConfig(batch_size=8, max_steps=1)
    shipped = train_world_classifiers(world, tmp_path / "shipped", config, names=["resnet"], progress=lambda _: None)
    messages: list[str] = []
    summary = train_world_classifiers(world, tmp_path / "out", config, names=["resnet"], progress=messages.append,
                                      kept_from=[tmp_path / "shipped"])
    assert any("kept" in m for m in messages) and summary == shipped
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["metrics.json"]


def test_shipped_classifiers_are_registered_for_the_world() -> None:
    from spurgen.classifiers import builtin_classifiers
    from spurgen.world.models import ARCHITECTURES, ASSETS_DIR

    specs = builtin_classifiers("world")
    assert set(specs) == {a.name for a in ARCHITECTURES}
    assert all(Path(s.path) == ASSETS_DIR / s.name for s in specs.values())


def test_shipped_classifiers_load_through_the_classifier_registry() -> None:
    from spurgen.classifiers import builtin_classifiers, load_classifier
    from spurgen.world.models import ASSETS_DIR

    if not (ASSETS_DIR / "metrics.json").is_file():
        pytest.skip("world classifiers not trained yet")
    for spec in builtin_classifiers("world").values():
        classifier = load_classifier(spec)
        assert classifier.num_classes == len(SHAPES) and classifier.input_size == (32, 32)
        assert classifier.crop == "none"
