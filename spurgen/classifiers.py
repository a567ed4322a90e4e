"""Classifiers: named configurations, parsing of ``NAME=ARCH@PATH``, and loading.

Each label set is registered with its classifiers (:func:`spurgen.labels.register_label_set`); ImageNet's
are the paper's four (``rn50-v1``, ``rn50-v2``, ``vit-b16``, ``robust-rn50``). Users add or override entries
with ``--classifier NAME=ARCH`` (a timm or hub id) or ``NAME=ARCH@PATH`` (a local safetensors file, timm
checkpoint, torchvision state dict, or a timm model folder), in the ``[classifiers]`` table of
``spurgen.toml``, or from code with :func:`register_classifiers`.

A loaded :class:`Classifier` takes images in [0, 1] at its input size and normalises them itself,
so the same module serves batched prediction and the differentiable spurious feature loss.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ._runtime import progress_bar, resolve_device
from .config import CROP_POLICIES
from .errors import SpurgenError
from .labels import LabelSet, label_set_classifiers
from .workspace import safe_name

if TYPE_CHECKING:
    import torch
    from PIL import Image

__all__ = [
    "ClassifierSpec",
    "classifier_records",
    "Classifier",
    "builtin_classifiers",
    "imagenet_classifiers",
    "register_classifiers",
    "parse_classifier",
    "resolve_classifiers",
    "load_classifier",
    "load_state_dict_file",
    "load_classifiers",
    "protocol_crop",
    "ROBUST_RN50_TEMPERATURE",
    "SPURIOUS_IMAGENET_CROP",
    "SPURIOUS_IMAGENET_VAL_CROP",
]

_EXAMPLE = "robust-rn50=resnet50@~/weights/l2_improved_3_ep.pt"
# Spurious ImageNet's own value (dataset/spurious_score.py), in full: rounding it changes every probability.
ROBUST_RN50_TEMPERATURE = 0.7155761122703552
# Spurious ImageNet's preprocessing (their imagenet_augmentation.py), as two more crop policies of a Classifier:
# spurious images resized whole, bicubic ('no_crop'); real (ImageNet validation) images resized to 256/224 of the
# input size, bicubic, then center-cropped ('test').
SPURIOUS_IMAGENET_CROP = "spurious-imagenet"
SPURIOUS_IMAGENET_VAL_CROP = "spurious-imagenet-val"


@dataclass(frozen=True)
class ClassifierSpec:
    """A named classifier configuration.

    Args:
        name: Registry name, used in tables, reports and cache paths.
        arch: timm model id (``resnet50.tv_in1k``), ``hf-hub:ORG/NAME``, or ``local-dir:FOLDER``.
            Its pretrained tag also selects the preprocessing (input size, crop, mean/std).
        path: Local weights: a ``.safetensors``/``.pt``/``.pth``/``.bin`` state dict or a timm
            model folder (``config.json`` + ``model.safetensors``). ``None`` loads ``arch``'s
            pretrained weights through timm (the hub, or its cache when offline).
        needs_path: The weights are not on any hub, so ``path`` must be given.
        crop: ``center`` or ``none`` to override the crop policy of the model's data config.
        temperature: Logits are divided by it (Spurious ImageNet's robust ResNet-50 uses 0.7155761122703552).
        description: One line for ``spurgen classifiers`` and reports.
    """

    name: str
    arch: str
    path: str | None = None
    needs_path: bool = False
    crop: str | None = None
    temperature: float = 1.0
    description: str = ""

    def with_override(self, arch: str | None = None, path: str | None = None, **fields: Any) -> "ClassifierSpec":
        """This entry with a user's ARCH/PATH; a bare architecture keeps the registered pretrained tag.

        ``robust-rn50=resnet50@FILE`` therefore keeps ``resnet50.tv_in1k``'s preprocessing (224 px,
        crop 0.875) instead of timm's default tag for ``resnet50`` (288 px test size).
        """
        if arch and "." not in arch and ":" not in arch and self.arch.split(".")[0] == arch:
            arch = self.arch
        return dataclasses.replace(self, arch=arch or self.arch, path=path if path is not None else self.path,
                                   **{k: v for k, v in fields.items() if v is not None})


def imagenet_classifiers() -> tuple[ClassifierSpec, ...]:
    """The paper's four ImageNet classifiers, registered with the ``imagenet`` label set."""
    return (
        ClassifierSpec("rn50-v1", "resnet50.tv_in1k",
                       description="ResNet-50, torchvision IMAGENET1K_V1 (76.1% top-1)"),
        ClassifierSpec("rn50-v2", "resnet50.tv2_in1k",
                       description="ResNet-50, torchvision IMAGENET1K_V2 (80.9% top-1)"),
        ClassifierSpec("vit-b16", "vit_base_patch16_224.augreg_in21k_ft_in1k",
                       description="ViT-B/16 AugReg, ImageNet-21k pre-trained, fine-tuned on ImageNet-1k"),
        ClassifierSpec("robust-rn50", "resnet50.tv_in1k", needs_path=True,
                       temperature=ROBUST_RN50_TEMPERATURE,
                       description="adversarially robust ResNet-50 of Spurious ImageNet (l2_improved_3_ep.pt)"),
    )


# Classifiers added from code to a label set's own, by label set name (register_classifiers).
_ADDED: dict[str, dict[str, ClassifierSpec]] = {}


def register_classifiers(label_set: str, specs: Sequence[ClassifierSpec]) -> None:
    """Adds classifiers to a label set's built-in ones (``all`` selects them by default).

    Args:
        label_set: Name of the label set (registered or not).
        specs: Entries that extend, or by name replace, the classifiers registered with the label set.
    """
    _ADDED.setdefault(label_set, {}).update({spec.name: spec for spec in specs})


def builtin_classifiers(label_set: str) -> dict[str, ClassifierSpec]:
    """The classifiers of a label set (the paper's four for ``imagenet``), then those added to it."""
    return {**{spec.name: spec for spec in label_set_classifiers(label_set)}, **_ADDED.get(label_set, {})}


def _split_arch_path(text: str) -> tuple[str, str | None]:
    arch, sep, path = text.partition("@")
    return arch.strip(), (path.strip() if sep else None)


def parse_classifier(text: str, known: Mapping[str, ClassifierSpec]) -> ClassifierSpec:
    """Parses ``NAME=ARCH`` or ``NAME=ARCH@PATH``; a known NAME is updated, not replaced.

    Raises:
        SpurgenError: malformed text, an unsafe name, or an empty ARCH or PATH.
    """
    name, sep, rest = text.partition("=")
    name = name.strip()
    arch, path = _split_arch_path(rest)
    if not sep or not name or (not arch and name not in known) or path == "":
        raise SpurgenError(f"bad classifier {text!r}; write NAME=ARCH or NAME=ARCH@PATH, e.g. {_EXAMPLE}")
    safe_name(name, "classifier name")
    if name in known:
        return known[name].with_override(arch or None, path)
    return ClassifierSpec(name=name, arch=arch, path=path, description=f"{arch} (user-defined)")


def _spec_from_table(name: str, value: Any, known: Mapping[str, ClassifierSpec]) -> ClassifierSpec:
    where = f"spurgen.toml: [classifiers] {name}"
    if isinstance(value, str):
        return parse_classifier(f"{name}={value}", known)
    if not isinstance(value, Mapping):
        raise SpurgenError(f"{where}: expected \"ARCH@PATH\" or a table with arch, path, crop, temperature")
    unknown = set(value) - {"arch", "path", "crop", "temperature", "description"}
    if unknown:
        raise SpurgenError(f"{where}: unknown key '{sorted(unknown)[0]}'; known keys: arch, path, crop, temperature, "
                           "description")
    base = known.get(name) or ClassifierSpec(name=safe_name(name, "classifier name"), arch=str(value.get("arch", "")))
    if not base.arch and not value.get("arch"):
        raise SpurgenError(f"{where}: 'arch' is missing; give a timm model id such as resnet50.tv_in1k")
    temperature = value.get("temperature")
    if temperature is not None and (not isinstance(temperature, (int, float)) or not temperature > 0):
        raise SpurgenError(f"{where}: temperature must be a positive number, got {temperature!r}")
    return base.with_override(value.get("arch"), value.get("path"), crop=value.get("crop"),
                              temperature=float(temperature) if temperature is not None else None,
                              description=value.get("description"))


def configured_classifiers(label_set: str, table: Mapping[str, Any] | None = None,
                           flags: Sequence[str] = ()) -> dict[str, ClassifierSpec]:
    """The built-ins of the label set, updated by ``[classifiers]`` of spurgen.toml, then by flags."""
    specs = builtin_classifiers(label_set)
    for name, value in (table or {}).items():
        specs[name] = _spec_from_table(name, value, specs)
    for text in flags:
        spec = parse_classifier(text, specs)
        specs[spec.name] = spec
    return specs


def resolve_classifiers(names: Sequence[str], label_set: str, table: Mapping[str, Any] | None = None,
                        flags: Sequence[str] = ()) -> list[ClassifierSpec]:
    """The classifiers a command uses, checked for what is needed to load them.

    Args:
        names: Registry names or ``all`` (every configured classifier).
        label_set: The label set whose built-in classifiers are known by name.
        table: The ``[classifiers]`` table of spurgen.toml.
        flags: ``--classifier NAME=ARCH[@PATH]`` values.

    Raises:
        SpurgenError: an unknown name, an entry whose weight file is required but not given, or a
            bad crop policy.
    """
    specs = configured_classifiers(label_set, table, flags)
    chosen: dict[str, ClassifierSpec] = {}
    for name in names:
        if name == "all":
            chosen.update(specs)
        elif name in specs:
            chosen[name] = specs[name]
        else:
            raise SpurgenError(f"unknown classifier '{name}'; choose from {', '.join(specs) or 'none'} "
                               "or define it with --classifier NAME=ARCH[@PATH]")
    if not chosen:
        raise SpurgenError("no classifier selected; pass --classifiers NAME[,NAME...] or --classifier NAME=ARCH[@PATH]")
    for spec in chosen.values():
        if spec.needs_path and not spec.path:
            raise SpurgenError(
                f"classifier '{spec.name}' needs its weight file; pass --classifier {spec.name}=ARCH@PATH "
                f"(e.g. {_EXAMPLE}) or leave it out of --classifiers")
        if spec.crop not in (None, *CROP_POLICIES):
            raise SpurgenError(f"classifier '{spec.name}': crop must be 'center' or 'none', got {spec.crop!r}")
    return list(chosen.values())


def _strip_prefixes(state: dict[str, "torch.Tensor"]) -> dict[str, "torch.Tensor"]:
    # DataParallel and robustness-library checkpoints wrap the network ("module.model.conv1.weight")
    # and carry the attacker's copy and a normaliser; keep only the plain network.
    state = {
        k: v
        for k, v in state.items()
        if not k.startswith(("module.attacker.", "attacker.", "module.normalizer.", "normalizer."))
    }
    for prefix in ("module.model.", "module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def load_state_dict_file(path: Path) -> dict[str, "torch.Tensor"]:
    """Reads a state dict without unpickling code: safetensors, or ``torch.load(weights_only=True)``.

    Checkpoints that wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped.

    Raises:
        SpurgenError: the file is missing, unreadable, or holds anything but tensors.
    """
    import pickle

    import torch
    from safetensors.torch import load_file

    if not path.is_file():
        raise SpurgenError(f"weight file {path} does not exist; check the PATH part of NAME=ARCH@PATH")
    try:
        if path.suffix == ".safetensors":
            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise SpurgenError(f"{path} holds more than tensors and is refused (safe loading: {str(exc).splitlines()[0]}); "
                           "convert it to safetensors or a plain state dict") from None
    except Exception as exc:  # noqa: BLE001 - any parse failure of a user file is a user error
        raise SpurgenError(f"cannot read weights from {path} ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}); "
                           "give a safetensors file or a torch state dict") from None
    for key in ("state_dict_ema", "state_dict", "model_state_dict", "model", "params"):  # params: pyiqa
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SpurgenError(f"{path} is not a state dict of tensors; give a safetensors file or a torch state dict")
    return _strip_prefixes(state)


def _classifier_key(model: Any) -> str:
    return model.pretrained_cfg.get("classifier", "fc")


def _model_holding(arch: str, state: dict[str, Any]) -> tuple[Any, Any]:
    """A timm model of ``arch`` with ``state`` loaded (``strict=False``), and the load's missing/unexpected keys.

    The model is built on the meta device and takes the loaded tensors as its own, which skips the random
    initialisation that they replace (ResNet-50: 0.22 s -> 0.04 s; ViT-B/16: 0.87 s -> 0.07 s on one CPU thread).
    A model that cannot be built there, or that keeps a buffer outside its state dict (a non-persistent index
    table), is built the ordinary way instead.
    """
    import itertools

    import torch

    # fp32 like an ordinary build, whatever precision the file was saved in.
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        with torch.device("meta"):
            model = _model_for_state(arch, state)
        result = model.load_state_dict(state, strict=False, assign=True)
        if not any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
            return model, result
    except Exception:  # noqa: BLE001 - e.g. an architecture that computes with tensors while it is built
        pass
    model = _model_for_state(arch, state)
    return model, model.load_state_dict(state, strict=False)


def _model_for_state(arch: str, state: dict[str, Any]) -> Any:
    """The timm model of ``arch``, with as many classes as the state's classifier head has."""
    import timm

    model = timm.create_model(arch, pretrained=False)
    head = state.get(f"{_classifier_key(model)}.weight")
    if head is not None and head.shape[0] != model.num_classes:
        model = timm.create_model(arch, pretrained=False, num_classes=head.shape[0])
    return model


def _create_timm_model(spec: ClassifierSpec) -> Any:
    import timm

    try:
        if spec.path and Path(spec.path).expanduser().is_dir():
            folder = Path(spec.path).expanduser()
            if not (folder / "config.json").is_file():
                raise SpurgenError(f"classifier '{spec.name}': {folder} has no config.json; give a timm model folder "
                                   "or a weight file")
            return timm.create_model(f"local-dir:{folder}", pretrained=True)
        if spec.path:
            path = Path(spec.path).expanduser()
            state = load_state_dict_file(path)
            model, result = _model_holding(spec.arch, state)
            if result.missing_keys or result.unexpected_keys:
                detail = ", ".join(
                    [f"missing {k}" for k in result.missing_keys[:2]]
                    + [f"unexpected {k}" for k in result.unexpected_keys[:2]]
                )
                raise SpurgenError(
                    f"classifier '{spec.name}': {path} does not fit architecture {spec.arch} ({detail}); "
                    "check the ARCH part of NAME=ARCH@PATH")
            return model
        return timm.create_model(spec.arch, pretrained=True)
    except SpurgenError:
        raise
    except RuntimeError as exc:
        if "size mismatch" in str(exc):
            raise SpurgenError(f"classifier '{spec.name}': weights do not fit architecture {spec.arch} "
                               f"({str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else exc}); "
                               "check the ARCH part of NAME=ARCH@PATH") from None
        raise SpurgenError(f"cannot load classifier '{spec.name}' ({spec.arch}): {str(exc).splitlines()[0]}; "
                           f"download its weights and pass --classifier {spec.name}={spec.arch}@PATH") from None
    except Exception as exc:  # noqa: BLE001 - unknown model names, hub and network failures
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpurgenError(f"cannot load classifier '{spec.name}' ({spec.arch}): {first}; check the timm id, or "
                           "download "
                           "the weights on a machine with network and pass --classifier "
                           f"{spec.name}={spec.arch.split(':')[-1]}@PATH") from None


class Classifier:
    """A loaded classifier: a timm model plus its preprocessing.

    Images enter as float tensors in [0, 1] at :attr:`input_size`; normalisation and the logit
    temperature happen inside :meth:`logits`, so the path from pixels to logits is differentiable.

    Args:
        spec: The configuration it was loaded from.
        model: The timm model, in eval mode.
        data_config: timm's resolved data config (input size, interpolation, crop, mean, std).
        crop: Override of the crop policy (``center``, ``none``, or Spurious ImageNet's ``spurious-imagenet`` and
            ``spurious-imagenet-val``); ``None`` keeps the data config's.
    """

    def __init__(self, spec: ClassifierSpec, model: Any, data_config: dict[str, Any], crop: str | None = None) -> None:
        import torch

        self.spec = spec
        self.model = model.eval().requires_grad_(False)
        self.data_config = data_config
        self.crop = crop or spec.crop or ("center" if data_config.get("crop_pct", 1.0) < 1.0 else "none")
        self.input_size: tuple[int, int] = tuple(data_config["input_size"][1:])  # type: ignore[assignment]
        self.mean = torch.tensor(data_config["mean"]).view(1, 3, 1, 1)
        self.std = torch.tensor(data_config["std"]).view(1, 3, 1, 1)
        self._fingerprint: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def device(self) -> "torch.device":
        return next(self.model.parameters()).device

    def to(self, device: "torch.device | str") -> "Classifier":
        self.model.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        return self

    def transform(self) -> Callable[["Image.Image"], "torch.Tensor"]:
        """PIL RGB image -> [0, 1] tensor at the input size, by the crop policy.

        ``center`` resizes and center-crops as the model was evaluated (crop_pct from its data
        config); ``none`` resizes the whole image to the input size without cropping, with the model's
        interpolation; ``spurious-imagenet`` and ``spurious-imagenet-val`` are Spurious ImageNet's own.
        """
        if self.crop in (SPURIOUS_IMAGENET_CROP, SPURIOUS_IMAGENET_VAL_CROP):
            return self._spurious_imagenet_transform()
        from timm.data import create_transform

        config = dict(self.data_config, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
        if self.crop == "none":
            config.update(crop_pct=1.0, crop_mode="squash")
        return create_transform(**config, is_training=False)

    def _spurious_imagenet_transform(self) -> Callable[["Image.Image"], "torch.Tensor"]:
        """Spurious ImageNet's evaluation input: ``no_crop`` for spurious images, ``test`` for real ones.

        Their ``Resize(size)`` scales the shorter side; ours gives the full input size, which is the same for
        square images (theirs all are) and keeps a non-square one batchable and valid for a ViT.
        """
        from torchvision import transforms

        height, width = self.input_size
        bicubic = transforms.InterpolationMode.BICUBIC
        if self.crop == SPURIOUS_IMAGENET_VAL_CROP:
            # int(256 / 224 * size) exactly as they compute it: 256 for 224 px, 329 for 288 px.
            steps = [transforms.Resize(int(256 / 224 * height), interpolation=bicubic),
                     transforms.CenterCrop((height, width))]
        else:
            steps = [transforms.Resize((height, width), interpolation=bicubic)]
        return transforms.Compose([*steps, transforms.ToTensor()])

    def preprocessed_as(self, crop: str) -> "Classifier":
        """The same model (shared, not copied) with another crop policy, e.g. for a protocol's real images."""
        twin = copy.copy(self)
        twin.crop, twin._fingerprint = crop, None
        return twin

    def normalize(self, images: "torch.Tensor") -> "torch.Tensor":
        return (images - self.mean) / self.std

    def logits(self, images: "torch.Tensor") -> "torch.Tensor":
        """Logits (divided by the temperature) of [0, 1] images at the input size."""
        return self.model(self.normalize(images)) / self.spec.temperature

    def penultimate(self, images: "torch.Tensor") -> "torch.Tensor":
        """phi(x): the input of the last linear layer (method.md §2, Eq. 4)."""
        features = self.model.forward_features(self.normalize(images))
        return self.model.forward_head(features, pre_logits=True)

    def last_linear(self) -> "torch.nn.Linear":
        """The final linear layer whose rows w_k define the class-k contributions.

        Raises:
            SpurgenError: the model ends in something else (e.g. a convolution head).
        """
        import torch

        head = self.model.get_classifier()
        if not isinstance(head, torch.nn.Linear):
            raise SpurgenError(f"classifier '{self.name}' has no last linear layer ({type(head).__name__}); "
                               "choose another --sfsl-model, e.g. a ResNet")
        return head

    def fingerprint(self) -> str:
        """A hash of everything that determines this classifier's outputs, the prediction cache key."""
        if self._fingerprint is None:
            self._fingerprint = self._compute_fingerprint()
        return self._fingerprint

    def _compute_fingerprint(self) -> str:
        weights = self.spec.path
        if weights:
            path = Path(weights).expanduser()
            files = sorted(path.rglob("*")) if path.is_dir() else [path]
            from .images import file_sha256

            weights = ",".join(file_sha256(f) for f in files if f.is_file())
        payload = json.dumps(
            {
                "arch": self.spec.arch,
                "weights": weights,
                "crop": self.crop,
                "temperature": self.spec.temperature,
                "data": {k: self.data_config[k] for k in sorted(self.data_config)},
            },
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_classifier(spec: ClassifierSpec, *, crop: str | None = None, device: "torch.device | "
                                                                              "str" = "cpu") -> Classifier:
    """Builds the model of a spec with its weights and preprocessing.

    Args:
        spec: The classifier configuration.
        crop: Crop policy override for this command (``--crop``); ``None`` keeps the spec's.
        device: Where the model runs.

    Raises:
        SpurgenError: weights missing, unreachable, unsafe, or of another architecture.
    """
    from timm.data import resolve_data_config

    model = _create_timm_model(spec)
    # use_test_size: torchvision's V2 weights were trained at 176 px but are evaluated at 224.
    data_config = resolve_data_config(model=model, use_test_size=True)
    return Classifier(spec, model, data_config, crop=crop).to(device)


def load_classifiers(names: Sequence[str], flags: Sequence[str], labels: LabelSet, settings: dict[str, Any],
                     crop: str | None, device: str) -> list[Classifier]:
    """Resolves and loads the classifiers a command uses, with a progress bar.

    Raises:
        SpurgenError: an unknown or unloadable classifier, or one whose outputs do not match the label set.
    """
    specs = resolve_classifiers(names, labels.name, settings.get("classifiers"), flags)
    target = resolve_device(device)
    loaded = []
    with progress_bar("models") as progress:
        task = progress.add_task("loading classifiers", total=len(specs))
        for spec in specs:
            classifier = load_classifier(spec, crop=crop, device=target)
            if classifier.num_classes < labels.num_classes:
                raise SpurgenError(f"classifier '{spec.name}' has {classifier.num_classes} outputs but the "
                                   f"'{labels.name}' label set needs {labels.num_classes}; check --labels or the "
                                   "classifier")
            loaded.append(classifier)
            progress.advance(task)
    return loaded


def protocol_crop(protocol: str, crop: str | None) -> str | None:
    """The crop policy classifiers are loaded with under a ``--protocol``: Spurious ImageNet's fixes it."""
    return SPURIOUS_IMAGENET_CROP if protocol == "spurious-imagenet" else crop


def classifier_records(classifiers: Sequence[Classifier]) -> list[dict[str, Any]]:
    """What a manifest records of each classifier: where it came from and what decides its outputs."""
    return [{"name": c.name, "arch": c.spec.arch, "path": c.spec.path, "crop": c.crop, "input_size": list(c.input_size),
             "temperature": c.spec.temperature, "fingerprint": c.fingerprint()} for c in classifiers]
