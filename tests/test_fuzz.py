"""Property-based tests: random command lines and random ``spurgen.toml`` files never crash spurgen.

Every command runs in-process against an empty workspace (no references, no models), so input checks are all
there is to reach and each example is quick. What must hold for any input: a clean exit with a documented code
(0, 1, 2 or 130; the parser's own usage errors are exit code 2), never a traceback, and no file written outside
the workspace (the current folder and a sibling folder are compared before and after).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.main import get_command
from typer.testing import CliRunner

from spurgen import config as stage_configs
from spurgen.cli import app

# Hundreds of generated inputs through the CLI: CI runs them, the everyday loop (make test-fast) does not.
pytestmark = pytest.mark.slow

EXIT_CODES = {0, 1, 2, 130}
CLI_EXAMPLES = 25  # per command
TOML_EXAMPLES = 60
# No example database: it would be written to the current folder, which the tests watch.
FUZZ_SETTINGS = settings(deadline=None, database=None)

# Commands with the fixed arguments that keep them from long work: 'run' only plans; 'demo' and 'world' train
# models and are left out. 'rate' would serve forever; the fixture below makes serving an error instead.
COMMANDS: dict[str, list[str]] = {"select-refs": [], "finetune": [], "fit-npca": [], "generate": [], "evaluate": [],
                                  "export-lora": [], "run": ["--dry-run"], "rate": [], "classes": [], "classifiers": []}
# Values that reach past the parser into spurgen's own checks: names, indices, paths, odd numbers.
TRICKY = ["", "all", "94", "hummingbird", "koala,94", "../x", "/", ".", "..", "nan", "inf", "-1", "0", "1e309",
          "x=resnet50@/nope.pt", "robust-rn50", "res-a", "\x00", "a\nb", "kolibrí", "a" * 300, "quality>=0.5",
          "consistent,no-object", "sfsl", "dreambooth", "ViT-B-32", "world", "cpu", "DDIM", "hub/id"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """cwd/ (the current folder), ws/ (the workspace) and sibling/ beside them; serving the rating page fails."""
    from diffusers.utils import logging as diffusers_logging

    import spurgen.rate

    # diffusers gives its logger a stderr handler on first use; made inside a CliRunner call, the handler would
    # keep that call's (then closed) stream and print "--- Logging error ---" tracebacks in later calls.
    diffusers_logging.get_logger("diffusers")
    root = tmp_path_factory.mktemp("fuzz")
    found = {name: root / name for name in ("cwd", "ws", "sibling")}
    for name, folder in found.items():
        folder.mkdir()
        if name != "ws":
            (folder / "notes.txt").write_text("earlier work\n")

    def no_server(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("rate got as far as serving with an empty workspace")

    previous = Path.cwd()
    os.chdir(found["cwd"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(spurgen.rate, "make_server", no_server)
        yield found
    os.chdir(previous)


def _snapshot(*roots: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def _invoke(args: list[str], folders: dict[str, Path]) -> None:
    """Runs one command line and checks the properties every input must keep."""
    outside = (folders["cwd"], folders["sibling"])
    before = _snapshot(*outside)
    result = CliRunner().invoke(app, args)
    assert result.exit_code in EXIT_CODES, (args, result.output)
    assert result.exception is None or isinstance(result.exception, SystemExit), (args, result.exception)
    assert "Traceback" not in result.output, (args, result.output)
    assert _snapshot(*outside) == before, f"{args} wrote outside the workspace"


# --- Command lines ----------------------------------------------------------------------------------------------


def _value(param: Any) -> st.SearchStrategy[str]:
    """Text for an option's value: something of its type, a tricky string, or any text."""
    typed: st.SearchStrategy[str]
    if param.bare_type() is int:
        typed = st.integers(-10**12, 10**12).map(str)
    elif param.bare_type() is float:
        typed = st.floats(allow_nan=True, allow_infinity=True).map(repr)
    else:
        typed = st.text(max_size=12)
    return st.one_of(typed, st.sampled_from(TRICKY), st.text(max_size=30))


def _option(param: Any) -> st.SearchStrategy[list[str]]:
    names = [*param.opts, *param.secondary_opts]
    if param.is_flag:
        return st.sampled_from(names).map(lambda name: [name])
    return st.tuples(st.sampled_from(names), _value(param)).map(list)


def _command_line(command: str) -> st.SearchStrategy[list[str]]:
    """The command with up to 5 of its options (and any positional argument) given random values."""
    params = get_command(app).commands[command].params  # type: ignore[attr-defined]
    # Typer's parameters (its own copy of click's): options, and positional arguments such as rate's PATH.
    options = [p for p in params if p.param_type_name == "option" and p.name != "workspace"]
    has_workspace = any(p.name == "workspace" for p in params)
    positional = st.lists(st.one_of(st.sampled_from(TRICKY), st.text(max_size=12)), max_size=1)
    fixed = [command, *(["-w", "WS"] if has_workspace else []), *COMMANDS[command]]
    return st.tuples(st.lists(st.sampled_from(options).flatmap(_option), max_size=5), positional).map(
        lambda parts: [*fixed, *[word for option in parts[0] for word in option], *parts[1]])


@pytest.mark.parametrize("command", list(COMMANDS))
def test_random_command_lines_exit_cleanly(command: str, folders: dict[str, Path]) -> None:
    @settings(FUZZ_SETTINGS, max_examples=CLI_EXAMPLES)
    @given(args=_command_line(command))
    def check(args: list[str]) -> None:
        _invoke([str(folders["ws"]) if word == "WS" else word for word in args], folders)

    check()


# --- spurgen.toml -----------------------------------------------------------------------------------------------

SECTIONS = ["select-refs", "finetune", "fit-npca", "generate", "evaluate", "run", "rate", "classifiers",
            "finetune.class-sfsl-weight"]
KNOWN_KEYS = sorted({f.replace("_", "-") for cls in (stage_configs.SelectRefsConfig, stage_configs.FinetuneConfig,
                                                      stage_configs.FitNpcaConfig, stage_configs.GenerateConfig,
                                                      stage_configs.EvaluateConfig, stage_configs.RunConfig,
                                                      stage_configs.RateConfig)
                     for f in cls.__dataclass_fields__} | {"model", "hummingbird", "94"})

_keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(min_size=1, max_size=10))
_scalars = st.one_of(st.booleans(), st.integers(-10**20, 10**20), st.floats(), st.sampled_from(TRICKY),
                     st.text(max_size=12))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_keys, inner, max_size=3),
                       max_leaves=6)


def _toml(value: Any) -> str:
    """A value in TOML syntax (strings and keys as JSON strings, whose escapes TOML shares)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float, str)):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return "{ " + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + " }"


def _document(top: dict[str, Any], tables: dict[str, dict[str, Any]]) -> str:
    lines = [f"{json.dumps(k)} = {_toml(v)}" for k, v in top.items()]
    for name, table in tables.items():
        lines += [f"[{name}]", *(f"{json.dumps(k)} = {_toml(v)}" for k, v in table.items())]
    return "\n".join(lines) + "\n"


_settings_files = st.one_of(
    st.builds(_document, st.dictionaries(_keys, _values, max_size=3),
              st.dictionaries(st.sampled_from(SECTIONS), st.dictionaries(_keys, _values, max_size=4), max_size=3)),
    st.text(max_size=80),  # anything at all, mostly invalid TOML
)
SETTINGS_READERS = [["select-refs", "--classes", "94"], ["finetune", "--classes", "94"], ["fit-npca"], ["generate"],
                    ["evaluate"], ["run", "--dry-run"], ["rate"], ["classifiers"]]


@settings(FUZZ_SETTINGS, max_examples=TOML_EXAMPLES)
@given(text=_settings_files, command=st.sampled_from(SETTINGS_READERS))
def test_random_settings_files_exit_cleanly(text: str, command: list[str], folders: dict[str, Path]) -> None:
    (folders["ws"] / "spurgen.toml").write_text(text, encoding="utf-8")
    _invoke([command[0], "-w", str(folders["ws"]), *command[1:]], folders)


def test_fuzz_example_count_is_the_documented_one() -> None:
    """docs/reliability.md's Reliability section states how many random inputs one test run tries."""
    total = CLI_EXAMPLES * len(COMMANDS) + TOML_EXAMPLES
    section = (
        (Path(__file__).resolve().parents[1] / "docs" / "reliability.md")
        .read_text(encoding="utf-8")
        .split("## Reliability", 1)[1]
    )
    assert f"{total} random" in section.split("\n## ", 1)[0]
