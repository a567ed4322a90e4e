"""A command's options generated from its config dataclass, so that a setting is written once: as a field.

A field declared with :func:`~spurgen.config.setting` becomes the option ``--<field-name>`` with the field's help
text and default, plus what its metadata says (short flags, an off switch, a metavar, path-ness, list splitting, a
parser). Every generated option defaults to ``None``, "not given", so that ``spurgen.toml`` keeps its place below
the command line in :func:`~spurgen.config.resolve_config`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import typer

from .config import help_for
from .errors import SpurgenError

__all__ = ["config_options"]

F = TypeVar("F", bound=Callable[..., Any])


def _split(values: list[str]) -> list[str]:
    """Joins repeated and comma-separated values: ``--classes a,b --classes c``."""
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


def _numbers(values: list[str], kind: type, flag: str) -> list[Any]:
    """Parses ``--sfsl-weight 0.05,0.1`` (already split) into numbers of type ``kind``."""
    try:
        return [kind(v) for v in values]
    except ValueError:
        raise SpurgenError(f"{flag}: expected numbers separated by commas, e.g. 0.05,0.1,0.2; "
                           f"got {','.join(values)}") from None


def _list_value(values: list[str], meta: Mapping[str, Any], item: Any, flag: str) -> Any:
    """A list or table setting from its option's repeated values; numbers are parsed here to name the flag."""
    values = _split(values) if meta["split"] else list(values)
    if meta["parse"]:
        return meta["parse"](values)
    return _numbers(values, item, flag) if item in (int, float) else values


def _expanded_path(path: Path) -> str:
    """A path option's value as the setting's string, ``~`` expanded."""
    from .workspace import expand_home  # not at the top: --help does not load the workspace module

    return str(expand_home(path))


def _option(config_cls: type, fld: dataclasses.Field, hint: Any) -> tuple[inspect.Parameter, Callable[[Any], Any]]:
    """The Typer parameter of one field, and the function that turns the option's value into the setting's.

    Args:
        config_cls: The config dataclass, for the help text with its default.
        fld: The field.
        hint: The field's resolved type.
    """
    meta = fld.metadata
    flag = "--" + fld.name.replace("_", "-")
    # The type without "| None": every option is Optional anyway, None meaning "not given".
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    convert: Callable[[Any], Any]
    if meta["path"]:
        annotation: Any = Path
        convert = _expanded_path
    elif typing.get_origin(hint) in (list, dict):
        # Lists and tables arrive as repeated strings (Typer cannot parse NAME=VALUE or report a whole list).
        annotation = list[str]
        convert = functools.partial(_list_value, meta=meta, item=typing.get_args(hint)[0], flag=flag)
    else:
        annotation, convert = hint, lambda value: value
    # Short flags first, as click names them in its messages ("'-k' / '--k'"), then the name, then aliases.
    decls = sorted((flag if meta["off"] is None else f"{flag}/{meta['off']}", *meta["flags"]),
                   key=lambda decl: decl.startswith("--"))
    # The help text carries the default (help_for), which spurgen.toml may change; Typer's own would say None.
    option = typer.Option(None, *decls, help=help_for(config_cls, fld.name), metavar=meta["metavar"],
                          show_default=False)
    parameter = inspect.Parameter(fld.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                  annotation=annotation | None)
    return parameter, lambda value: None if value is None else convert(value)


def config_options(config_cls: type, after: Mapping[str, str] | None = None) -> Callable[[F], F]:
    """Gives a command one option per field of ``config_cls``, in field order, where its ``flags`` parameter is.

    The command is called with ``flags``: every field's value from the command line by name, ``None`` where not
    given, ready for :func:`~spurgen.config.resolve_config`. Its other parameters keep their place.

    Args:
        config_cls: The stage's config dataclass; fields declared with ``cli=False`` get no option.
        after: Own parameters to show right after a field's option instead, e.g. ``{"classifier": "classifiers"}``.
    """
    after = after or {}
    hints = typing.get_type_hints(config_cls)
    options = {fld.name: _option(config_cls, fld, hints[fld.name])
               for fld in dataclasses.fields(config_cls) if fld.metadata["cli"]}

    def decorate(command: F) -> F:
        own = inspect.signature(command, eval_str=True).parameters
        parameters: list[inspect.Parameter] = []
        for parameter in own.values():
            if parameter.name == "flags":  # the generated options take its place
                for name, (option, _) in options.items():
                    parameters += [option, *(own[p].replace(kind=inspect.Parameter.KEYWORD_ONLY)
                                             for p, field_name in after.items() if field_name == name)]
            elif parameter.name not in after:
                parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))

        @functools.wraps(command)
        def wrapper(**kwargs: Any) -> Any:
            flags = {name: convert(kwargs.pop(name)) for name, (_, convert) in options.items()}
            return command(**kwargs, flags=flags)

        # Typer reads a command's options from its signature (inspect.signature honours __signature__) and its
        # annotations, so both describe the generated parameters.
        wrapper.__signature__ = inspect.Signature(parameters, return_annotation=None)  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in parameters}
        return wrapper  # type: ignore[return-value]

    return decorate
