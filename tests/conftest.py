"""Shared pytest fixtures."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# Set at import, before any test module imports huggingface_hub: it reads HF_HUB_OFFLINE once, when imported,
# so a fixture alone would come too late. Offline, a missing local file fails at once instead of trying the
# network (which these machines do not have).
os.environ["HF_HUB_OFFLINE"] = "1"
# Under pytest-xdist (make test) every worker is one of several processes on the machine's cores: one thread each,
# set before torch is imported, and inherited by the subprocesses tests start.
# xdist's workers also start with COLUMNS=80, which would make spurgen's tables as narrow as a small terminal's: the
# tests see the width of a log file, as in a run without workers.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.pop("COLUMNS", None)


# The files that take longest (their module fixtures run whole pipelines), longest first. make test hands whole files
# to its workers in collection order; starting with these keeps one worker from running a long file alone at the end.
_LONG_FILES = ("test_world_pipeline.py", "test_distributed.py", "test_generate.py", "test_crash.py",
               "test_generate_until.py", "test_run.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Runs the files of _LONG_FILES first (the order within a file is kept)."""
    rank = {name: n for n, name in enumerate(_LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session", autouse=True)
def hf_hub_offline() -> Iterator[None]:
    """Keep the Hugging Face libraries offline for the whole session, even if a test changed the variable."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    yield
    if previous is None:
        os.environ.pop("HF_HUB_OFFLINE", None)
    else:
        os.environ["HF_HUB_OFFLINE"] = previous


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Stable Diffusion pipeline folder (64 px, seed 0), built once per session.

    Shared by every test that asks for it: treat it as read-only (copy it before changing anything).
    """
    from spurgen.testing import build_stable_diffusion

    return build_stable_diffusion(tmp_path_factory.mktemp("tiny-sd") / "tiny-sd", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random SDXL folder (64 px, seed 0) in the real diffusers layout, built once per session; read-only."""
    from spurgen.testing.sdxl import build_sdxl

    return build_sdxl(tmp_path_factory.mktemp("tiny-sdxl") / "tiny-sdxl", "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random FLUX.1 folder (FLUX.1-dev's layout, guidance embedding, seed 0), built once per session;
    read-only. Its native side is 256 px: tests train and sample at 64."""
    from spurgen.testing.flux import build_flux

    return build_flux(tmp_path_factory.mktemp("tiny-flux") / "tiny-flux", "tiny", seed=0)


# --- Classifiers with known predictions ---------------------------------------------------------------------------
#
# Three tiny timm classifiers, saved in three weight formats, whose last linear layer is solved so that on the
# images of a small Spurious-ImageNet-layout folder they output exactly the logits designed below: for image i of
# class k, classifier c gives logit SCORES[k][c, i] to class k, 0 to the decoy class and -10 to every other
# class. So classifier c predicts k iff the score is > 0, with probability ~ sigmoid(score).

IMAGENET_CLASSES = 1000  # the classifiers' output size: the class indices below are ImageNet's
RIGGED_CLASSES = {94: "hummingbird", 105: "koala", 557: "flagpole"}
RIGGED_DECOY = 1
RIGGED_CLASSIFIERS = ("res-a", "conv-b", "vit-c")
RIGGED_SCORES = {
    #          img0  img1  img2  img3  img4  img5  img6  img7
    94: [[3.0, 1.0, 4.0, 2.5, -2.0, 5.0, 0.5, 3.0],   # res-a
         [2.0, 5.0, 4.0, 3.0, -1.0, 1.5, 6.0, 3.0],   # conv-b
         [4.0, 5.0, -1.0, 3.5, -3.0, 2.0, 6.0, 3.0]],  # vit-c
    105: [[2.0, 2.0, -1.0, 1.0, 3.0, -2.0, 1.0, 2.0],
          [1.0, 3.0, 2.0, -1.0, 2.0, 2.0, -0.5, 2.5],
          [2.5, 1.0, 2.0, 2.0, -1.5, 2.0, 1.0, -1.0]],
    557: [[-1.0, 2.0, 3.0, -2.0, 1.5, 2.0, -1.0, 0.8],
          [2.0, -1.0, 2.0, 1.0, -2.0, 1.0, 1.0, -1.0],
          [1.0, 1.0, -3.0, 1.0, 1.2, -1.0, 2.0, 1.3]],
}


class RiggedSetup:
    """The data set, classifier flags and designed scores of the rigged classifiers."""

    def __init__(self, dataset: Path, flags: dict[str, str], files: dict[int, list[Path]]) -> None:
        self.dataset = dataset
        self.flags = flags
        self.files = files

    def scores(self, class_index: int, classifiers: tuple[str, ...] = RIGGED_CLASSIFIERS):
        import numpy as np

        rows = [RIGGED_CLASSIFIERS.index(c) for c in classifiers]
        return np.array(RIGGED_SCORES[class_index])[rows]

    def expected_selection(
        self, class_index: int, k: int, classifiers: tuple[str, ...] = RIGGED_CLASSIFIERS
    ) -> list[str]:
        """File names select-refs must choose, in rank order, computed from the designed scores."""
        scores = self.scores(class_index, classifiers)
        consistent = [i for i in range(scores.shape[1]) if (scores[:, i] > 0).all()]
        ranked = sorted(consistent, key=lambda i: -scores[:, i].min())
        return [self.files[class_index][i].name for i in ranked[:k]]


def _noise_image(seed: int, size: int = 40):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="session")
def rigged(tmp_path_factory: pytest.TempPathFactory) -> RiggedSetup:
    """A Spurious-ImageNet-layout folder (3 classes x 8 images) and three rigged classifiers on disk.

    Formats: ``res-a`` a safetensors state dict, ``conv-b`` a timm training checkpoint (``{"state_dict": ...}``
    with DataParallel's ``module.`` prefix, read with ``torch.load(weights_only=True)``), ``vit-c`` a timm model
    folder (config.json + model.safetensors).
    """
    import torch
    from safetensors.torch import save_file
    from timm.models._hub import save_for_hf

    from spurgen.testing import solved_head_classifier

    root = tmp_path_factory.mktemp("rigged")
    dataset = root / "images"
    files: dict[int, list[Path]] = {}
    for k, name in RIGGED_CLASSES.items():
        folder = dataset / f"spurious_imagenet_{k}_{name}_0"
        folder.mkdir(parents=True)
        files[k] = []
        for i in range(8):
            path = folder / f"{name}_{i:02d}.png"
            _noise_image(k * 100 + i).save(path)
            files[k].append(path)
    (dataset / "timestamp.txt").write_text("rigged test set\n")

    archs = {"res-a": "test_resnet.r160_in1k", "conv-b": "test_convnext.r160_in1k", "vit-c": "test_vit.r160_in1k"}
    flags: dict[str, str] = {}
    all_files = [f for k in RIGGED_CLASSES for f in files[k]]
    for c, (name, arch) in enumerate(archs.items()):
        target = torch.full((len(all_files), IMAGENET_CLASSES), -10.0, dtype=torch.float64)
        target[:, RIGGED_DECOY] = 0.0
        row = 0
        for k in RIGGED_CLASSES:
            for i in range(8):
                target[row, k] = RIGGED_SCORES[k][c][i]
                row += 1
        model = solved_head_classifier(arch, all_files, target, seed=c)
        if name == "res-a":
            path = root / "res-a.safetensors"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        elif name == "conv-b":
            path = root / "conv-b.pth"
            torch.save({"epoch": 3, "arch": arch,
                        "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
        else:
            path = root / "vit-c"
            save_for_hf(model, str(path), safe_serialization=True)  # timm.models exports it after 1.0.15
        flags[name] = f"{name}={arch}@{path}"
    return RiggedSetup(dataset, flags, files)


# --- A small workspace for whole-pipeline runs -----------------------------------------------------------------

SOLVED_ARCH = "test_resnet.r160_in1k"


def spurious_folder(dataset: Path, classes: list, images_per_class: int) -> None:
    """A Spurious-ImageNet-layout folder of noise images: ``images_per_class`` per ``ClassInfo`` of ``classes``."""
    for cls in classes:
        folder = dataset / f"spurious_imagenet_{cls.index}_{cls.slug}_0"
        folder.mkdir(parents=True)
        for i in range(images_per_class):
            _noise_image(cls.index * 10 + i).save(folder / f"{cls.slug}_{i}.png")


def solved_classifier(dataset: Path, path: Path) -> str:
    """A tiny timm classifier whose last layer is solved to predict each image's class (logit 5, others -5).

    Saves its weights to ``path`` (safetensors) and returns the ``--classifier`` flag value ``tiny=ARCH@PATH``.
    """
    import torch
    from safetensors.torch import save_file

    from spurgen.testing import solved_head_classifier

    files = sorted(dataset.glob("*/*.png"))
    target = torch.full((len(files), IMAGENET_CLASSES), -5.0, dtype=torch.float64)
    for row, file in enumerate(files):
        target[row, int(file.parent.name.split("_")[2])] = 5.0
    model = solved_head_classifier(SOLVED_ARCH, files, target, seed=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return f"tiny={SOLVED_ARCH}@{path}"


def small_settings(model: Path, dataset: Path, **tables: dict) -> str:
    """spurgen.toml for every stage, small: 1 reference per class, a 2-step LoRA without prior preservation,
    1 image per run, the ``tiny`` classifier. ``tables`` overrides keys of a table (``finetune={"steps": 4}``)."""
    settings: dict[str, dict] = {
        "run": {"presets": ["dreambooth"]},
        "select-refs": {"dataset": str(dataset), "classifiers": ["tiny"], "k": 1, "num-workers": 0},
        "finetune": {"steps": 2, "rank": 4, "prior-preservation": False, "num-validation-images": 0,
                     "validation-steps": 0, "checkpointing-steps": 1},
        "generate": {"num-images": 1, "steps": 2},
        "evaluate": {"classifiers": ["tiny"], "num-workers": 0, "report-images": 1},
    }
    for table, values in tables.items():
        settings[table].update(values)
    lines = [f"model = {json.dumps(str(model))}", 'device = "cpu"']
    for table, values in settings.items():  # JSON strings, numbers, booleans and lists are TOML as well
        lines += ["", f"[{table}]", *(f"{key} = {json.dumps(value)}" for key, value in values.items())]
    return "\n".join(lines) + "\n"
