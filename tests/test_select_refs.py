"""select-refs end to end on rigged classifiers whose predictions are designed in conftest.py."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from spurgen.cli import app
from spurgen.config import SelectRefsConfig, resolve_config
from spurgen.errors import SpurgenError
from spurgen.labels import get_label_set
from spurgen.select_refs import select_refs
from spurgen.workspace import Workspace

runner = CliRunner()


def _run(rigged, workspace: Path, *args: str, classifiers=("res-a", "conv-b", "vit-c")):
    flags = [f"--classifier={rigged.flags[name]}" for name in classifiers]
    return runner.invoke(app, ["select-refs", "-w", str(workspace), "--dataset", str(rigged.dataset),
                               "--classifiers", ",".join(classifiers), "--num-workers", "0", *flags, *args])


def test_selects_the_expected_images_in_order(rigged, tmp_path):
    result = _run(rigged, tmp_path, "--classes", "hummingbird", "-k", "3")
    assert result.exit_code == 0, result.output
    folder = tmp_path / "refs" / "94-hummingbird"
    manifest = json.loads((folder / "selection.json").read_text())
    expected = rigged.expected_selection(94, 3)
    assert expected == ["hummingbird_07.png", "hummingbird_03.png", "hummingbird_00.png"]
    assert manifest["selected"] == expected
    assert sorted(p.name for p in folder.glob("*.png")) == sorted(expected)
    for name in expected:  # copies are byte-identical to the source images
        assert (folder / name).read_bytes() == (
            rigged.dataset / "spurious_imagenet_94_hummingbird_0" / name
        ).read_bytes()
    scores = rigged.scores(94)
    for i, entry in enumerate(manifest["images"]):
        assert entry["file"].endswith(f"hummingbird_{i:02d}.png")
        for c, name in enumerate(("res-a", "conv-b", "vit-c")):
            prediction = entry["predictions"][name]
            assert prediction["top1"] == (94 if scores[c, i] > 0 else 1)
            # two-way softmax of the designed logits (the other 998 classes sit at -10)
            others = 998 * np.exp(-10.0)
            expected_p = np.exp(scores[c, i]) / (np.exp(scores[c, i]) + 1 + others)
            assert prediction["probability"] == pytest.approx(expected_p, abs=2e-3)
        assert entry["consistently_spurious"] == bool((scores[:, i] > 0).all())
        assert entry["selected"] == (entry["copied_as"] is not None)
    ranks = {Path(e["file"]).name: e["rank"] for e in manifest["images"] if e["selected"]}
    assert ranks == {name: r + 1 for r, name in enumerate(expected)}
    summary = manifest["summary"]
    assert summary == {"scanned": 8, "unreadable": 0,
                       "spurious_per_classifier": {"res-a": 7, "conv-b": 7, "vit-c": 6},
                       "consistently_spurious": 6, "selected": 3}
    assert manifest["settings"]["k"] == 3 and manifest["versions"]["torch"]


def test_fewer_than_k_warns_and_none_exits_1_while_others_complete(rigged, tmp_path):
    result = _run(rigged, tmp_path, "--classes", "koala,flagpole,hummingbird", "-k", "6")
    assert result.exit_code == 1, result.output
    koala = json.loads((tmp_path / "refs" / "105-koala" / "selection.json").read_text())
    assert koala["selected"] == rigged.expected_selection(105, 6) and len(koala["selected"]) == 2
    assert "only 2 of 6" in result.output
    flagpole = json.loads((tmp_path / "refs" / "557-flagpole" / "selection.json").read_text())
    assert flagpole["selected"] == [] and flagpole["summary"]["consistently_spurious"] == 0
    assert "no image is predicted as the class by every classifier" in result.output
    hummingbird = json.loads((tmp_path / "refs" / "94-hummingbird" / "selection.json").read_text())
    assert hummingbird["selected"] == rigged.expected_selection(94, 6)


def test_prediction_cache_computes_only_the_new_classifier(rigged, tmp_path):
    first = _run(rigged, tmp_path, "--classes", "94", "-k", "3", classifiers=("res-a", "conv-b"))
    assert first.exit_code == 0, first.output
    manifest = json.loads((tmp_path / "refs" / "94-hummingbird" / "selection.json").read_text())
    assert manifest["computed_predictions"] == {"res-a": 8, "conv-b": 8}
    # without vit-c, image 2 is consistent and has the strongest weakest vote
    assert manifest["selected"] == rigged.expected_selection(94, 3, ("res-a", "conv-b"))
    assert manifest["selected"][0] == "hummingbird_02.png"
    second = _run(rigged, tmp_path, "--classes", "94", "-k", "3")
    assert second.exit_code == 0, second.output
    manifest = json.loads((tmp_path / "refs" / "94-hummingbird" / "selection.json").read_text())
    assert manifest["computed_predictions"] == {"res-a": 0, "conv-b": 0, "vit-c": 8}
    assert manifest["selected"] == rigged.expected_selection(94, 3)
    assert not (tmp_path / "refs" / "94-hummingbird" / "hummingbird_02.png").exists()


def test_every_weight_format_gives_the_same_logits_as_safetensors(rigged, tmp_path):
    import torch
    from safetensors.torch import load_file

    from spurgen.classifiers import load_classifier, parse_classifier

    source = Path(rigged.flags["res-a"].split("@", 1)[1])
    state = load_file(str(source))
    torchvision_style = tmp_path / "res-a.pt"
    torch.save(state, torchvision_style)  # a plain state dict, as torchvision saves one
    x = torch.rand(2, 3, 160, 160)
    reference = load_classifier(parse_classifier(rigged.flags["res-a"], {})).logits(x)
    other = load_classifier(parse_classifier(f"res-a=test_resnet.r160_in1k@{torchvision_style}", {})).logits(x)
    assert torch.equal(reference, other)


@pytest.mark.parametrize("arch", ["test_resnet.r160_in1k", "test_coatnet"])  # coatnet: non-persistent buffers
def test_weights_load_like_an_ordinary_build_in_fp32_whatever_their_precision(arch, tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    from spurgen.classifiers import load_classifier, parse_classifier

    torch.manual_seed(0)
    ordinary = timm.create_model(arch, pretrained=False, num_classes=10).eval()
    half = {k: v.half() if v.is_floating_point() else v for k, v in ordinary.state_dict().items()}
    ordinary.load_state_dict(half)  # the fp16 file's values, in an fp32 model built the ordinary way
    save_file(half, str(tmp_path / "w.safetensors"))
    loaded = load_classifier(parse_classifier(f"x={arch}@{tmp_path / 'w.safetensors'}", {}))
    assert all(p.dtype == torch.float32 and not p.is_meta for p in loaded.model.parameters())
    assert not any(b.is_meta for b in loaded.model.buffers())
    size = loaded.input_size[-1]
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), ordinary(x), atol=1e-5)


def test_an_architecture_that_cannot_be_built_on_the_meta_device_loads_the_ordinary_way(rigged, monkeypatch):
    import timm
    import torch

    from spurgen.classifiers import load_classifier, parse_classifier

    x = torch.rand(2, 3, 160, 160)
    expected = load_classifier(parse_classifier(rigged.flags["res-a"], {})).logits(x)
    real = timm.create_model

    def no_meta(*args, **kwargs):
        if torch.empty(0).is_meta:  # inside `with torch.device("meta")`
            raise RuntimeError("Tensor.item() cannot be called on meta tensors")
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", no_meta)
    assert torch.equal(load_classifier(parse_classifier(rigged.flags["res-a"], {})).logits(x), expected)


def test_plain_image_folder_for_one_class(rigged, tmp_path):
    images = rigged.dataset / "spurious_imagenet_94_hummingbird_0"
    result = runner.invoke(
        app,
        [
            "select-refs",
            "-w",
            str(tmp_path),
            "--images",
            str(images),
            "--classes",
            "hummingbird",
            "--classifiers",
            "res-a,conv-b,vit-c",
            "-k",
            "2",
            "--num-workers",
            "0",
            *[f"--classifier={f}" for f in rigged.flags.values()],
        ],
    )
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "refs" / "94-hummingbird" / "selection.json").read_text())
    assert manifest["selected"] == rigged.expected_selection(94, 2)


def test_unreadable_images_are_skipped_named_and_counted(rigged, tmp_path):
    dataset = tmp_path / "images"
    shutil.copytree(rigged.dataset, dataset)
    folder = dataset / "spurious_imagenet_94_hummingbird_0"
    (folder / "zz_empty.png").write_bytes(b"")
    (folder / "zz_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    result = runner.invoke(
        app,
        [
            "select-refs",
            "-w",
            str(tmp_path / "ws"),
            "--dataset",
            str(dataset),
            "--classes",
            "94",
            "--classifiers",
            "res-a,conv-b,vit-c",
            "-k",
            "3",
            "--num-workers",
            "1",
            *[f"--classifier={f}" for f in rigged.flags.values()],
        ],
    )
    assert result.exit_code == 0, result.output
    assert "zz_empty.png" in result.output and "zz_corrupt.jpg" in result.output
    manifest = json.loads((tmp_path / "ws" / "refs" / "94-hummingbird" / "selection.json").read_text())
    assert manifest["summary"]["unreadable"] == 2 and manifest["summary"]["scanned"] == 10
    assert {Path(u["file"]).name for u in manifest["unreadable"]} == {"zz_empty.png", "zz_corrupt.jpg"}
    assert manifest["selected"] == rigged.expected_selection(94, 3)


def test_settings_file_and_flags_priority(rigged, tmp_path):
    (tmp_path / "spurgen.toml").write_text(
        f'[classifiers]\nres-a = "{rigged.flags["res-a"].split("=", 1)[1]}"\n'
        f'conv-b = {{ arch = "test_convnext.r160_in1k", path = "{rigged.flags["conv-b"].split("@", 1)[1]}" }}\n'
        '[select-refs]\nk = 1\nclassifiers = ["res-a", "conv-b"]\nnum-workers = 0\n'
        f'dataset = "{rigged.dataset}"\n'
    )
    config = resolve_config(
        SelectRefsConfig, Workspace(tmp_path).settings(), "select-refs", {"classes": ["94"], "k": None}
    )
    assert config.k == 1 and config.classifiers == ["res-a", "conv-b"]
    result = runner.invoke(app, ["select-refs", "-w", str(tmp_path), "--classes", "94", "-k", "2"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "refs" / "94-hummingbird" / "selection.json").read_text())
    assert manifest["settings"]["k"] == 2
    assert [c["name"] for c in manifest["classifiers"]] == ["res-a", "conv-b"]
    assert manifest["selected"] == rigged.expected_selection(94, 2, ("res-a", "conv-b"))


def test_function_api_without_cli(rigged, tmp_path):
    config = SelectRefsConfig(classes=["flagpole"], dataset=str(rigged.dataset), classifiers=["res-a", "vit-c"],
                              k=2, num_workers=0)
    (result,) = select_refs(config, Workspace(tmp_path), [rigged.flags["res-a"], rigged.flags["vit-c"]])
    expected = rigged.expected_selection(557, 2, ("res-a", "vit-c"))
    assert expected == ["flagpole_04.png", "flagpole_01.png"]
    assert [p.name for p in result.selected] == expected and result.ok == bool(expected)


def test_class_resolution():
    labels = get_label_set("imagenet")
    assert {labels.resolve(t).index for t in ("hummingbird", "94", "n01833805", " Hummingbird ")} == {94}
    assert (
        labels.resolve("grey whale").index
        == labels.resolve("grey_whale").index
        == labels.resolve("gray whale").index
        == 147
    )
    assert [c.index for c in labels.resolve_many("koala,94,koala")] == [105, 94]
    everything = labels.resolve_many("all")
    assert len(everything) == 100 and everything[0].index == 0
    assert labels[94].spurious_feature == "red feeder/flower" and labels[94].dirname == "94-hummingbird"
    with pytest.raises(SpurgenError, match="ambiguous"):
        labels.resolve("crane")
    with pytest.raises(SpurgenError, match="unknown class index 1000"):
        labels.resolve("1000")


def test_custom_label_set_from_tsv(tmp_path):
    tsv = tmp_path / "labels.tsv"
    tsv.write_text("index\tclass_name\tspurious_feature\tspurious_npca_components\n0\tcircle\tred dots\t[0]\n"
                   "1\tsquare\tgreen stripes\t[]\n")
    labels = get_label_set(str(tsv))
    assert labels.resolve("square").spurious_feature == "green stripes"
    assert [c.name for c in labels.resolve_many("all")] == ["circle", "square"]
    with pytest.raises(SpurgenError, match="did you mean 'circle'"):
        labels.resolve("circel")


def test_console_script_runs_as_a_subprocess(rigged, tmp_path):
    script = Path(sys.executable).parent / "spurgen"
    assert script.exists(), "the spurgen console script is not installed (pip install -e .)"
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("spurgen ")
    done = subprocess.run([str(script), "select-refs", "-w", str(tmp_path), "--dataset", str(rigged.dataset),
                           "--classes", "hummingbird", "-k", "3", "--classifiers", "res-a,conv-b,vit-c",
                           *[f"--classifier={f}" for f in rigged.flags.values()]],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "refs" / "94-hummingbird" / "selection.json").read_text())
    assert manifest["selected"] == rigged.expected_selection(94, 3)
    done = subprocess.run([sys.executable, "-m", "spurgen", "select-refs", "-w", str(tmp_path), "--classes", "koalla"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "did you mean 'koala' (105)?" in done.stderr and "Traceback" not in done.stderr
