"""How a stage's settings are resolved: defaults < spurgen.toml top level < the stage's table < flags."""

from __future__ import annotations

import pytest

from spurgen.config import GenerateConfig, SelectRefsConfig, help_for, resolve_config
from spurgen.errors import SpurgenError


def test_defaults_when_nothing_is_given() -> None:
    config = resolve_config(SelectRefsConfig, {}, "select-refs", {})
    assert config.k == 6 and config.classes == ["all"] and config.crop is None


def test_flags_beat_the_stage_table_which_beats_the_top_level() -> None:
    settings = {"device": "cpu", "batch_size": 4, "select-refs": {"batch-size": 8, "k": 3}}
    config = resolve_config(SelectRefsConfig, settings, "select-refs", {"k": 2, "batch_size": None})
    assert config.device == "cpu"  # top level applies to every stage
    assert config.batch_size == 8  # the stage's table beats the top level; a None flag means "not given"
    assert config.k == 2  # a flag beats both


def test_another_stage_table_does_not_leak_in() -> None:
    config = resolve_config(SelectRefsConfig, {"generate": {"batch-size": 99}}, "select-refs", {})
    assert config.batch_size == SelectRefsConfig().batch_size


def test_lists_split_on_commas_and_drop_blanks() -> None:
    config = resolve_config(SelectRefsConfig, {"select-refs": {"classes": "koala, hummingbird,,"}}, "select-refs", {})
    assert config.classes == ["koala", "hummingbird"]


def test_unknown_key_in_the_stage_table_names_the_known_keys() -> None:
    with pytest.raises(SpurgenError, match=r"unknown key 'kk' in \[select-refs\]; known keys: .*batch-size"):
        resolve_config(SelectRefsConfig, {"select-refs": {"kk": 1}}, "select-refs", {})


def test_unknown_top_level_keys_belong_to_other_stages() -> None:
    config = resolve_config(SelectRefsConfig, {"steps": 400}, "select-refs", {})
    assert config.k == 6


def test_stage_table_that_is_a_value_is_an_error() -> None:
    with pytest.raises(SpurgenError, match=r"'select-refs' must be a table"):
        resolve_config(SelectRefsConfig, {"select-refs": 3}, "select-refs", {})


@pytest.mark.parametrize(("value", "message"), [
    ("six", "expected a whole number"),
    (True, "expected a whole number"),
    (2.5, "expected a whole number"),
])
def test_wrong_types_are_one_line_errors_naming_the_source(value: object, message: str) -> None:
    with pytest.raises(SpurgenError, match=rf"spurgen.toml: \[select-refs\] k: {message}"):
        resolve_config(SelectRefsConfig, {"select-refs": {"k": value}}, "select-refs", {})


def test_a_flag_of_the_wrong_type_names_the_flag() -> None:
    with pytest.raises(SpurgenError, match=r"--batch-size: expected a whole number"):
        resolve_config(SelectRefsConfig, {}, "select-refs", {"batch_size": "many"})


def test_validation_runs_after_resolution() -> None:
    with pytest.raises(SpurgenError, match=r"-k must be at least 1, got 0"):
        resolve_config(SelectRefsConfig, {}, "select-refs", {"k": 0})
    with pytest.raises(SpurgenError, match=r"--dataset and --images both given"):
        resolve_config(SelectRefsConfig, {}, "select-refs", {"dataset": "a", "images": "b"})


def test_non_finite_numbers_are_refused() -> None:
    with pytest.raises(SpurgenError, match="expected a finite number"):
        resolve_config(GenerateConfig, {"generate": {"guidance": float("nan")}}, "generate", {})


def test_help_text_shows_the_default_and_escapes_markup() -> None:
    text = help_for(SelectRefsConfig, "k")
    assert text.endswith("(default: 6)")
    assert "\\[" not in help_for(SelectRefsConfig, "k")
    assert "(default: all)" in help_for(SelectRefsConfig, "classes")
