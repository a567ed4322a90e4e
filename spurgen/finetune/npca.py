"""A class's neural PCA (Spurious ImageNet): the principal components of its last-layer contributions
w_k * phi(x) over real images of the class, fitted by ``spurgen fit-npca`` and read by finetune's ``npca``
SFSL feature (method.md §2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from ..errors import SpurgenError
from ..workspace import atomic_write_bytes

if TYPE_CHECKING:
    from ..classifiers import Classifier

__all__ = ["NeuralPCA"]


@dataclass
class NeuralPCA:
    """A class's neural PCA of last-layer contributions w_k * phi(x) over real images of the class.

    Args:
        mean: mu_k, [D].
        components: V_k, eigenvectors as columns by descending eigenvalue, [D, D].
        eigenvalues: descending, [D].
        classifier: Registry name of the classifier it was fitted with.
        fingerprint: That classifier's fingerprint (weights, preprocessing); finetune checks it.
        class_index: k.
        num_images: Images it was fitted on.
    """

    mean: torch.Tensor
    components: torch.Tensor
    eigenvalues: torch.Tensor
    classifier: str
    fingerprint: str
    class_index: int
    num_images: int

    @classmethod
    def fit(cls, contributions: torch.Tensor, classifier: Classifier, class_index: int) -> "NeuralPCA":
        """Fits mu_k and V_k on contributions [N, D] (float64 eigendecomposition of the covariance)."""
        values = contributions.double()
        mean = values.mean(dim=0)
        centered = values - mean
        covariance = centered.T @ centered / max(len(values) - 1, 1)
        eigenvalues, vectors = torch.linalg.eigh(covariance)  # ascending
        return cls(mean=mean.float(), components=vectors.flip(1).float().contiguous(),
                   eigenvalues=eigenvalues.flip(0).float().contiguous(), classifier=classifier.name,
                   fingerprint=classifier.fingerprint(), class_index=class_index, num_images=len(values))

    def coordinates(self, contributions: torch.Tensor, columns: Sequence[int] | None = None) -> torch.Tensor:
        """alpha_k: ((c - mu_k) @ V_k) * (1^T V_k), over all components or the given ones."""
        vectors = self.components if columns is None else self.components[:, list(columns)]
        return ((contributions - self.mean) @ vectors) * vectors.sum(dim=0)

    def to(self, device: torch.device | str) -> "NeuralPCA":
        """Moves the tensors that :meth:`coordinates` uses to ``device``, in place; returns ``self``."""
        self.mean, self.components = self.mean.to(device), self.components.to(device)
        return self

    def save(self, path: Path) -> None:
        """Writes the fit atomically as safetensors, with the classifier, fingerprint and class as metadata."""
        from safetensors.torch import save

        metadata = {"classifier": self.classifier, "fingerprint": self.fingerprint,
                    "class_index": str(self.class_index), "num_images": str(self.num_images)}
        atomic_write_bytes(path, save({"mean": self.mean, "components": self.components,
                                       "eigenvalues": self.eigenvalues}, metadata=metadata))

    @classmethod
    def load(cls, path: Path) -> "NeuralPCA":
        """Reads a saved fit.

        Raises:
            SpurgenError: the file is missing or not a neural PCA file.
        """
        from safetensors import safe_open

        if not path.is_file():
            raise SpurgenError(f"no neural PCA at {path}; run spurgen fit-npca for the class first")
        try:
            with safe_open(str(path), framework="pt") as handle:
                meta = handle.metadata() or {}
                tensors = {name: handle.get_tensor(name) for name in ("mean", "components", "eigenvalues")}
            return cls(**tensors, classifier=meta["classifier"], fingerprint=meta["fingerprint"],
                       class_index=int(meta["class_index"]), num_images=int(meta["num_images"]))
        except Exception as exc:  # noqa: BLE001 - truncated or foreign files
            raise SpurgenError(f"{path} is not a neural PCA file ({type(exc).__name__}); run spurgen fit-npca "
                               "again") from None
