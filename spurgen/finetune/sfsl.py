"""The spurious feature similarity loss (SFSL), its feature s_k, its decoder, and ``spurgen fit-npca`` (method.md §2).

For class k and a classifier with penultimate features phi(x) and last linear layer rows w_k:

- ``contrib`` (default): s_k(x) = w_k * phi(x), the contribution of every feature to the class-k logit.
- ``npca``: Spurious ImageNet's neural PCA coordinates
  alpha_k(x) = ((w_k * phi(x)) - mu_k) @ V_k * (1^T V_k), with mu_k and V_k (eigenvectors, descending
  eigenvalues) fitted on real images of class k by ``spurgen fit-npca``; optionally only the class's
  spurious components.

L_SFSL = 1 - cos(s_k(x_gen), s_k(x_ref)), averaged over rows with a weight per row that depends on its timestep
(``--sfsl-row-weighting``, method.md §2.5). x_gen comes from the training step (decoded one-step estimate,
differentiable); x_ref is the clean reference image of the same row, whose features are computed once.
Images enter as [-1, 1] tensors at the training resolution, exactly as the diffusion model sees them, and
are mapped to the classifier's [0, 1] input here, the same way for x_gen and x_ref. The neural PCA itself
(fit, save, load) is :class:`.npca.NeuralPCA`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F

from .._runtime import dtype_argument, progress_bar, warn
from ..classifiers import Classifier, load_classifiers
from ..config import FitNpcaConfig
from ..errors import SpurgenError
from ..images import UnreadableImage, list_images, load_rgb
from ..labels import ClassInfo, get_label_set
from ..workspace import Workspace
from .diffusion import sfsl_row_weight
from .npca import NeuralPCA

if TYPE_CHECKING:
    from diffusers import AutoencoderTiny

    from ..config import FinetuneConfig
    from ..families import ModelFamily

__all__ = [
    "SpuriousFeature",
    "SpuriousFeatureLoss",
    "to_classifier_input",
    "spurious_feature",
    "fit_npca",
    "NpcaFit",
    "load_sfsl_decoder",
]


def to_classifier_input(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[-1, 1] images at any size -> [0, 1] float32 images at the classifier's input size, differentiably."""
    images = (images.float() / 2 + 0.5).clamp(0, 1)  # resampling kernels lack half precision on some devices
    if tuple(images.shape[-2:]) != tuple(size):
        # Antialiasing matters when 512 px shrink to 224: without it the classifier sees aliased pixels.
        images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    return images


class SpuriousFeature(torch.nn.Module):
    """s_k(x) of one class: the contributions w_k * phi(x), or their neural PCA coordinates.

    Args:
        classifier: The frozen classifier (its last layer must be linear).
        class_index: k.
        npca: The class's neural PCA for the ``npca`` feature; ``None`` for ``contrib``.
        columns: Components of the neural PCA to keep; ``None`` keeps all.
    """

    def __init__(self, classifier: Classifier, class_index: int, npca: NeuralPCA | None = None,
                 columns: Sequence[int] | None = None) -> None:
        super().__init__()
        self.classifier = classifier
        self.register_buffer("weight", classifier.last_linear().weight[class_index].detach().clone())
        self.npca = npca.to(classifier.device) if npca is not None else None
        self.columns = list(columns) if columns is not None else None

    @property
    def input_size(self) -> tuple[int, int]:
        return self.classifier.input_size

    def contributions(self, images: torch.Tensor) -> torch.Tensor:
        """w_k * phi(x) of [0, 1] images at the input size."""
        return self.classifier.penultimate(images) * self.weight

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        contributions = self.contributions(images)
        return contributions if self.npca is None else self.npca.coordinates(contributions, self.columns)


class SpuriousFeatureLoss:
    """L_SFSL of a class over its reference images, applied to rows with timestep <= ``max_timestep`` on every
    ``every``-th optimizer step, each row weighted by ``--sfsl-row-weighting``.

    Args:
        feature: s_k.
        reference_pixels: The reference images [N, 3, H, W] in [-1, 1], as training sees them.
        max_timestep: The bound on t; rows above it get no SFSL (nothing is decoded or classified for them).
        every: SFSL applies on optimizer steps 0, N, 2N, ... (0-based) only; :attr:`scale` compensates.
        row_weighting: ``v-profile`` or ``none`` (:func:`.diffusion.sfsl_row_weight`).
    """

    def __init__(self, feature: SpuriousFeature, reference_pixels: torch.Tensor, max_timestep: int,
                 every: int = 1, row_weighting: str = "v-profile") -> None:
        self.feature = feature
        self.max_timestep = max_timestep
        self.every = every
        self.row_weighting = row_weighting
        # The references never change: their features are computed once, not on every step.
        with torch.no_grad():
            self.reference = feature(to_classifier_input(reference_pixels.to(feature.weight.device),
                                                         feature.input_size)).float()

    def applies(self, step: int) -> bool:
        """Whether SFSL is computed on (0-based) optimizer step ``step``; the first step always has it."""
        return step % self.every == 0

    @property
    def scale(self) -> float:
        """Factor on kappa on the steps SFSL applies to: N. Over N steps the SFSL gradient then sums to what
        N steps with kappa each give, so its expectation per step is the paper's kappa * grad L_SFSL; only the
        variance grows. (Adam and gradient clipping see the larger, rarer term, so N > 1 trades some fidelity
        for speed; the default is 1, the paper's schedule.)"""
        return float(self.every)

    def rows(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Indices of the rows SFSL applies to (of host timesteps: on a device this would wait for it)."""
        return torch.nonzero(timesteps <= self.max_timestep).flatten()

    def distances(self, generated: torch.Tensor, reference_index: torch.Tensor) -> torch.Tensor:
        """1 - cos(s_k(x_gen), s_k(x_ref)) of each row, [R].

        Args:
            generated: x_gen [R, 3, H, W] in [-1, 1], carrying gradients.
            reference_index: The reference image of each row, [R].
        """
        features = self.feature(to_classifier_input(generated, self.feature.input_size)).float()
        return 1 - F.cosine_similarity(features, self.reference[reference_index], dim=1)

    def loss(self, distances: torch.Tensor, scheduler: Any, timesteps: torch.Tensor,
             family: "ModelFamily | None" = None) -> torch.Tensor:
        """L_SFSL of the step: the mean over rows of w_t * distance, w_t by ``row_weighting``.

        The mean is over rows, not normalised by the weights' sum: each row's gradient then depends on its own t
        only, so the profile over t is exactly the weight x the estimate's gain (:func:`.diffusion.sfsl_row_weight`
        x :func:`.diffusion.estimate_gain` on DDPM's parametrizations).

        Args:
            distances: :meth:`distances` of the rows.
            scheduler: The noise scheduler of training.
            timesteps: t of each row, on the distances' device.
            family: The model family, whose parametrization gives w_t
                (:meth:`spurgen.families.ModelFamily.sfsl_row_weight`); ``None``: DDPM's, SD's and SDXL's.
        """
        weight = family.sfsl_row_weight if family is not None else sfsl_row_weight
        return (weight(scheduler, timesteps, self.row_weighting) * distances).mean()


def load_sfsl_decoder(name: str, latent_channels: int, device: torch.device | str,
                      dtype: torch.dtype = torch.float32) -> "AutoencoderTiny":
    """Loads ``--sfsl-decoder``: a diffusers AutoencoderTiny folder or hub id (TAESD), frozen, on ``device``.

    Hub ids go through ``from_pretrained``, so ``HF_HUB_OFFLINE=1`` uses the local cache only.

    Args:
        name: A local folder or a hub id.
        latent_channels: The base model's latent channels, which the decoder must take.
        device: Where SFSL runs.
        dtype: The frozen weights' dtype (the mixed precision's).

    Raises:
        SpurgenError: the folder or id cannot be loaded, is not an AutoencoderTiny, or decodes other latents.
    """
    from diffusers import AutoencoderTiny

    hint = ("give a diffusers AutoencoderTiny folder or hub id (e.g. madebyollin/taesd for SD 1.x/2.x, taesdxl for "
            "SDXL, taef1 for FLUX.1)")
    folder = Path(name).expanduser()
    if folder.is_dir():
        config_file = folder / "config.json"
        try:
            class_name = json.loads(config_file.read_text(encoding="utf-8")).get("_class_name")
        except (OSError, ValueError, AttributeError):
            raise SpurgenError(f"--sfsl-decoder {name}: cannot read {config_file}; {hint}") from None
        if class_name != "AutoencoderTiny":
            raise SpurgenError(f"--sfsl-decoder {name} holds {class_name or 'no model class'}, not an "
                               f"AutoencoderTiny; {hint}")
        name = str(folder)
    elif folder.exists() or name.startswith((".", "/", "~")):
        raise SpurgenError(f"--sfsl-decoder folder {folder} does not exist; {hint}")
    try:
        decoder = AutoencoderTiny.from_pretrained(name, **dtype_argument(dtype))
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, foreign files
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpurgenError(f"cannot load --sfsl-decoder '{name}': {first}; {hint}") from None
    if decoder.config.latent_channels != latent_channels:
        raise SpurgenError(f"--sfsl-decoder '{name}' decodes {decoder.config.latent_channels}-channel latents, the "
                           f"base model makes {latent_channels}; {hint}")
    return decoder.requires_grad_(False).eval().to(device)


def spurious_feature(classifier: Classifier, cls: ClassInfo, config: "FinetuneConfig",
                     workspace: Workspace) -> SpuriousFeature:
    """Builds s_k for finetune's settings, checking everything it needs before training starts.

    Raises:
        SpurgenError: the classifier has no last linear layer or too few outputs, the neural PCA is missing
            or was fitted with another classifier, or the class lists no spurious components.
    """
    classifier.last_linear()  # raises for a head that is not a linear layer
    if cls.index >= classifier.num_classes:
        raise SpurgenError(f"--sfsl-model '{classifier.name}' has {classifier.num_classes} outputs, so no class "
                           f"{cls.index}; choose a classifier of the label set")
    if config.sfsl_feature == "contrib":
        return SpuriousFeature(classifier, cls.index)
    path = workspace.npca_path(classifier.name, cls)
    npca = NeuralPCA.load(path)
    if npca.fingerprint != classifier.fingerprint() or npca.class_index != cls.index:
        raise SpurgenError(f"{path} was fitted with another classifier or class; run spurgen fit-npca --classes "
                           f"{cls.index} --sfsl-model {classifier.name} again")
    columns = None
    if config.sfsl_npca_components == "spurious":
        if not cls.npca_components:
            raise SpurgenError(f"{cls} lists no spurious neural PCA components in the '{config.labels}' label set; "
                               "use --sfsl-npca-components all")
        columns = list(cls.npca_components)
        if max(columns) >= npca.components.shape[1]:
            raise SpurgenError(f"{cls}: component {max(columns)} does not exist in {path} "
                               f"({npca.components.shape[1]} components); use --sfsl-npca-components all")
    return SpuriousFeature(classifier, cls.index, npca, columns)


# --- fit-npca ---------------------------------------------------------------------------------------------------


@dataclass
class NpcaFit:
    """The outcome of fit-npca for one class."""

    cls: ClassInfo
    classifier: str
    path: Path
    num_images: int
    unreadable: int
    dimensions: int
    top_variance: list[float]


def fit_npca(config: FitNpcaConfig, workspace: Workspace, classifier_flags: Sequence[str] = ()) -> NpcaFit:
    """Fits and saves a class's neural PCA from a folder of real images of the class.

    Images are preprocessed by the classifier's own data config (resize and center crop, as Spurious
    ImageNet treats real images).

    Raises:
        SpurgenError: bad input: a missing folder, too few readable images, a classifier without a last
            linear layer; nothing is written then.
    """
    labels = get_label_set(config.labels)
    cls = labels.resolve(config.classes[0])
    folder = Path(config.images or "").expanduser()
    if not folder.is_dir():
        raise SpurgenError(f"image folder {folder} does not exist; check the --images path")
    files = list_images(folder)
    if len(files) < 2:
        raise SpurgenError(f"{folder} has {len(files)} image files; the neural PCA needs at least 2 (ideally hundreds)")
    workspace.ensure_writable()
    classifier = load_classifiers([config.sfsl_model], classifier_flags, labels, workspace.settings(), None,
                                  config.device)[0]
    feature = SpuriousFeature(classifier, cls.index)
    transform = classifier.transform()
    contributions, unreadable = [], 0
    with progress_bar("images") as progress, torch.no_grad():
        task = progress.add_task(f"neural PCA of {cls.name}", total=len(files))
        for start in range(0, len(files), config.batch_size):
            batch = []
            for path in files[start:start + config.batch_size]:
                try:
                    batch.append(transform(load_rgb(path)))
                except UnreadableImage as exc:
                    warn(f"skipped unreadable image {path}: {exc}")
                    unreadable += 1
            if batch:
                contributions.append(feature.contributions(torch.stack(batch).to(classifier.device)).cpu())
            progress.advance(task, len(files[start:start + config.batch_size]))
    values = torch.cat(contributions) if contributions else torch.empty(0)
    if len(values) < 2:
        raise SpurgenError(f"{folder} has fewer than 2 readable images; the neural PCA needs at least 2")
    npca = NeuralPCA.fit(values, classifier, cls.index)
    path = workspace.npca_path(classifier.name, cls)
    npca.save(path)
    share = (npca.eigenvalues / npca.eigenvalues.clamp(min=0).sum().clamp(min=1e-12))[:3]
    return NpcaFit(cls=cls, classifier=classifier.name, path=path, num_images=len(values), unreadable=unreadable,
                   dimensions=int(npca.mean.numel()), top_variance=[round(float(v), 4) for v in share])
