"""Label sets: which classes exist, what they are called, what their spurious feature is, and their classifiers.

A :class:`LabelSet` maps class indices (the classifier's output positions) to :class:`ClassInfo`
records and resolves what users type (``hummingbird``, ``"grey whale"``, ``grey_whale``, ``94``,
``n01833805``, ``all``) to classes. The default set is ImageNet-1k, whose names and WordNet ids
come from timm's bundled metadata and whose ``all`` means the 100 Spurious ImageNet classes.

The registry names each label set's factory and its classifiers (what ``--classifiers all`` selects)
by dotted path, ``"package.module:attribute"``, imported when first asked for: no module registers
anything by being imported, the world's code stays unloaded until ``--labels world``, and listing a
set's classifiers does not build its class table (ImageNet's imports timm, and with it torch).
Users add sets with :func:`register_label_set`; a name that is not registered is read as a TSV file
with the columns of ``spurious_imagenet_classes.tsv``.
"""

from __future__ import annotations

import ast
import csv
import difflib
import importlib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Sequence

from .errors import SpurgenError

if TYPE_CHECKING:
    from .classifiers import ClassifierSpec

__all__ = [
    "ClassInfo",
    "LabelSet",
    "get_label_set",
    "imagenet_label_set",
    "label_set_classifiers",
    "register_label_set",
    "list_label_sets",
    "normalize_name",
]


def normalize_name(text: str) -> str:
    """Folds case, underscores, hyphens and repeated spaces so 'Grey_Whale' matches 'grey whale'."""
    return re.sub(r"[\s_\-]+", " ", text.strip().lower())


def slugify(text: str) -> str:
    """A file-system-safe form of a class name: ASCII letters, digits and underscores only."""
    slug = re.sub(r"[^a-z0-9]+", "_", normalize_name(text)).strip("_")
    return slug or "class"


@dataclass(frozen=True)
class ClassInfo:
    """One class of a label set.

    Args:
        index: Position of the class in the classifiers' output.
        name: Display name, e.g. ``"grey whale"``.
        synset: WordNet id for ImageNet classes (``"n01833805"``), else ``None``.
        aliases: Further names that resolve to this class.
        spurious_feature: The class's spurious feature, the default prompt noun (``"red flowers"``).
        npca_components: Spurious ImageNet's neural-PCA component indices of the feature (0-based).
    """

    index: int
    name: str
    synset: str | None = None
    aliases: tuple[str, ...] = ()
    spurious_feature: str | None = None
    npca_components: tuple[int, ...] = ()

    @property
    def slug(self) -> str:
        return slugify(self.name)

    @property
    def dirname(self) -> str:
        """Folder name used everywhere in the workspace: ``94-hummingbird``."""
        return f"{self.index}-{self.slug}"

    def __str__(self) -> str:
        return f"{self.name} ({self.index})"


@dataclass
class LabelSet:
    """A set of classes and the rules to resolve user input to them.

    Args:
        name: Registry name (``imagenet``, ``world``, or a TSV path).
        classes: Every class the classifiers can output, by index.
        default_indices: What ``all`` selects (for ImageNet: the 100 Spurious ImageNet classes).
    """

    name: str
    classes: dict[int, ClassInfo]
    default_indices: tuple[int, ...]
    _lookup: dict[str, list[int]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._lookup = {}
        for info in self.classes.values():
            keys = {normalize_name(info.name), *(normalize_name(a) for a in info.aliases)}
            if info.synset:
                keys.add(info.synset.lower())
            for key in keys:
                self._lookup.setdefault(key, []).append(info.index)

    @property
    def num_classes(self) -> int:
        return max(self.classes) + 1 if self.classes else 0

    def __getitem__(self, index: int) -> ClassInfo:
        return self.classes[index]

    def label(self, index: int) -> str:
        """Display name of any output index (also those outside the label set's classes)."""
        info = self.classes.get(index)
        return info.name if info else f"class {index}"

    def resolve(self, token: str) -> ClassInfo:
        """Resolves one name, index or WordNet id to a class.

        Raises:
            SpurgenError: unknown or ambiguous token, with the closest names suggested.
        """
        text = token.strip()
        if re.fullmatch(r"\d+", text):
            index = int(text)
            if index in self.classes:
                return self.classes[index]
            raise SpurgenError(
                f"unknown class index {index}; the '{self.name}' label set has indices "
                f"{min(self.classes)}..{max(self.classes)}"
            )
        matches = self._lookup.get(normalize_name(text), []) or self._lookup.get(text.lower(), [])
        if len(matches) == 1:
            return self.classes[matches[0]]
        if len(matches) > 1:
            options = ", ".join(f"{self.classes[i].index} ({self.classes[i].synset or self.classes[i].name})"
                                for i in matches)
            raise SpurgenError(f"class name '{text}' is ambiguous; use one of the indices {options}")
        raise SpurgenError(f"unknown class '{text}'{self._suggestion(text)}")

    def resolve_many(self, spec: str | Sequence[str]) -> list[ClassInfo]:
        """Resolves a comma list (or a list of comma lists) such as ``"hummingbird,94"`` or ``"all"``.

        Duplicates are dropped; order follows the input.
        """
        tokens: list[str] = []
        for part in [spec] if isinstance(spec, str) else spec:
            tokens.extend(t for t in (p.strip() for p in part.split(",")) if t)
        if not tokens:
            raise SpurgenError("no class given; pass --classes NAME[,NAME...] or --classes all")
        resolved: dict[int, ClassInfo] = {}
        for token in tokens:
            if token.lower() == "all":
                for index in self.default_indices:
                    resolved.setdefault(index, self.classes[index])
            else:
                info = self.resolve(token)
                resolved.setdefault(info.index, info)
        return list(resolved.values())

    def search(self, query: str | None = None, every_class: bool = False) -> list[ClassInfo]:
        """The classes whose name or alias contains ``query`` (all when it is empty), in index order.

        Args:
            query: Text to look for, compared as normalized names (``grey whale`` = ``grey_whale``).
            every_class: Search every class of the label set, not only those ``all`` selects.

        Raises:
            SpurgenError: no class contains ``query``; says which flag finds it, or suggests the closest names
                as ``--classes`` does for a typo.
        """
        indices = sorted(self.classes) if every_class else list(self.default_indices)
        key = normalize_name(query or "")
        found = [self.classes[i] for i in indices
                 if key in normalize_name(" ".join((self.classes[i].name, *self.classes[i].aliases)))]
        if found or not key:
            return found
        if not every_class and self.search(query, every_class=True):
            raise SpurgenError(f"none of the classes that 'all' selects contains '{query}'; add --all-classes to "
                               f"search every class of the '{self.name}' label set")
        raise SpurgenError(f"no class name contains '{query}'{self._suggestion(query or '')}")

    def _suggestion(self, text: str) -> str:
        key = normalize_name(text)
        close = difflib.get_close_matches(key, list(self._lookup), n=3, cutoff=0.75)
        if not close:
            return f"; see the class names of the '{self.name}' label set (spurgen classes)"
        options = " or ".join(
            f"'{self.classes[self._lookup[c][0]].name}' ({self._lookup[c][0]})" for c in close[:2]
        )
        return f"; did you mean {options}?"

    @classmethod
    def from_tsv(cls, path: Path | str, name: str | None = None, *, base: "LabelSet | None" = None) -> "LabelSet":
        """Reads a label set from a TSV with the columns of ``spurious_imagenet_classes.tsv``.

        Columns: ``imagenet_index`` (or ``index``), ``class_name``, and optionally
        ``spurious_feature``, ``spurious_npca_components`` (a list such as ``[0, 12]``) and
        ``aliases`` (``;``-separated). With ``base``, rows refine the base set's classes and
        ``all`` means the rows of the file.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise SpurgenError(f"cannot read label file {path}: {exc.strerror}; check the path") from None
        rows = list(csv.DictReader(text.splitlines(), delimiter="\t"))
        classes: dict[int, ClassInfo] = dict(base.classes) if base else {}
        listed: list[int] = []
        for line_no, row in enumerate(rows, start=2):
            try:
                index = int(row.get("imagenet_index") or row["index"])
                components = tuple(int(c) for c in ast.literal_eval(row.get("spurious_npca_components") or "[]"))
                raw_name = row["class_name"].strip()
            except (KeyError, ValueError, SyntaxError, TypeError):
                raise SpurgenError(
                    f"{path}:{line_no}: malformed label row; expected columns index, class_name, "
                    "spurious_feature, spurious_npca_components separated by tabs"
                ) from None
            known = classes.get(index)
            aliases = tuple(a.strip() for a in (row.get("aliases") or "").split(";") if a.strip())
            classes[index] = ClassInfo(
                index=index,
                name=known.name if known else raw_name.replace("_", " "),
                synset=known.synset if known else None,
                aliases=(known.aliases if known else ()) + (raw_name,) + aliases,
                spurious_feature=(row.get("spurious_feature") or "").strip() or None,
                npca_components=components,
            )
            listed.append(index)
        if not listed:
            raise SpurgenError(f"label file {path} lists no class; add one row per class")
        return cls(name=name or str(path), classes=classes, default_indices=tuple(listed))


def imagenet_label_set() -> LabelSet:
    """ImageNet-1k with the Spurious ImageNet classes' features; ``all`` is those 100 classes."""
    from timm.data import ImageNetInfo  # bundled metadata, no download

    info = ImageNetInfo()
    classes = {}
    for index in range(info.num_classes()):
        names = [n.strip() for n in info.index_to_description(index).split(",") if n.strip()]
        classes[index] = ClassInfo(index=index, name=names[0], synset=info.index_to_label_name(index),
                                   aliases=tuple(names[1:]))
    base = LabelSet(name="imagenet", classes=classes, default_indices=tuple(classes))
    tsv = resources.files("spurgen.data").joinpath("spurious_imagenet_classes.tsv")
    with resources.as_file(tsv) as tsv_path:
        return LabelSet.from_tsv(tsv_path, name="imagenet", base=base)


LabelSetFactory = Callable[[], LabelSet]
ClassifiersFactory = Callable[[], Sequence["ClassifierSpec"]]


@dataclass(frozen=True)
class _Entry:
    """A registered label set: its factory and its classifiers, each a callable or its dotted path."""

    label_set: str | LabelSetFactory
    classifiers: str | ClassifiersFactory | None = None


_REGISTRY: dict[str, _Entry] = {
    "imagenet": _Entry("spurgen.labels:imagenet_label_set", "spurgen.classifiers:imagenet_classifiers"),
    "world": _Entry("spurgen.world.labels:world_label_set", "spurgen.world.models:world_classifier_specs"),
}


def register_label_set(name: str, factory: str | LabelSetFactory,
                       classifiers: str | ClassifiersFactory | None = None) -> None:
    """Makes a label set available by name (``labels = "NAME"`` in spurgen.toml, ``--labels NAME``).

    Args:
        name: The name users type.
        factory: A function returning the :class:`LabelSet`, or its dotted path ``"package.module:function"``,
            imported when the set is first used.
        classifiers: The set's own classifiers, a function returning ``ClassifierSpec`` entries or its dotted
            path; ``None`` for a set whose classifiers are all given by ``--classifier`` or spurgen.toml.
    """
    _REGISTRY[name] = _Entry(factory, classifiers)
    get_label_set.cache_clear()


def list_label_sets() -> Iterable[str]:
    return sorted(_REGISTRY)


def _resolve(name: str, target: str | Callable[[], object]) -> Callable[[], object]:
    """A registered callable, importing its module first if it is given by dotted path."""
    if callable(target):
        return target
    module, _, attribute = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as exc:
        raise SpurgenError(f"label set '{name}' is registered with {target!r}, which cannot be imported ({exc}); "
                           "register it as 'package.module:function'") from None


@lru_cache(maxsize=8)
def get_label_set(name_or_path: str = "imagenet") -> LabelSet:
    """Returns a registered label set, or reads one from a TSV path.

    Raises:
        SpurgenError: neither a registered name nor a readable file.
    """
    if name_or_path in _REGISTRY:
        return _resolve(name_or_path, _REGISTRY[name_or_path].label_set)()
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return LabelSet.from_tsv(path)
    raise SpurgenError(
        f"unknown label set '{name_or_path}'; use one of {', '.join(list_label_sets())} or a TSV file path"
    )


def label_set_classifiers(name: str) -> tuple[ClassifierSpec, ...]:
    """The classifiers registered with a label set, without building its classes; none for a TSV file."""
    entry = _REGISTRY.get(name)
    if entry is None or entry.classifiers is None:
        return ()
    return tuple(_resolve(name, entry.classifiers)())
