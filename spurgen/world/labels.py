"""The world's label set: six shapes, each with its spurious background texture.

Registered as ``"world"`` in :mod:`spurgen.labels` (with the classifiers of :mod:`.models`), so ``--labels world``
and ``get_label_set("world")`` resolve ``circle``, ``0`` or ``all`` the way ImageNet names resolve for the real
classifiers.
"""

from __future__ import annotations

from ..labels import ClassInfo, LabelSet
from .render import FEATURES, SHAPES

__all__ = ["world_label_set"]


def world_label_set() -> LabelSet:
    """Class ``i`` is ``SHAPES[i]`` with spurious feature ``FEATURES[i]``; ``all`` is every class."""
    classes = {index: ClassInfo(index=index, name=shape, spurious_feature=feature)
               for index, (shape, feature) in enumerate(zip(SHAPES, FEATURES, strict=True))}
    return LabelSet(name="world", classes=classes, default_indices=tuple(classes))
