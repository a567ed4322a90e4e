"""Classifiers with known predictions: random-weight timm models whose last linear layer is solved.

A test that checks what spurgen does with a classifier's outputs needs outputs it knows in advance. Random
features of a few images are linearly independent when there are fewer images than feature dimensions, so a
last layer that maps them to any chosen logits exists, and least squares finds it exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from spurgen.errors import SpurgenError

if TYPE_CHECKING:
    import torch

__all__ = ["solved_head_classifier"]


def solved_head_classifier(arch: str, images: Sequence[Path], logits: torch.Tensor, *, seed: int = 0,
                           atol: float = 1e-2) -> torch.nn.Module:
    """A timm classifier with seeded random weights whose last linear layer gives ``logits`` on ``images``.

    The images go through the preprocessing ``spurgen.classifiers.Classifier`` gives the model, as spurgen
    itself feeds them; the head is solved in float64 with a bias column, then stored in float32.

    Args:
        arch: timm model id built without pretrained weights (``test_resnet.r160_in1k``).
        images: image files, one per row of ``logits``.
        logits: the wanted logits, ``len(images) x num_classes`` (the model's class count follows it).
        seed: seed of the random weights.
        atol: largest difference from ``logits`` the solved model may give.

    Returns:
        The model in eval mode.

    Raises:
        SpurgenError: the logits cannot be reached (more images than the model's features, plus one).
    """
    import timm
    import torch
    from timm.data import resolve_data_config

    from spurgen.classifiers import Classifier, ClassifierSpec
    from spurgen.images import load_rgb

    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=logits.shape[1]).eval()
    wrapper = Classifier(ClassifierSpec("solved", arch), model, resolve_data_config(model=model, use_test_size=True))
    transform = wrapper.transform()
    batch = torch.stack([transform(load_rgb(f)) for f in images])
    with torch.no_grad():
        features = wrapper.penultimate(batch).double()
    target = logits.double()
    # features (N x D+1 with the bias column) @ W^T = target: exact when the N rows are independent (N <= D + 1).
    design = torch.cat([features, torch.ones(len(features), 1, dtype=torch.float64)], dim=1)
    # gelsd (SVD): the default driver of torch 2.2 (our floor) returns a wrong solution for ill-conditioned designs.
    solution = torch.linalg.lstsq(design, target, driver="gelsd").solution
    head = model.get_classifier()
    head.weight.data = solution[:-1].T.float().contiguous()
    head.bias.data = solution[-1].float().contiguous()
    with torch.no_grad():
        reached = wrapper.logits(batch).double()
    if not torch.allclose(reached, target, atol=atol):
        raise SpurgenError(f"{arch}'s head cannot give the wanted logits on {len(images)} images: "
                           f"use at most {features.shape[1] + 1} images")
    return model
