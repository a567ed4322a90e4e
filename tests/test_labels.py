"""The label set registry: names resolved lazily by dotted path, TSV files, and the classifiers of each set."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import spurgen.classifiers
import spurgen.labels
from spurgen.classifiers import ClassifierSpec, builtin_classifiers, register_classifiers
from spurgen.errors import SpurgenError
from spurgen.labels import LabelSet, get_label_set, label_set_classifiers, list_label_sets, register_label_set
from spurgen.world.models import ARCHITECTURES


@pytest.fixture
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Registrations made by a test are undone after it."""
    monkeypatch.setattr(spurgen.labels, "_REGISTRY", dict(spurgen.labels._REGISTRY))
    monkeypatch.setattr(spurgen.classifiers, "_ADDED", {})
    get_label_set.cache_clear()
    yield
    get_label_set.cache_clear()


def test_registered_label_sets_are_imported_only_when_asked_for() -> None:
    code = ("import sys; import spurgen.classifiers as c, spurgen.labels as labels; "
            "print('spurgen.world' in sys.modules); labels.get_label_set('world'); "
            "print('spurgen.world' in sys.modules); c.builtin_classifiers('imagenet'); print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # Listing ImageNet's classifiers does not build its class table, which imports timm and torch.
    assert result.stdout.split() == ["False", "True", "False"]


def test_builtin_names_are_listed() -> None:
    assert list(list_label_sets()) == ["imagenet", "world"]


def test_a_label_set_registers_by_dotted_path_or_function(registry: None) -> None:
    register_label_set("shapes", "spurgen.world.labels:world_label_set", "spurgen.world.models:world_classifier_specs")
    assert get_label_set("shapes").resolve("star").spurious_feature == "purple checkerboard"
    assert set(builtin_classifiers("shapes")) == {a.name for a in ARCHITECTURES}
    only = ClassifierSpec("only", "resnet18")
    register_label_set("two", lambda: LabelSet("two", {0: get_label_set("world")[0]}, (0,)), lambda: [only])
    assert [c.name for c in get_label_set("two").resolve_many("all")] == ["circle"]
    assert builtin_classifiers("two") == {"only": only}
    register_label_set("bare", "spurgen.world.labels:world_label_set")
    assert label_set_classifiers("bare") == ()


def test_a_dotted_path_that_does_not_import_is_a_one_line_error(registry: None) -> None:
    register_label_set("broken", "spurgen.no_such_module:label_set")
    with pytest.raises(SpurgenError, match="label set 'broken' is registered with 'spurgen.no_such_module:label_set'"):
        get_label_set("broken")


def test_unknown_label_set_names_the_choices() -> None:
    with pytest.raises(SpurgenError, match="unknown label set 'nope'; use one of imagenet, world or a TSV file path"):
        get_label_set("nope")


def test_a_tsv_path_is_a_label_set_without_classifiers(tmp_path: Path) -> None:
    path = tmp_path / "mine.tsv"
    path.write_text("index\tclass_name\tspurious_feature\taliases\n"
                    "3\tsea_lion\trocks\tsealion\n7\tkite\tblue sky\t\n", encoding="utf-8")
    labels = get_label_set(str(path))
    assert labels.resolve("sealion").name == "sea lion"
    assert labels.resolve("7").spurious_feature == "blue sky"
    assert labels.default_indices == (3, 7)
    assert builtin_classifiers(str(path)) == {}


def test_imagenet_carries_the_papers_four_classifiers() -> None:
    specs = builtin_classifiers("imagenet")
    assert list(specs) == ["rn50-v1", "rn50-v2", "vit-b16", "robust-rn50"]
    assert specs["robust-rn50"].needs_path and specs["robust-rn50"].temperature == 0.7155761122703552
    assert get_label_set("imagenet").resolve("hummingbird").index == 94


def test_world_comes_with_its_classifiers() -> None:
    assert [spec.name for spec in label_set_classifiers("world")] == [a.name for a in ARCHITECTURES]
    assert builtin_classifiers("world") == {spec.name: spec for spec in label_set_classifiers("world")}


def test_registered_classifiers_extend_a_label_sets_own(registry: None) -> None:
    extra = ClassifierSpec("extra", "resnet18.a1_in1k")
    register_classifiers("imagenet", [extra])
    specs = builtin_classifiers("imagenet")
    assert specs["extra"] == extra and "rn50-v1" in specs
    register_classifiers("mine", [extra])
    assert builtin_classifiers("mine") == {"extra": extra}
