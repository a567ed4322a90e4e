"""Stage settings as dataclasses, and how they are resolved.

Every setting is a dataclass field whose ``help`` metadata is also its ``--help`` text. A stage's
settings come from, in rising priority: the field defaults, the top level of ``spurgen.toml``, the
stage's table in it (``[select-refs]``, ``[finetune]``, ...), and command-line flags. This module
imports nothing heavy, so ``spurgen --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping, TypeVar

from .errors import SpurgenError

__all__ = ["setting", "help_for", "resolve_config", "SelectRefsConfig", "CROP_POLICIES"]

C = TypeVar("C")

CROP_POLICIES = ("center", "none")


def setting(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field carrying its help text (shown by ``--help`` and in the README)."""
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def help_for(config_cls: type, name: str) -> str:
    """The help text of one setting, with its default, for a Typer option."""
    fld = {f.name: f for f in dataclasses.fields(config_cls)}[name]
    default = fld.default if fld.default is not dataclasses.MISSING else (
        fld.default_factory() if fld.default_factory is not dataclasses.MISSING else None)
    if isinstance(default, list):
        default = ",".join(map(str, default))
    shown = "" if default in (None, "", {}) else f" (default: {default})"
    # Typer renders help as rich markup: escape brackets such as "[classifiers]".
    return f"{fld.metadata.get('help', '')}{shown}".replace("[", "\\[")


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Converts a TOML or CLI value to the field's declared type, with a one-line error."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except SpurgenError:
                continue
        raise SpurgenError(f"{where}: {value!r} is not a valid value; see --help for the expected type")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise SpurgenError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise SpurgenError(f"{where}: expected a whole number, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise SpurgenError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
        raise SpurgenError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise SpurgenError(f"{where}: expected a string, got {value!r}")
    if origin is list:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            raise SpurgenError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v.strip() if isinstance(v, str) else v, args[0], where) for v in items
                if not (isinstance(v, str) and not v.strip())]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise SpurgenError(f"{where}: expected a table, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()}
    return value


def _toml_key(key: str) -> str:
    return key.replace("-", "_")


def resolve_config(config_cls: type[C], settings: Mapping[str, Any], section: str,
                   overrides: Mapping[str, Any]) -> C:
    """Builds a stage config from defaults, ``spurgen.toml`` and command-line flags.

    Args:
        config_cls: The stage's config dataclass.
        settings: The parsed ``spurgen.toml``; top-level keys that name a field of the config
            apply to every stage, the ``[section]`` table to this stage only.
        section: The stage's table name, e.g. ``"select-refs"``.
        overrides: Flags the user gave (``None`` values mean "not given" and are skipped).

    Raises:
        SpurgenError: an unknown key in the stage's table, or a value of the wrong type.
    """
    hints = typing.get_type_hints(config_cls)
    names = {f.name for f in dataclasses.fields(config_cls)}
    values: dict[str, Any] = {}
    for key, value in settings.items():
        name = _toml_key(key)
        # Top-level tables ([classifiers], [finetune], ...) are not settings of this stage.
        if name in names and (not isinstance(value, Mapping) or typing.get_origin(hints[name]) is dict):
            values[name] = _coerce(value, hints[name], f"spurgen.toml: {key}")
    table = settings.get(section, {})
    if not isinstance(table, Mapping):
        raise SpurgenError(f"spurgen.toml: '{section}' must be a table ([{section}]), not a value")
    for key, value in table.items():
        name = _toml_key(key)
        if name not in names:
            known = ", ".join(sorted(n.replace("_", "-") for n in names))
            raise SpurgenError(f"spurgen.toml: unknown key '{key}' in [{section}]; known keys: {known}")
        values[name] = _coerce(value, hints[name], f"spurgen.toml: [{section}] {key}")
    for name, value in overrides.items():
        if value is not None:
            values[name] = _coerce(value, hints[name], f"--{name.replace('_', '-')}")
    config = config_cls(**values)
    validate = getattr(config, "validate", None)
    if validate:
        validate()
    return config


def require(condition: bool, message: str) -> None:
    """Raises a :class:`SpurgenError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise SpurgenError(message)


@dataclass
class SelectRefsConfig:
    """Settings of ``spurgen select-refs``."""

    classes: list[str] = setting(["all"], "Classes: ImageNet names, indices or WordNet ids, comma-separated, or 'all' (the 100 Spurious ImageNet classes).")
    dataset: str | None = setting(None, "Spurious ImageNet 'images' folder (100 sub-folders of 75 images).")
    images: str | None = setting(None, "A plain folder of images of one class (use with a single --classes).")
    classifiers: list[str] = setting(["all"], "Classifiers that must all agree, comma-separated registry names, or 'all' (every configured one).")
    k: int = setting(6, "Number of reference images to keep per class (the paper keeps 6).")
    crop: str | None = setting(None, "Crop policy: 'center' (resize + center crop) or 'none' (the whole image resized to the input size, as Spurious ImageNet feeds its square images). Default: each classifier's own.")
    batch_size: int = setting(32, "Images per classifier forward pass.")
    num_workers: int = setting(2, "DataLoader worker processes decoding images (0 decodes in the main process).")
    device: str = setting("auto", "Device: 'auto' (GPU when present), 'cpu', 'cuda', 'cuda:1', 'mps'.")
    labels: str = setting("imagenet", "Label set: 'imagenet', another registered set, or a TSV file of classes.")

    def validate(self) -> None:
        require(self.k >= 1, f"-k must be at least 1, got {self.k}; pass -k 6 for the paper's setting")
        require(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        require(self.num_workers >= 0, f"--num-workers must be 0 or more, got {self.num_workers}")
        require(self.crop in (None, *CROP_POLICIES), f"--crop must be 'center' or 'none', got {self.crop!r}")
        require(not (self.dataset and self.images), "--dataset and --images both given; pass only one source of images")
