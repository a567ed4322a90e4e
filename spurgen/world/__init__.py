"""A small synthetic world in which the whole method runs on a laptop CPU.

Six shapes, each with a spurious background texture (:mod:`.render`), written as a biased training
split, an unbiased validation split and a spurious set in Spurious ImageNet's layout
(:mod:`.dataset`), with their label set (:mod:`.labels`) and timm classifiers trained on them
(:mod:`.classifiers`). Importing this package registers the ``"world"`` label set and the shipped
classifiers (``--labels world``); torch is not imported until a model is built.
"""

from __future__ import annotations

from ..classifiers import register_classifiers
from . import labels  # noqa: F401  (registers the "world" label set)
from .classifiers import shipped_classifier_specs

register_classifiers("world", shipped_classifier_specs())
