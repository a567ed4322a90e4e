"""Stage settings as dataclasses, and how they are resolved.

Every setting is a dataclass field, and its field alone declares the setting's command-line option
(:func:`setting`'s metadata, read by ``_cli_options``): its ``help`` is also the ``--help`` text. A stage's
settings come from, in rising priority: the field defaults, the top level of ``spurgen.toml``, the
stage's table in it (``[select-refs]``, ``[finetune]``, ...), and command-line flags. This module
imports nothing heavy, so ``spurgen --help`` stays fast.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, TypeVar

from .errors import SpurgenError

__all__ = ["setting", "same_setting", "help_for", "resolve_config", "SelectRefsConfig", "CROP_POLICIES", "PROTOCOLS",
           "SCHEDULERS", "ZERO_SNR_SCHEDULER", "ZERO_SNR_SCHEDULE", "find_scheduler", "GenerateConfig", "LORA_FORMATS",
           "ExportLoraConfig", "EvaluateConfig", "RunConfig"]

C = TypeVar("C")

CROP_POLICIES = ("center", "none")
# How classifiers are fed: "spurgen", each classifier's own preprocessing (timm data config, --crop) for every image;
# "spurious-imagenet", Spurious ImageNet's evaluation code exactly (method.md §4).
PROTOCOLS = ("spurgen", "spurious-imagenet")
# The filters of generate --until: consistent, no-object, quality>=X.
FILTER_PATTERN = re.compile(r"^(consistent|no-object|quality>=-?(\d+\.?\d*|\.\d+))$")


def setting(default: Any = dataclasses.MISSING, help: str = "", *, flags: tuple[str, ...] = (), off: str | None = None,
            metavar: str | None = None, path: bool = False, split: bool = True,
            parse: Callable[[list[str]], Any] | None = None, cli: bool = True, **kwargs: Any) -> Any:
    """A dataclass field carrying its help text and how its command-line option reads (see ``_cli_options``).

    Args:
        default: The default; a list or dict is copied for every instance.
        help: What the setting does, shown by ``--help`` (with the default appended) and in the README.
        flags: More names of the option besides ``--<field-name>``: short flags (``"-c"``) and aliases (``"--lr"``).
        off: The switch that sets a bool setting to false (``"--full"`` for ``--lora``); without one the flag only
            sets it true.
        metavar: The value's shape in ``--help`` (``"CLASS=KAPPA"``), where the type's name says too little.
        path: The value names a file or folder: ``--help`` says ``<path>`` and ``~`` is expanded.
        split: A list option's values are split at commas as well as repeated (``-c a,b -c c``); false where an
            item may hold a comma (a folder name).
        parse: Turns a list option's (split) values into the setting's value, raising :class:`SpurgenError`.
        cli: False for a setting that only spurgen.toml or code sets.
        **kwargs: Passed on to :func:`dataclasses.field`.
    """
    metadata = {"help": help, "flags": flags, "off": off, "metavar": metavar, "path": path, "split": split,
                "parse": parse, "cli": cli}
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=metadata, **kwargs)
    return field(default=default, metadata=metadata, **kwargs)


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
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # an optional setting: its type's own message says what is wrong
            return _coerce(value, options[0], where)
        for arg in options:
            try:
                return _coerce(value, arg, where)
            except SpurgenError:
                continue
        raise SpurgenError(f"{where}: {value!r} is not a valid value; see --help for the expected type")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise SpurgenError(f"{where}: expected true or false, got {value!r}; write true or false")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise SpurgenError(f"{where}: expected a whole number, got {value!r}; give an integer such as 6")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise SpurgenError(f"{where}: expected a finite number, got {value!r}; give a number such as 0.1")
            return float(value)
        raise SpurgenError(f"{where}: expected a number, got {value!r}; give a number such as 0.1")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise SpurgenError(f"{where}: expected a string, got {value!r}; quote it")
    if origin is list:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list):
            raise SpurgenError(f"{where}: expected a list, got {value!r}; give a list such as [\"a\", \"b\"]")
        return [_coerce(v.strip() if isinstance(v, str) else v, args[0], where) for v in items
                if not (isinstance(v, str) and not v.strip())]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise SpurgenError(f"{where}: expected a table, got {value!r}; give NAME = VALUE lines under a [table] "
                               "header")
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
        raise SpurgenError(f"spurgen.toml: '{section}' must be a table, not a value; put its keys under a [{section}] "
                           "header")
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
    """Raises a :class:`SpurgenError` with ``message`` unless ``condition`` holds.

    A message without a fix of its own ("<problem>; <fix>") gets the generic one: where the value is set.
    """
    if not condition:
        raise SpurgenError(message if ";" in message else f"{message}; change it on the command line or in "
                                                          "spurgen.toml")


@dataclass
class SelectRefsConfig:
    """Settings of ``spurgen select-refs``."""

    classes: list[str] = setting(["all"], "Classes: ImageNet names, indices or WordNet ids, comma-separated, or 'all' "
                                          "(the 100 Spurious ImageNet classes).", flags=("-c",))
    dataset: str | None = setting(None, "Spurious ImageNet 'images' folder (100 sub-folders of 75 images).", path=True)
    images: str | None = setting(None, "A plain folder of images of one class (use with a single "
                                       "--classes).", path=True)
    classifiers: list[str] = setting(["all"], "Classifiers that must all agree, comma-separated registry names, or "
                                              "'all' (every configured one).")
    k: int = setting(6, "Number of reference images to keep per class (the paper keeps 6).", flags=("-k",))
    crop: str | None = setting(None, "Crop policy: 'center' (resize + center crop) or 'none' (the whole image resized "
                                     "to the input size, as Spurious ImageNet feeds its square images). Default: each "
                                     "classifier's own.")
    batch_size: int = setting(32, "Images per classifier forward pass.")
    num_workers: int = setting(2, "DataLoader worker processes decoding images (0 decodes in the main process).")
    device: str = setting("auto", "Device: 'auto' (GPU when present), 'cpu', 'cuda', 'cuda:1', 'mps'.")
    labels: str = setting("imagenet", "Label set: 'imagenet', another registered set, or a TSV file of classes.")
    protocol: str = setting("spurgen", (
        "How images are fed to the classifiers: 'spurgen' (each classifier's own preprocessing, --crop) or "
        "'spurious-imagenet' (Spurious ImageNet's code: the whole image resized to the input size, bicubic). Use the "
        "same as evaluate, whose predictions then come from the same cache."))

    def validate(self) -> None:
        _require_protocol(self.protocol, self.crop)
        require(self.k >= 1, f"-k must be at least 1, got {self.k}; pass -k 6 for the paper's setting")
        require(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        require(self.num_workers >= 0, f"--num-workers must be 0 or more, got {self.num_workers}")
        require(self.crop in (None, *CROP_POLICIES), f"--crop must be 'center' or 'none', got {self.crop!r}")
        require(not (self.dataset and self.images), "--dataset and --images both given; pass only one source of images")


def _require_protocol(protocol: str, crop: str | None) -> None:
    require(protocol in PROTOCOLS, f"--protocol must be {' or '.join(PROTOCOLS)}, got {protocol!r}")
    require(protocol != "spurious-imagenet" or crop is None,
            f"--crop {crop} and --protocol spurious-imagenet both given; the protocol fixes the crop, so leave out "
            "--crop")


def _check_checkpoint(step: int | None) -> None:
    """--checkpoint N names the optimizer step of a saved checkpoint: 1 or more."""
    require(step is None or step >= 1, f"--checkpoint must be a step of 1 or more, got {step}")


def same_setting(config_cls: type, name: str) -> Any:
    """A field with the default, help text and option of another stage's setting, so a shared flag reads the same."""
    fld = {f.name: f for f in dataclasses.fields(config_cls)}[name]
    default = fld.default if fld.default is not dataclasses.MISSING else fld.default_factory()  # type: ignore[misc]
    return setting(default, **fld.metadata)


# Samplers by the names users know them from (diffusers' docs, web UIs): the diffusers class and the settings
# it is built with from the model's own scheduler config (which keeps the noise schedule and prediction type).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DDIM": ("DDIMScheduler", {}),
    "DDPM": ("DDPMScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "Euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM-Solver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "DPM-Solver++-Karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
    ),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2-a": ("KDPM2AncestralDiscreteScheduler", {}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
}
MODEL_SCHEDULER = "model"
# A zero-terminal-SNR run (finetune --zero-terminal-snr) is trained on rescaled betas and sampled from the last
# timestep (Lin et al. 2024): its validation images use this sampler with these scheduler settings, training.json
# records the settings, and generate samples the run the same way.
ZERO_SNR_SCHEDULER = "DDIM"
ZERO_SNR_SCHEDULE: dict[str, Any] = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}
DTYPES = ("auto", "fp32", "fp16", "bf16")


def find_scheduler(name: str) -> str | None:
    """The canonical name in :data:`SCHEDULERS` (or ``"model"``) of a user's spelling, else ``None``.

    Case, hyphens, underscores and spaces are ignored: ``dpm_solver++`` and ``euler a`` are found.
    """
    def key(text: str) -> str:
        return "".join(ch for ch in text.lower() if ch not in "-_ ")

    names = {key(n): n for n in (*SCHEDULERS, MODEL_SCHEDULER)}
    return names.get(key(name))


@dataclass
class GenerateConfig:
    """Settings of ``spurgen generate``."""

    classes: list[str] = setting([], "Classes: ImageNet names, indices or WordNet ids, comma-separated, or 'all'. "
                                     "Default: every class with a fine-tuned model in the workspace.", flags=("-c",))
    runs: list[str] = setting(["all"], "Fine-tuned runs to sample from (models/<class>/<run>/), comma-separated, or "
                                       "'all' (every finished run of the class).", flags=("--run",))
    base: bool = setting(False, "Sample from the untouched base model instead of the fine-tuned runs (the "
                                "no-fine-tuning baseline); saved as run 'base'.")
    model: str | None = setting(None, "Base model for --base and --lora: a diffusers Stable Diffusion folder or hub "
                                      "id. Default: the top-level 'model' of spurgen.toml, else the base model the "
                                      "class's finished runs were trained on. Also where a LoRA run's base model is "
                                      "when it has moved since training (checked against the fingerprint in "
                                      "training.json).")
    num_images: int = setting(75, "Images per class and run (the paper samples 75, as many as Spurious ImageNet has "
                                  "per class).", flags=("-n",))
    lora: str | None = setting(None, "Sample a LoRA trained elsewhere (e.g. by diffusers' train_dreambooth_lora.py) on "
                                     "--model: a .safetensors file (diffusers or kohya format), a folder holding "
                                     "pytorch_lora_weights.safetensors, or a hub id. Needs --prompt (the prompt it was "
                                     "trained with); its images are run --run-name, which evaluate and rate treat like "
                                     "any run.", metavar="PATH_OR_HUB_ID")
    checkpoint: int | None = setting(None, "Sample the LoRA saved with the run's checkpoint of step N "
                                           "(models/<class>/<run>/checkpoints/checkpoint-N) instead of its final "
                                           "weights; the images are run <run>-checkpoint-N unless --run-name is "
                                           "given.", metavar="N")
    run_name: str | None = setting(None, "Run name of the images of --lora or --checkpoint "
                                         "(generated/<class>/<run-name>/). Default: the LoRA's file, folder or hub "
                                         "name; <run>-checkpoint-N.")
    lora_scale: float = setting(1.0, "Strength of a LoRA run's update: 0 samples the base model, 1 the LoRA as "
                                     "trained; recorded in generation.json.")
    prompt: str | None = setting(None, "Prompt; {class} and {feature} stand for the class name and its spurious "
                                       "feature. Default: the run's instance prompt ('a photo of sks <noun>'); with "
                                       "--base, the class prompt ('a photo of <noun>').")
    negative_prompt: str = setting("", "Negative prompt; the same placeholders as --prompt.")
    steps: int = setting(25, "Denoising steps.")
    guidance: float | None = setting(None, "Guidance scale: classifier-free guidance for SD 1.x/2.x and SDXL (1 turns "
                                           "it off); for FLUX.1-dev the value of its distilled guidance embedding, "
                                           "not classifier-free guidance (FLUX.1-schnell ignores it). Default: the "
                                           "model family's pipeline default, 7.5 for SD 1.x/2.x, 5.0 for SDXL, 3.5 "
                                           "for FLUX.1; generation.json records the value used.")
    scheduler: str | None = setting(None, f"Sampler: {', '.join(SCHEDULERS)}, or '{MODEL_SCHEDULER}' (the scheduler "
                                          "saved with the model). Default: the model family's, DPM-Solver++ for SD "
                                          f"1.x/2.x and SDXL, '{MODEL_SCHEDULER}' for FLUX.1 (its own flow-matching "
                                          "sampler, the only one it takes); a run trained with --zero-terminal-snr "
                                          f"samples with {ZERO_SNR_SCHEDULER} over its rescaled betas and trailing "
                                          "timesteps, as its validation images did, and any sampler given for it "
                                          "gets the same schedule (one that cannot take rescaled betas is refused). "
                                          "generation.json records the sampler used.")
    batch_size: int = setting(4, "Images per pipeline call; it does not change the images.")
    seed: int = setting(0, (
        "Image i uses seed SEED + i, whatever the batch size, so re-runs and other batch sizes give the same picture "
        "(bit for bit only with the same batch size, device and --dtype)."))
    resolution: int | None = setting(None, "Image side in pixels, a multiple of 8. Default: the run's training "
                                           "resolution, else the model's native size.")
    dtype: str = setting("auto", "Precision: 'auto' (fp16 on CUDA, fp32 elsewhere), 'fp32', 'fp16' or 'bf16'.")
    safety_checker: bool = setting(True, (
        "Run the base model's safety checker when its folder has one (safety_checker/): it blanks the images it "
        "flags, which generation.json marks and evaluate leaves out. --no-safety-checker keeps every image and makes "
        "the blanked ones again, for research on the images themselves; the model's licence still applies."),
        off="--no-safety-checker")
    device: str = same_setting(SelectRefsConfig, "device")
    labels: str = same_setting(SelectRefsConfig, "labels")
    overwrite: bool = setting(False, "Replace images made earlier with other settings (another model, prompt, "
                                     "sampler...) instead of stopping.")
    until: int | None = setting(None, "Over-generate: keep sampling each class and run (image i still uses seed SEED + "
                                      "i) until this many images pass every --filter, or --max-images images exist; "
                                      "replaces -n. Each image's verdict and reasons go to generation.json.")
    filter: list[str] = setting([], "Filters of --until, comma-separated: 'consistent' (every --classifiers model "
                                    "predicts the class), 'quality>=X' (the --quality score is at least X; at most X "
                                    "for metrics where lower is better), 'no-object' (zero-shot with --clip-model: "
                                    "reject when 'a photo of a <class>' outscores 'a photo of <feature>' by more than "
                                    "--clip-margin).")
    max_images: int | None = setting(None, "With --until: stop after this many images per class and run, accepted or "
                                           "not. Default: 10 x --until.")
    classifiers: list[str] = setting(["all"], "Classifiers of the 'consistent' filter, comma-separated registry names, "
                                              "or 'all' (every configured one).")
    crop: str | None = same_setting(SelectRefsConfig, "crop")
    quality: str = setting("topiq", "No-reference quality metric of the 'quality>=X' filter (pyiqa; pip install "
                                    "'spurgen[quality]').")
    quality_weights: str | None = setting(None, "Weights of the --quality metric (safetensors or a torch state dict). "
                                                "Default: pyiqa's own.", path=True)
    clip_model: str | None = setting(None, "open_clip model of the 'no-object' filter: an architecture name (ViT-B-32) "
                                           "with --clip-weights, or an 'hf-hub:ORG/NAME' id (from the hub cache on "
                                           "this machine).")
    clip_weights: str | None = setting(None, "Weights of --clip-model: safetensors or a torch state dict (read without "
                                             "unpickling code).", path=True)
    clip_margin: float = setting(0.0, "The 'no-object' filter rejects an image when the class prompt's CLIP logit "
                                      "exceeds the feature prompt's by more than this.")

    @property
    def num_to_sample(self) -> int:
        """Image indices a run may use: -n, or with --until the --max-images limit."""
        if self.until is None:
            return self.num_images
        return self.max_images if self.max_images is not None else 10 * self.until

    def validate(self) -> None:
        require(self.num_images >= 1, f"-n must be at least 1, got {self.num_images}")
        require(self.steps >= 1, f"--steps must be at least 1, got {self.steps}")
        require(self.guidance is None or self.guidance >= 0, f"--guidance must be 0 or more, got {self.guidance}")
        require(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        require(self.seed >= 0, f"--seed must be 0 or more, got {self.seed}")
        require(self.resolution is None or (self.resolution >= 8 and self.resolution % 8 == 0),
                f"--resolution must be a positive multiple of 8, got {self.resolution}")
        require(self.dtype in DTYPES, f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        require(self.scheduler is None or find_scheduler(self.scheduler) is not None,
                f"unknown scheduler {self.scheduler!r}; use one of {', '.join(SCHEDULERS)} or '{MODEL_SCHEDULER}'")
        require(bool(self.runs), "--runs is empty; pass run names or 'all'")
        require(not (self.lora and (self.base or self.checkpoint is not None)),
                f"--lora and --{'base' if self.base else 'checkpoint'} both given; pass one model to sample")
        require(not (self.base and self.checkpoint is not None),
                "--base and --checkpoint both given; pass one model to sample")
        _check_checkpoint(self.checkpoint)
        require(self.run_name is None or bool(self.lora) or self.checkpoint is not None,
                "--run-name names the images of --lora or --checkpoint; add one of them, or drop --run-name")
        if self.until is None:
            require(not self.filter and self.max_images is None, "--filter and --max-images need --until N; add "
                                                                 "--until N or drop them")
            return
        require(self.until >= 1, f"--until must be at least 1, got {self.until}")
        require(bool(self.filter), "--until needs --filter; add e.g. --filter consistent")
        bad = [f for f in self.filter if not FILTER_PATTERN.match(f)]
        require(not bad, f"unknown --filter {bad[0] if bad else ''!r}; use consistent, quality>=X or no-object")
        require(self.num_to_sample >= self.until,
                f"--max-images ({self.num_to_sample}) must be at least --until ({self.until})")
        require("no-object" not in self.filter or self.clip_model is not None,
                "the no-object filter needs an open_clip model; add --clip-model ARCH --clip-weights PATH")
        require(self.clip_model is None or self.clip_model.startswith("hf-hub:") or self.clip_weights is not None,
                f"--clip-model {self.clip_model} needs --clip-weights PATH (or give an hf-hub: id)")
        require(self.crop in (None, *CROP_POLICIES), f"--crop must be 'center' or 'none', got {self.crop!r}")


LORA_FORMATS = ("diffusers", "kohya")


@dataclass
class ExportLoraConfig:
    """Settings of ``spurgen export-lora``."""

    classes: list[str] = setting([], "The class whose run is exported (one class).", flags=("-c",))
    run: str | None = setting(None, "The LoRA run to export (models/<class>/<run>/). Default: the class's only "
                                    "finished LoRA run.")
    checkpoint: int | None = setting(None, "Export the LoRA saved with the run's checkpoint of step N "
                                           "(models/<class>/<run>/checkpoints/checkpoint-N) instead of its final "
                                           "weights.", metavar="N")
    format: str = setting("diffusers", "'diffusers' (the file diffusers' load_lora_weights reads, as the run saved it) "
                                       "or 'kohya' (lora_unet_... / lora_te_... keys, SDXL's lora_te1_... / "
                                       "lora_te2_..., with .alpha, the format of "
                                       "AUTOMATIC1111's WebUI, ComfyUI, SD.Next and InvokeAI).")
    out: str | None = setting(None, "The .safetensors file to write. Default: "
                                    "exports/<class>/<run>[-checkpoint-N]-<format>.safetensors in the "
                                    "workspace.", path=True)
    labels: str = same_setting(SelectRefsConfig, "labels")

    def validate(self) -> None:
        require(len(self.classes) == 1, "export-lora exports one class's run; pass exactly one --classes NAME")
        require(self.format in LORA_FORMATS,
                f"--format must be 'diffusers' or 'kohya', got {self.format!r}; pass one of them")
        _check_checkpoint(self.checkpoint)
        require(self.out is None or self.out.endswith(".safetensors"),
                f"--out {self.out} must name a .safetensors file; add the suffix")


@dataclass
class EvaluateConfig:
    """Settings of ``spurgen evaluate``."""

    classes: list[str] = setting([], "Classes: ImageNet names, indices or WordNet ids, comma-separated, or 'all'. "
                                     "Default: every class with generated images or references in the "
                                     "workspace.", flags=("-c",))
    runs: list[str] = setting(["all"], "Generated runs to evaluate (generated/<class>/<run>/), comma-separated, or "
                                       "'all' (every finished one; 'base' is the untouched base "
                                       "model's).", flags=("--run",))
    refs: bool = setting(True, "Also evaluate each class's selected reference images (refs/<class>/) when "
                               "present.", off="--no-refs")
    dataset: str | None = setting(None, "Spurious ImageNet (its 'images' folder or the folder above it): adds each "
                                        "class's spurious images as the source 'spurious-imagenet'.", path=True)
    images: list[str] = setting([], "More image sources, [NAME=]DIR each (repeatable): a folder of one class's images "
                                    "(with a single --classes) or a folder in Spurious ImageNet's layout, such as an "
                                    "--export.", metavar="[NAME=]DIR", split=False)
    val_images: str | None = setting(None, "Real images of each class (e.g. its 50 ImageNet validation images): one "
                                           "sub-folder per class named by WordNet id (n01833805), index (94) or "
                                           "94-hummingbird, or a plain folder for a single class. Adds Spurious "
                                           "ImageNet's spurious score per class: ROC-AUC of the class probability "
                                           "separating these images (positives) from each source's images (negatives), "
                                           "and average precision of the same ranking. Spurious ImageNet's paper calls "
                                           "its score an AUC while its code computes average precision; both are "
                                           "reported, each under its own name.", path=True)
    classifiers: list[str] = setting(["all"], "Classifiers to evaluate with, comma-separated registry names, or 'all' "
                                              "(every configured one).")
    crop: str | None = same_setting(SelectRefsConfig, "crop")
    batch_size: int = same_setting(SelectRefsConfig, "batch_size")
    num_workers: int = same_setting(SelectRefsConfig, "num_workers")
    device: str = same_setting(SelectRefsConfig, "device")
    labels: str = same_setting(SelectRefsConfig, "labels")
    protocol: str = setting("spurgen", (
        "How images are fed to the classifiers: 'spurgen' (each classifier's own preprocessing, --crop, for every "
        "image) or 'spurious-imagenet' (Spurious ImageNet's evaluation code exactly: spurious images, which are "
        "every source's, resized whole to the input size, bicubic; --val-images resized to 256/224 of it, bicubic, "
        "and center-cropped). With --val-images the latter reproduces Spurious ImageNet's per-class score, its mean "
        "and its joint score to the last digit."))
    quality: str | None = setting(None, "No-reference image quality metric of pyiqa: 'topiq' (TOPIQ as in the paper, "
                                        "pyiqa's topiq_nr) or any pyiqa NR metric name. Needs pip install "
                                        "'spurgen[quality]' (pyiqa: non-commercial licence).")
    quality_weights: str | None = setting(None, "Weights of the --quality metric (safetensors or a torch state dict, "
                                                "read without unpickling code). Default: pyiqa's own, from its cache "
                                                "(downloaded on first use).", path=True)
    min_quality: float | None = setting(None, "With --export: keep only images whose quality is at least this (at most "
                                              "this for metrics where lower is better). Needs --quality.")
    export: str | None = setting(None, "Write the consistently spurious generated images to this folder in Spurious "
                                       "ImageNet's layout (images/<...>_<index>_<name>_<component>/), with "
                                       "manifest.json; 'spurgen select-refs --dataset' reads it.", path=True)
    report_images: int = setting(16, "Images per class and source shown in the report's grids (0: all).")
    drop_object_present: bool = setting(False, "With --export: leave out images that most raters of 'spurgen rate' "
                                               "said show the class object (more than half of their answers 'yes').")

    def validate(self) -> None:
        require(bool(self.runs), "--runs is empty; pass run names or 'all'")
        require(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")
        require(self.num_workers >= 0, f"--num-workers must be 0 or more, got {self.num_workers}")
        require(self.crop in (None, *CROP_POLICIES), f"--crop must be 'center' or 'none', got {self.crop!r}")
        _require_protocol(self.protocol, self.crop)
        require(self.report_images >= 0, f"--report-images must be 0 or more, got {self.report_images}")
        require(self.min_quality is None or self.quality is not None,
                "--min-quality needs a quality metric; add --quality topiq")
        require(self.min_quality is None or self.export is not None,
                "--min-quality filters the --export; add --export DIR")
        require(self.quality_weights is None or self.quality is not None,
                "--quality-weights needs a quality metric; add --quality topiq")
        require(not self.drop_object_present or self.export is not None,
                "--drop-object-present filters the --export; add --export DIR")


# --- finetune -----------------------------------------------------------------------------------------------------

# What each --preset trains: the paper's ablation (method.md §2) is these three runs.
FINETUNE_PRESETS: dict[str, dict[str, bool]] = {
    "dreambooth": {"train_text_encoder": False, "sfsl": False},
    "dreambooth-te": {"train_text_encoder": True, "sfsl": False},
    "sfsl": {"train_text_encoder": True, "sfsl": True},
}
SFSL_FEATURES = ("contrib", "npca")
NPCA_COMPONENTS = ("all", "spurious")
SFSL_ROW_WEIGHTINGS = ("v-profile", "none")
MIXED_PRECISION = ("no", "fp16", "bf16")
ATTENTION = ("sdpa", "eager")
# --compile and --channels-last: auto is each lever's choice for the device (spurgen.finetune.compile).
SWITCHES = ("auto", "on", "off")
# torch.compile's modes; reduce-overhead and max-autotune record CUDA graphs.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine")
# finetune --report-to: accelerate's trackers that spurgen supports, and 'all' (those of them installed).
TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "aim")
PROMPT_FIELDS = ("identifier", "noun")


def _prompt_problem(template: str) -> str | None:
    """Why a prompt template cannot be filled, or ``None`` when it can."""
    import string

    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as exc:
        return str(exc)
    unknown = fields - set(PROMPT_FIELDS)
    return f"unknown placeholder {{{sorted(unknown)[0]}}}" if unknown else None


def _class_sfsl_weights(items: list[str]) -> dict[str, float]:
    """Parses ``--class-sfsl-weight hummingbird=0.2,koala=0.05`` (already split at commas) into a table."""
    table: dict[str, float] = {}
    for item in items:
        name, sep, kappa = item.rpartition("=")
        try:
            table[name.strip()] = float(kappa)
        except ValueError:
            name = ""
        if not sep or not name.strip():
            raise SpurgenError(f"--class-sfsl-weight: bad entry {item!r}; write CLASS=KAPPA, e.g. hummingbird=0.2")
    return table


@dataclass
class FinetuneConfig:
    """Settings of ``spurgen finetune``."""

    classes: list[str] = setting(["all"], "Classes to fine-tune, one model each: ImageNet names, indices or WordNet "
                                          "ids, comma-separated, or 'all'.", flags=("-c",))
    model: str = setting("stable-diffusion-v1-5/stable-diffusion-v1-5", "Base model: a diffusers folder or a hub id "
                                                                        "of SD 1.x/2.x, SDXL or FLUX.1 (also read from "
                                                                        "'model' at the top of spurgen.toml, shared "
                                                                        "with generate).")
    family: str | None = setting(None, "Model family: 'sd' (SD 1.x/2.x), 'sdxl' or 'flux' (FLUX.1, LoRA only). "
                                       "Default: the one the model's model_index.json names.")
    vae: str | None = setting(None, "A diffusers AutoencoderKL folder or hub id used instead of the base model's VAE "
                                    "for latents, SFSL, class and validation images, e.g. "
                                    "madebyollin/sdxl-vae-fp16-fix: SDXL's own VAE overflows in fp16 and is kept in "
                                    "float32 there.")
    preset: str = setting("sfsl", "What is trained: 'dreambooth' (UNet only), 'dreambooth-te' (UNet + text encoder) or "
                                  "'sfsl' (UNet + text encoder + spurious feature similarity loss), the paper's three "
                                  "ablation runs.")
    run_name: str | None = setting(None, "Name of the run's folder models/<class>/<run-name>/. Default: the preset.")
    identifier: str = setting("sks", "Rare token that binds the references' spurious feature in the instance prompt.")
    noun: str | None = setting(None, "Noun of the prompts. Default: the class's spurious feature from the label set "
                                     "(e.g. 'red feeder/flower'), else its name.")
    instance_prompt: str = setting("a photo of {identifier} {noun}", "Prompt of the reference images; {identifier} and "
                                                                     "{noun} are filled in per class.")
    class_prompt: str = setting("a photo of {noun}", "Prompt of the prior-preservation class images; {noun} is filled "
                                                     "in per class.")
    train_text_encoder: bool | None = setting(None, "Train the text encoder with the UNet. Default: the preset's (off "
                                                    "for 'dreambooth'); changing it needs "
                                                    "--run-name.", off="--no-train-text-encoder")
    lora: bool = setting(True, "Train LoRA adapters (saved as pytorch_lora_weights.safetensors) instead of all weights "
                               "(--full, saved as a complete diffusers folder).", off="--full")
    rank: int = setting(16, "LoRA rank.")
    alpha: float | None = setting(None, "LoRA alpha; the update is scaled by alpha / rank. Default: the rank.")
    learning_rate: float | None = setting(None, "Learning rate of the UNet. Default: 1e-4 for LoRA, 5e-6 for full "
                                                "fine-tuning.", flags=("--lr",))
    text_encoder_lr: float | None = setting(None, "Learning rate of the text encoder. Default: --learning-rate.")
    lr_scheduler: str = setting("constant", "Learning-rate schedule: constant, constant_with_warmup, linear or cosine.")
    lr_warmup_steps: int = setting(0, "Warm-up steps of the learning-rate schedule.")
    adam_weight_decay: float = setting(1e-2, "AdamW weight decay.")
    max_grad_norm: float = setting(1.0, "Gradients are clipped to this norm.")
    use_8bit_adam: bool = setting(False, "Use bitsandbytes' 8-bit AdamW to save optimizer memory (pip install "
                                         "bitsandbytes).")
    steps: int = setting(800, "Optimizer steps per class. With --resume, a larger value continues a finished run.")
    batch_size: int = setting(1, "Reference images per step and process; prior preservation adds as many class images.")
    gradient_accumulation_steps: int = setting(1, "Micro-batches accumulated per optimizer step (UNet and text encoder "
                                                  "alike).")
    resolution: int | None = setting(None, "Training image side in pixels. Default: the base model's (512 for SD 1.x, "
                                           "768 for SD 2.x-768).")
    seed: int = setting(0, "Seed of everything random: LoRA initialisation, batches, noise, timesteps, class and "
                           "validation images.")
    mixed_precision: str | None = setting(None, "Mixed precision: 'no', 'fp16' or 'bf16'. Default: accelerate's "
                                                "configuration ('no' without one).")
    gradient_checkpointing: bool = setting(False, "Recompute activations in the backward pass to save memory: UNet, "
                                                  "trained text encoder, and the VAE decoder that SFSL differentiates "
                                                  "through.", off="--no-gradient-checkpointing")
    attention: str = setting("sdpa", "Attention kernel: 'sdpa' (PyTorch scaled dot-product attention, "
                                     "memory-efficient) or 'eager'.")
    compile: str = setting("auto", "torch.compile the UNet's (and a trained text encoder's) repeated blocks, one graph "
                                   "per block shape: 'on', 'off', or 'auto' (on for CUDA with triton, off on CPU and "
                                   "MPS). The first steps compile (seconds per block shape); the losses match eager "
                                   "within float rounding.")
    compile_mode: str = setting("default", "torch.compile mode with --compile: 'default', 'reduce-overhead' (CUDA "
                                           "graphs: fewer kernel launches, more memory), 'max-autotune-no-cudagraphs' "
                                           "or 'max-autotune' (longer compile).")
    channels_last: str = setting("auto", "Channels-last memory format for the UNet and VAE (SFSL's decoder included): "
                                         "'on', 'off', or 'auto' (on for CUDA, off elsewhere).")
    device: str = setting("auto", "'auto' (the GPU when present; several GPUs through accelerate launch) or 'cpu'.")
    prior_preservation: bool = setting(True, "Add the prior-preservation loss on class images that the frozen base "
                                             "model generates from the class prompt.", off="--no-prior-preservation")
    prior_weight: float = setting(1.0, "Weight lambda of the prior-preservation loss.")
    num_class_images: int = setting(200, "Class images for prior preservation, generated once and cached in the "
                                         "workspace (shared by classes and runs with the same base model, prompt, "
                                         "resolution and seed).")
    sample_steps: int = setting(25, "Denoising steps for class and validation images (with the base model's own "
                                    "scheduler).")
    guidance_scale: float | None = setting(None, "Guidance scale of class and validation images: classifier-free for "
                                                 "SD 1.x/2.x and SDXL, FLUX.1-dev's distilled guidance embedding for "
                                                 "FLUX.1 (FLUX.1-schnell ignores it). Default: the model family's "
                                                 "pipeline default, as generate's --guidance (7.5 for SD 1.x/2.x, 5.0 "
                                                 "for SDXL, 3.5 for FLUX.1); training.json records the value used.")
    sample_batch_size: int = setting(4, "Images per batch when generating class images.")
    sfsl_weight: float = setting(100.0, "Weight kappa of the spurious feature similarity loss with the 'sfsl' preset "
                                        "(0 disables it); [finetune.class-sfsl-weight] in spurgen.toml sets it per "
                                        "class. The default is the synthetic world's choice among 1, 10 and 100 "
                                        "on its v-prediction model, and between 10 and 100 on its epsilon model "
                                        "(docs/world-evidence.md); the paper's best kappa differs per class, so sweep "
                                        "it on real models (spurgen run --sfsl-weight 1,10,100).")
    class_sfsl_weight: dict[str, float] = setting({}, "Per-class kappa, NAME=KAPPA comma-separated (in spurgen.toml: a "
                                                      "[finetune.class-sfsl-weight] table); overrides --sfsl-weight "
                                                      "for the classes it names.",
                                                  metavar="CLASS=KAPPA", parse=_class_sfsl_weights)
    sfsl_model: str = setting("robust-rn50", "Classifier of the SFSL features: any registry name (define it with "
                                             "--classifier NAME=ARCH@PATH); it needs a last linear layer.")
    sfsl_feature: str = setting("contrib", "SFSL feature: 'contrib' (w_k * phi(x), the per-feature contributions to "
                                           "the class logit) or 'npca' (the class's neural PCA coordinates; run "
                                           "spurgen fit-npca first).")
    sfsl_npca_components: str = setting("all", "With --sfsl-feature npca: 'all' components or only the class's "
                                               "'spurious' ones (from the label set).")
    sfsl_max_timestep: int = setting(999, "SFSL applies only to rows whose timestep is at most this (the one-step "
                                          "image estimate is poorer at large t). Default 999, every timestep: the "
                                          "synthetic world's evidence preferred it to 400 at every kappa tried.")
    sfsl_every: int = setting(1, "Apply SFSL on every N-th optimizer step only (steps 1, N+1, 2N+1, ...) with weight "
                                 "kappa * N, so that its expected gradient is unchanged; cuts SFSL's cost by N, but "
                                 "Adam and gradient clipping then see a larger, rarer term. Default 1, every step, as "
                                 "the paper: the synthetic world could not tell 4 from 1 on its v-prediction model, "
                                 "and its epsilon model's study did not measure 4.")
    sfsl_row_weighting: str = setting("v-profile", "Per-row weight of SFSL by timestep. The one-step estimate passes "
                                                   "SFSL's gradient to the UNet's output scaled by "
                                                   "sqrt((1-abar_t)/abar_t) for epsilon models (0.03 at t=0, 14.6 at "
                                                   "t=999 on SD 1.5), so the noisiest rows, whose estimate is a blur, "
                                                   "dominate, against sqrt(1-abar_t) <= 1 for v-prediction. "
                                                   "'v-profile' weights rows so that every kind of model gets "
                                                   "v-prediction's profile (epsilon: sqrt(abar_t); v-prediction: 1, no "
                                                   "change; sample: sqrt(1-abar_t)), the profile the defaults were "
                                                   "chosen on; 'none' is the paper's Eq. 6 as written.")
    sfsl_decoder: str | None = setting(None, "Decoder of SFSL's images only: a diffusers AutoencoderTiny (TAESD) "
                                             "folder or hub id, e.g. madebyollin/taesd for SD 1.x/2.x, "
                                             "madebyollin/taesdxl for SDXL, madebyollin/taef1 for FLUX.1; far cheaper "
                                             "to differentiate through than the VAE decoder. Default: the base "
                                             "model's VAE.")
    checkpointing_steps: int = setting(200, "Save a resumable checkpoint every N steps (0: never).")
    checkpoints_total_limit: int = setting(2, "Checkpoints kept per run; older ones are deleted.")
    resume: bool = setting(False, "Continue from the run's latest checkpoint (exactly: weights, optimizer, schedule, "
                                  "randomness).")
    overwrite: bool = setting(False, "Delete the run's finished or unfinished model and train from scratch.")
    noise_offset: float = setting(
        0.0,
        "Noise offset: each training noise gets offset * N(0, 1) added per image and channel, so the model learns to "
        "shift a whole image's colour and brightness instead of keeping the mean its start noise sets; try 0.05-0.1 "
        "when the spurious feature is a colour or a light/dark scene (0: off).")
    snr_gamma: float | None = setting(
        None,
        "Min-SNR loss weighting with this gamma (5 is the paper's): each row's diffusion loss is weighted by "
        "min(SNR_t, gamma) / SNR_t (epsilon) or / (SNR_t + 1) (v-prediction), which damps the low-noise timesteps and "
        "often converges faster. SFSL is not reweighted. Default: off.")
    zero_terminal_snr: bool = setting(
        False,
        "Rescale the training noise schedule to zero terminal SNR (v-prediction models only), so the last timestep is "
        "pure noise and the model learns to set a sample's overall colour and brightness itself; validation images "
        "then sample with DDIM over the rescaled betas, trailing timesteps, and so does generate (docs/method.md).")
    validation_steps: int = setting(200, "Save validation images every N steps (0: only at the end).")
    num_validation_images: int = setting(4, "Validation images per save, with seeds seed, seed+1, ... (0: none).")
    validation_prompt: str | None = setting(
        None,
        "Prompt of the validation images; {identifier} and {noun} are filled in per class. Default: the instance "
        "prompt.")
    validation_classifiers: list[str] = setting(
        [],
        "Classifiers that score each validation step, registry names comma-separated (define one with --classifier "
        "NAME=ARCH@PATH): the validation images' spurious accuracy per classifier and the rate at which all of them "
        "predict the class. The SFSL model (--sfsl-model) always scores a run that uses SFSL, and joins these when "
        "they are given. Default: only the SFSL model.")
    keep_best: bool = setting(
        False,
        "Ship the weights of the validation step with the highest consistently-spurious rate (ties: the later step) "
        "instead of the last step's; each new best is saved in models/<class>/<run>/best/. Needs validation images and"
        " a classifier to score them.")
    report_to: list[str] = setting(
        [],
        "Experiment trackers through accelerate, comma-separated: tensorboard (logs in models/<class>/<run>/logs), "
        "wandb, mlflow, comet_ml, aim, or 'all' (every one of them installed). They get the settings, every loss term "
        "and diagnostic of losses.csv, the validation metric and the validation images (tensorboard, wandb and aim).")
    tensorboard: bool = setting(False, "Same as --report-to tensorboard (pip install tensorboard).")
    labels: str = setting("imagenet", "Label set: 'imagenet', another registered set, or a TSV file of classes.")

    def validate(self) -> None:
        require(self.preset in FINETUNE_PRESETS, f"--preset must be one of {', '.join(FINETUNE_PRESETS)}, got "
                                                 f"{self.preset!r}")
        require(self.rank >= 1, f"--rank must be at least 1, got {self.rank}; pass e.g. --rank 16")
        require(self.alpha is None or self.alpha > 0, f"--alpha must be positive, got {self.alpha}")
        for name in ("learning_rate", "text_encoder_lr"):
            value = getattr(self, name)
            require(value is None or value > 0, f"--{name.replace('_', '-')} must be positive, got {value}")
        require(self.lr_scheduler in LR_SCHEDULERS, f"--lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}, got "
                                                    f"{self.lr_scheduler!r}")
        for name in (
            "lr_warmup_steps",
            "checkpointing_steps",
            "validation_steps",
            "num_validation_images",
            "sfsl_max_timestep",
        ):
            require(
                getattr(self, name) >= 0, f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}"
            )
        for name in ("steps", "batch_size", "gradient_accumulation_steps", "num_class_images", "sample_steps",
                     "sample_batch_size", "checkpoints_total_limit", "sfsl_every"):
            require(getattr(self, name) >= 1, f"--{name.replace('_', '-')} must be at least 1, got "
                                              f"{getattr(self, name)}")
        for name in ("adam_weight_decay", "max_grad_norm", "prior_weight", "guidance_scale", "sfsl_weight"):
            value = getattr(self, name)
            require(value is None or value >= 0, f"--{name.replace('_', '-')} must be 0 or more, got {value}")
        for key, kappa in self.class_sfsl_weight.items():
            require(kappa >= 0, f"class-sfsl-weight of '{key}' must be 0 or more, got {kappa}")
        require(self.resolution is None or self.resolution >= 8, "--resolution must be at least 8 pixels, got "
                                                                 f"{self.resolution}")
        require(self.mixed_precision in (None, *MIXED_PRECISION), "--mixed-precision must be one of "
                                                                  f"{', '.join(MIXED_PRECISION)}, got "
                                                                  f"{self.mixed_precision!r}")
        require(self.attention in ATTENTION, f"--attention must be 'sdpa' or 'eager', got {self.attention!r}")
        for name in ("compile", "channels_last"):
            require(getattr(self, name) in SWITCHES, f"--{name.replace('_', '-')} must be 'auto', 'on' or 'off', got "
                                                     f"{getattr(self, name)!r}")
        require(self.compile_mode in COMPILE_MODES, f"--compile-mode must be one of {', '.join(COMPILE_MODES)}, got "
                                                    f"{self.compile_mode!r}")
        require(self.device in ("auto", "cpu"), f"--device must be 'auto' or 'cpu', got {self.device!r}; choose GPUs "
                                                "with CUDA_VISIBLE_DEVICES or accelerate launch")
        require(self.sfsl_feature in SFSL_FEATURES, "--sfsl-feature must be 'contrib' or 'npca', got "
                                                    f"{self.sfsl_feature!r}")
        require(self.sfsl_decoder is None or bool(self.sfsl_decoder.strip()),
                "--sfsl-decoder is empty; pass an AutoencoderTiny folder or hub id (e.g. madebyollin/taesd), or drop "
                "the flag")
        require(self.sfsl_row_weighting in SFSL_ROW_WEIGHTINGS,
                f"--sfsl-row-weighting must be 'v-profile' or 'none', got {self.sfsl_row_weighting!r}")
        require(self.sfsl_npca_components in NPCA_COMPONENTS, "--sfsl-npca-components must be 'all' or 'spurious', "
                                                              f"got {self.sfsl_npca_components!r}")
        require(bool(self.identifier.strip()), "--identifier is empty; pass a rare token such as sks")
        for name in ("instance_prompt", "class_prompt", "validation_prompt"):
            problem = _prompt_problem(getattr(self, name) or "")
            require(problem is None, f"--{name.replace('_', '-')}: {problem}; use only {{identifier}} and {{noun}} as "
                                     "placeholders")
        require(self.noise_offset >= 0, f"--noise-offset must be 0 or more, got {self.noise_offset}")
        require(self.snr_gamma is None or self.snr_gamma > 0,
                f"--snr-gamma must be positive, got {self.snr_gamma}; try 5")
        for name in self.report_to:
            require(name in (*TRACKERS, "all"),
                    f"--report-to: unknown tracker {name!r}; use {', '.join(TRACKERS)} or all")
        require(not self.keep_best or self.num_validation_images >= 1,
                "--keep-best chooses among validation steps, but --num-validation-images is 0; pass e.g. 4")
        require(not (self.resume and self.overwrite), "--resume and --overwrite both given; pass one: continue the run "
                                                      "or start it over")
        require(self.train_text_encoder is None or self.run_name is not None
                or self.train_text_encoder == FINETUNE_PRESETS[self.preset]["train_text_encoder"],
                f"--{'' if self.train_text_encoder else 'no-'}train-text-encoder changes what preset '{self.preset}' "
                "trains; "
                "pass --run-name NAME so the model folder does not pose as that preset")

    @property
    def trains_text_encoder(self) -> bool:
        """The text encoder is trained: the flag when given, else the preset's choice."""
        if self.train_text_encoder is not None:
            return self.train_text_encoder
        return FINETUNE_PRESETS[self.preset]["train_text_encoder"]

    @property
    def run(self) -> str:
        """The run's folder name: ``--run-name``, else the preset."""
        return self.run_name or self.preset

    @property
    def trackers(self) -> list[str]:
        """``--report-to`` with ``--tensorboard`` added, each once, as given ('all' not yet expanded)."""
        return list(dict.fromkeys(self.report_to + (["tensorboard"] if self.tensorboard else [])))


@dataclass
class FitNpcaConfig:
    """Settings of ``spurgen fit-npca``."""

    classes: list[str] = setting([], "The class whose images --images holds (one class).", flags=("-c",))
    images: str | None = setting(None, "Folder of real images of the class (e.g. its ImageNet training "
                                       "images).", path=True)
    sfsl_model: str = setting("robust-rn50", "Classifier whose last-layer contributions are analysed: the --sfsl-model "
                                             "that finetune will use.")
    batch_size: int = setting(32, "Images per classifier forward pass.")
    device: str = setting("auto", "Device: 'auto' (GPU when present), 'cpu', 'cuda', 'cuda:1', 'mps'.")
    labels: str = setting("imagenet", "Label set: 'imagenet', another registered set, or a TSV file of classes.")

    def validate(self) -> None:
        require(len(self.classes) == 1, "fit-npca fits one class; pass exactly one --classes NAME")
        require(self.images is not None, "no images given; pass --images DIR with real images of the class")
        require(self.batch_size >= 1, f"--batch-size must be at least 1, got {self.batch_size}")


@dataclass
class RateConfig:
    """Settings of ``spurgen rate``."""

    classes: list[str] = setting(["all"], "Classes whose images are rated: names, indices or WordNet ids, "
                                          "comma-separated, or 'all'; classes without images are left "
                                          "out.", flags=("-c",))
    dataset: str | None = setting(None, "Spurious ImageNet 'images' folder: its class folders join the study as real "
                                        "images.", path=True)
    max_images: int | None = setting(None, "At most this many images per class and source (reference, dataset, "
                                           "generated), a sample fixed by --seed. Default: all.")
    seed: int = setting(0, "Study seed: with each rater's name it fixes the rater's image order; keep it for the whole "
                           "study.")
    image_size: int = setting(512, "Longer side in pixels of the images shown; every image is re-encoded to it, so "
                                   "neither format nor size gives away its source.")
    host: str = setting("127.0.0.1", "Address to listen on: 127.0.0.1 for this machine only, 0.0.0.0 to let raters on "
                                     "the network in.")
    port: int = setting(8765, "Port to listen on (0 picks a free one).")
    labels: str = setting("imagenet", "Label set: 'imagenet', another registered set, or a TSV file of classes.")

    def validate(self) -> None:
        require(self.max_images is None or self.max_images >= 1,
                f"--max-images must be at least 1, got {self.max_images}; leave it out to rate every image")
        require(32 <= self.image_size <= 2048, f"--image-size must be 32 to 2048 pixels, got {self.image_size}")
        require(0 <= self.port <= 65535, f"--port must be 0 to 65535, got {self.port}")
        require(bool(self.host.strip()), "--host is empty; pass 127.0.0.1 or 0.0.0.0")


# --- run ----------------------------------------------------------------------------------------------------------


@dataclass
class RunConfig:
    """Settings of ``spurgen run`` (its [run] table); each stage reads its own table as its command does."""

    classes: list[str] = setting(["all"], "Classes to take through every stage: ImageNet names, indices or WordNet "
                                          "ids, comma-separated, or 'all'.", flags=("-c",))
    presets: list[str] = setting(["sfsl"], "Fine-tuning presets, one run each per class, comma-separated: dreambooth, "
                                           "dreambooth-te, sfsl.")
    sfsl_weight: list[float] = setting([], "Grid of kappa values for the 'sfsl' preset, comma-separated; each is its "
                                           "own run named sfsl-k<kappa> (sfsl-k0.05). Default: one run 'sfsl' with "
                                           "[finetune]'s sfsl-weight.")
    labels: str = setting("imagenet", "Label set: 'imagenet', another registered set, or a TSV file of classes.")

    def validate(self) -> None:
        require(bool(self.classes), "--classes is empty; pass class names, indices or 'all'")
        require(bool(self.presets), "--presets is empty; pass e.g. --presets sfsl")
        for preset in self.presets:
            require(preset in FINETUNE_PRESETS, f"--presets: unknown preset {preset!r}; use "
                                                f"{', '.join(FINETUNE_PRESETS)}")
        for kappa in self.sfsl_weight:
            require(kappa >= 0, f"--sfsl-weight values must be 0 or more, got {kappa}")
        require(not self.sfsl_weight or "sfsl" in self.presets, "--sfsl-weight is a grid of the 'sfsl' preset; add "
                                                                "sfsl to --presets")
