"""The world's classifiers: small timm models trained on the biased split, one of them robust.

Each architecture is trained from scratch on the biased training split, then saved in timm's own
Hugging Face folder format (``config.json`` + ``model.safetensors``), reloaded through
``timm.create_model("local-dir:" + folder, pretrained=True)`` — the path real classifiers take — and
measured from the reloaded weights: accuracy on the unbiased validation split and spurious accuracy
on the spurious set. One ResNet is trained adversarially (L2 PGD) to serve as the SFSL model.

The architectures and where trained models are found are in :mod:`.models`. torch and timm are imported inside
the functions, so importing this module stays light.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import require, setting
from ..workspace import atomic_directory, atomic_write_json, environment_versions, read_json
from .dataset import MANIFEST_FILE, load_split, spurious_set
from .models import ARCHITECTURES, METRICS_FILE, WorldArchitecture
from .render import SHAPES

if TYPE_CHECKING:
    import torch

__all__ = [
    "ClassifierTrainConfig",
    "create_classifier",
    "load_world_classifier",
    "save_classifier",
    "train_classifier",
    "train_world_classifiers",
    "world_predictions",
]

# The world's images are generated whole, never cropped; mean/std 0.5 maps [0, 1] to [-1, 1].
_MEAN = _STD = (0.5, 0.5, 0.5)


@dataclass
class ClassifierTrainConfig:
    """Settings of the world's classifier training."""

    batch_size: int = setting(128, "Images per optimiser step.")
    epoch_scale: float = setting(1.0, "Multiplies every architecture's epoch count (below 1 for a quick build).")
    max_steps: int | None = setting(None, "Stops each model after this many optimiser steps (smoke tests).")
    weight_decay: float = setting(0.05, "AdamW weight decay.")
    pgd_eps: float = setting(0.5, "L2 radius of the PGD attack of robust training, in [0, 1] pixel units.")
    pgd_steps: int = setting(2, "PGD steps per training batch of the robust model.")
    seed: int = setting(0, "Seed of initialisation, batch order and augmentation.")
    threads: int = setting(1, "CPU threads; two PyTorch jobs on 2 cores slow each other down badly.")
    half: bool = setting(True, "Store weights in float16 (half the size; accuracy is measured after the round trip).")

    def validate(self) -> None:
        require(self.batch_size >= 1, f"batch size must be at least 1, got {self.batch_size}")
        require(self.epoch_scale > 0, f"epoch scale must be positive, got {self.epoch_scale}")
        require(self.max_steps is None or self.max_steps >= 1, f"max steps must be at least 1, got {self.max_steps}")
        require(self.pgd_eps > 0 and self.pgd_steps >= 1, "PGD needs a positive radius and at least one step")
        require(self.threads >= 1, f"threads must be at least 1, got {self.threads}")


def create_classifier(spec: WorldArchitecture, image_size: int) -> torch.nn.Module:
    """A randomly initialised classifier for the world's classes, with the world's preprocessing config."""
    import timm

    args = dict(spec.model_args)
    if spec.arch.startswith("vit"):
        args["img_size"] = image_size  # a ViT fixes its input size (position embeddings) when built
    # None drops the ImageNet tag's provenance and test-time settings from the exported config.
    overlay = {"tag": "world", "hf_hub_id": None, "url": None, "license": None, "test_input_size": None,
               "test_crop_pct": None, "input_size": (3, image_size, image_size), "interpolation": "bicubic",
               "crop_pct": 1.0, "crop_mode": "center", "mean": _MEAN, "std": _STD}
    return timm.create_model(spec.arch, pretrained=False, num_classes=len(SHAPES),
                             pretrained_cfg_overlay=overlay, **args)


def _normalise(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] NCHW -> the models' input."""
    import torch

    mean = torch.tensor(_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_STD).view(1, 3, 1, 1)
    return (images - mean) / std


def _pgd_l2(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, eps: float,
            steps: int) -> torch.Tensor:
    """L2 PGD from a random start inside the ball, images in [0, 1]."""
    import torch
    import torch.nn.functional as F

    def project(delta: torch.Tensor) -> torch.Tensor:
        norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return delta * (eps / norms).clamp(max=1.0)

    step = 2.5 * eps / steps
    delta = project(torch.randn_like(images) * eps / images[0].numel() ** 0.5)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = F.cross_entropy(model(_normalise((images + delta).clamp(0, 1))), labels)
        (grad,) = torch.autograd.grad(loss, delta)
        grad = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        delta = project(delta.detach() + step * grad)
    return (images + delta).clamp(0, 1).detach()


def train_classifier(spec: WorldArchitecture, images: np.ndarray, labels: np.ndarray, config: ClassifierTrainConfig,
                     progress: Callable[[str], None] | None = None) -> torch.nn.Module:
    """Trains one classifier from scratch.

    Args:
        spec: The architecture and its schedule.
        images: ``uint8`` training images ``(N, H, W, 3)``.
        labels: Their class indices ``(N,)``.
        config: Batch size, epochs, robust training and seed.
        progress: Called with a one-line status after each epoch.

    Returns:
        The trained model, in eval mode.
    """
    import torch
    import torch.nn.functional as F

    config.validate()
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    data = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    targets = torch.from_numpy(labels)
    model = create_classifier(spec, images.shape[1])
    batches = max(1, len(data) // config.batch_size)  # drops the last partial batch
    epochs = max(1, round(spec.epochs * config.epoch_scale))
    total = min(epochs * batches, config.max_steps or epochs * batches)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=spec.lr, total_steps=total, pct_start=0.15)
    step = 0
    model.train()
    while step < total:
        order = torch.randperm(len(data), generator=generator)
        correct = 0
        for batch in range(batches):
            index = order[batch * config.batch_size:(batch + 1) * config.batch_size]
            x = data[index].float() / 255
            # A half turn keeps every texture (also the diagonal stripes) and every shape in the world.
            turn = torch.rand(len(x), generator=generator) < 0.5
            x = torch.where(turn.view(-1, 1, 1, 1), x.flip(2, 3), x)
            y = targets[index]
            if spec.robust:
                model.eval()  # attack the model as it is, without touching BatchNorm statistics
                x = _pgd_l2(model, x, y, config.pgd_eps, config.pgd_steps)
                model.train()
            logits = model(_normalise(x))
            loss = F.cross_entropy(logits, y, label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            correct += int((logits.argmax(1) == y).sum())
            step += 1
            if step >= total:
                break
        if progress:
            progress(f"{spec.name}: step {step}/{total}, train acc {correct / ((batch + 1) * config.batch_size):.3f}")
    return model.eval()


def save_classifier(model: torch.nn.Module, folder: Path, half: bool = True) -> None:
    """Writes ``config.json`` + ``model.safetensors`` (timm's Hugging Face layout), replacing ``folder`` atomically."""
    import copy

    import timm

    exported = copy.deepcopy(model).half() if half else model
    with atomic_directory(folder) as staging:
        timm.models.save_for_hf(exported, staging, model_config={"label_names": list(SHAPES)},
                                safe_serialization=True)
        # The staging folder is private (mkdtemp); shipped weights must be readable by every user.
        staging.chmod(0o755)
        for path in staging.iterdir():
            path.chmod(0o644)


def load_world_classifier(folder: Path) -> torch.nn.Module:
    """Loads a saved world classifier as a bare timm model (``local-dir:`` source), in float32 eval mode.

    Training and measuring use the bare model on the world's arrays; the commands load the same folder as a
    :class:`spurgen.classifiers.Classifier` instead.
    """
    import timm

    return timm.create_model(f"local-dir:{folder}", pretrained=True).float().eval()


def world_predictions(model: torch.nn.Module, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Class predictions for ``uint8`` images ``(N, H, W, 3)``."""
    import torch

    outputs = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(images[start:start + batch_size]).permute(0, 3, 1, 2).float() / 255
            outputs.append(model(_normalise(x)).argmax(1).numpy())
    return np.concatenate(outputs)


def _robust_accuracy(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray,
                     config: ClassifierTrainConfig) -> float:
    """Accuracy under the training attack with twice the steps, on the given images."""
    import torch

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(labels)
    adversarial = _pgd_l2(model, x, y, config.pgd_eps, 2 * config.pgd_steps)
    with torch.inference_mode():
        return float((model(_normalise(adversarial)).argmax(1) == y).float().mean())


def _same_training(recorded: Any, training: dict[str, Any]) -> bool:
    """Whether a saved model was trained with these settings; the thread count is how, not what, so it is ignored."""
    def comparable(value: Any) -> Any:
        # JSON round trip so tuples compare equal to the lists read back.
        value = json.loads(json.dumps(value))
        if isinstance(value, dict) and isinstance(value.get("config"), dict):
            value["config"].pop("threads", None)
        return value

    return comparable(recorded) == comparable(training)


def train_world_classifiers(world: Path, out_dir: Path, config: ClassifierTrainConfig | None = None,
                            names: Sequence[str] | None = None, progress: Callable[[str], None] = print,
                            kept_from: Sequence[Path] = ()) -> dict[str, Any]:
    """Trains the world's classifiers into ``out_dir/<name>/`` and measures them.

    A model whose folder (in ``out_dir``, else in ``kept_from``) already holds metrics of the same training
    settings is kept, so an interrupted build resumes with the next model and shipped models are not retrained.

    Args:
        world: A world folder written by :func:`spurgen.world.dataset.build_world`.
        out_dir: Where each classifier's folder goes; ``metrics.json`` there sums them up.
        config: Training settings.
        names: Architectures to train (default: all of :data:`ARCHITECTURES`).
        progress: Receives one-line status messages.
        kept_from: Further folders of classifier folders, read only (the shipped assets).

    Returns:
        The summary written to ``out_dir/metrics.json``.
    """
    import torch

    config = config or ClassifierTrainConfig()
    config.validate()
    torch.set_num_threads(config.threads)
    chosen = [a for a in ARCHITECTURES if names is None or a.name in names]
    require(bool(chosen), f"no world classifier named {', '.join(names or [])}; "
                          f"choose from {', '.join(a.name for a in ARCHITECTURES)}")
    world_config = read_json(Path(world) / MANIFEST_FILE)["config"]
    train_images, train_labels = load_split(world, "train")
    val_images, val_labels = load_split(world, "val")
    spurious_images, spurious_labels = spurious_set(world)
    summary: dict[str, Any] = {"models": {}}
    spurious_hits: dict[str, np.ndarray] = {}
    for spec in chosen:
        folder = Path(out_dir) / spec.name
        training = {"architecture": asdict(spec), "config": asdict(config), "world": world_config}
        previous = [Path(root) / spec.name / METRICS_FILE for root in (out_dir, *kept_from)]
        trained = next((path for path in previous
                        if path.is_file() and _same_training(read_json(path).get("training"), training)), None)
        if trained is not None:
            progress(f"{spec.name}: already trained with these settings in {trained.parent}, kept")
            metrics = read_json(trained)
        else:
            progress(f"{spec.name}: training {spec.arch} ({'L2 PGD' if spec.robust else 'standard'})")
            started = time.perf_counter()
            model = train_classifier(spec, train_images, train_labels, config, progress)
            seconds = time.perf_counter() - started
            save_classifier(model, folder, config.half)
            metrics = _measure(spec, folder, val_images, val_labels, spurious_images, spurious_labels, config)
            metrics.update(train_seconds=round(seconds, 1), training=training, versions=environment_versions())
            atomic_write_json(folder / METRICS_FILE, metrics)
        spurious_hits[spec.name] = np.array(metrics["spurious_predictions"]) == spurious_labels
        summary["models"][spec.name] = {k: metrics[k] for k in ("arch", "robust", "params", "train_seconds", "val_acc",
                                                               "val_acc_under_pgd", "spurious_acc", "size_bytes")}
        progress(f"{spec.name}: val acc {metrics['val_acc']:.3f}, spurious acc {metrics['spurious_acc']:.3f}")
    standard = [name for name in spurious_hits if not summary["models"][name]["robust"]]
    summary["spurious_all_standard_agree"] = float(np.all([spurious_hits[n] for n in standard], axis=0).mean())
    summary["spurious_all_agree"] = float(np.all(list(spurious_hits.values()), axis=0).mean())
    atomic_write_json(Path(out_dir) / METRICS_FILE, summary)
    return summary


def _measure(spec: WorldArchitecture, folder: Path, val_images: np.ndarray, val_labels: np.ndarray,
             spurious_images: np.ndarray, spurious_labels: np.ndarray, config: ClassifierTrainConfig) -> dict[str, Any]:
    """Metrics of a saved classifier, reloaded as users load it: accuracies, size, robust accuracy."""
    model = load_world_classifier(folder)
    spurious = world_predictions(model, spurious_images)
    hits = spurious == spurious_labels
    metrics: dict[str, Any] = {
        "arch": spec.arch,
        "robust": spec.robust,
        "params": sum(p.numel() for p in model.parameters()),
        "size_bytes": (folder / "model.safetensors").stat().st_size,
        "val_acc": float((world_predictions(model, val_images) == val_labels).mean()),
        "spurious_acc": float(hits.mean()),
        "spurious_acc_per_class": {SHAPES[c]: float(hits[spurious_labels == c].mean()) for c in range(len(SHAPES))},
        "spurious_predictions": spurious.tolist(),
    }
    # On a fixed slice, for every model: the standard ones show what the attack does without robust training.
    metrics["val_acc_under_pgd"] = _robust_accuracy(model, val_images[:300], val_labels[:300], config)
    return metrics

