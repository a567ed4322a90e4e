"""evaluate on the rigged classifiers of conftest.py, whose logits on every image are designed in advance.

Generated runs and references are copies of the rigged data set's images, so every number evaluate reports
can be computed here from RIGGED_SCORES alone: classifier c predicts class k on image i iff its score is
> 0, and gives k the probability e^s / (e^s + 1 + 998 e^-10) (the decoy class sits at 0, the rest at -10).
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from spurgen.cli import app
from spurgen.config import EvaluateConfig, SelectRefsConfig, resolve_config
from spurgen.errors import SpurgenError
from spurgen.evaluate import average_precision, evaluate, roc_auc
from spurgen.labels import get_label_set
from spurgen.select_refs import select_refs
from spurgen.workspace import Workspace

from conftest import RIGGED_CLASSIFIERS, RIGGED_DECOY

LABELS = get_label_set("imagenet")
RUNS = {94: {"run-a": [0, 1, 2, 3], "run-b": [4, 5, 6, 7]}, 105: {"run-a": [0, 1, 2, 3]}}
REFS_K = 2


def _probability(score: float) -> float:
    return float(np.exp(score) / (np.exp(score) + 1.0 + 998 * np.exp(-10.0)))


def _write_run(ws: Workspace, rigged, class_index: int, run: str, indices: list[int]) -> None:
    """A finished generated run whose images are copies of rigged images (generation.json as generate writes it)."""
    folder = ws.generated_dir(LABELS[class_index], run)
    folder.mkdir(parents=True)
    entries = []
    for n, i in enumerate(indices):
        shutil.copyfile(rigged.files[class_index][i], folder / f"{n:05d}.png")
        entries.append({"index": n, "file": f"{n:05d}.png", "seed": n})
    (folder / "generation.json").write_text(json.dumps({"stage": "generate", "status": "complete",
                                                        "num_images": len(indices), "images": entries}))


def _write_refs(ws: Workspace, rigged, class_index: int) -> list[int]:
    """References as select-refs leaves them: the top REFS_K consistently spurious images and selection.json."""
    names = rigged.expected_selection(class_index, REFS_K)
    folder = ws.refs_dir(LABELS[class_index])
    folder.mkdir(parents=True)
    for name in names:
        shutil.copyfile(
            rigged.dataset / f"spurious_imagenet_{class_index}_{LABELS[class_index].slug}_0" / name, folder / name
        )
    (folder / "selection.json").write_text(json.dumps({"selected": names}))
    return [int(name.split("_")[-1].split(".")[0]) for name in names]


def _flags(rigged) -> list[str]:
    return [rigged.flags[name] for name in RIGGED_CLASSIFIERS]


def _config(**values: object) -> EvaluateConfig:
    base = {"classifiers": list(RIGGED_CLASSIFIERS), "num_workers": 0, "device": "cpu"}
    return resolve_config(EvaluateConfig, {}, "evaluate", {**base, **values})


@pytest.fixture(scope="module")
def scenario(rigged, tmp_path_factory: pytest.TempPathFactory):
    """A workspace with two runs for hummingbird, one for koala, references for both; evaluated with --dataset
    and --export. Returns the workspace, the evaluation, the image indices of each source, and the export folder."""
    ws = Workspace(tmp_path_factory.mktemp("evaluate") / "ws")
    sources: dict[int, dict[str, list[int]]] = {}
    for class_index, runs in RUNS.items():
        for run, indices in runs.items():
            _write_run(ws, rigged, class_index, run, indices)
        sources[class_index] = {"spurious-imagenet": list(range(8)), "refs": _write_refs(ws, rigged, class_index),
                                **runs}
    export = ws.root.parent / "export"
    evaluation = evaluate(_config(dataset=str(rigged.dataset), export=str(export)), ws, _flags(rigged))
    return ws, evaluation, sources, export


def _expected(rigged, class_index: int, indices: list[int]) -> dict[str, object]:
    """Every measure of one class and source, from the designed scores."""
    scores = rigged.scores(class_index)[:, indices]  # [classifiers, images]
    return {
        "spurious_accuracy": (scores > 0).mean(axis=1),
        "mean_class_probability": np.vectorize(_probability)(scores).mean(axis=1),
        # The class scores >= -3 while all but the decoy sit at -10: always within the top five.
        "top5_rate": np.ones(len(RIGGED_CLASSIFIERS)),
        "consistently_spurious_rate": float((scores > 0).all(axis=0).mean()),
    }


def test_every_number_in_the_json_and_csv_equals_the_designed_one(scenario, rigged) -> None:
    ws, _, sources, _ = scenario
    report = json.loads((ws.reports_dir / "evaluation.json").read_text())
    rows = report["results"]
    assert len(rows) == sum(len(s) for s in sources.values()) * len(RIGGED_CLASSIFIERS)
    with open(ws.reports_dir / "evaluation.csv", newline="") as handle:
        csv_rows = list(csv.DictReader(handle))
    assert len(csv_rows) == len(rows)
    for row, csv_row in zip(rows, csv_rows):
        indices = sources[row["class_index"]][row["source"]]
        expected = _expected(rigged, row["class_index"], indices)
        c = RIGGED_CLASSIFIERS.index(row["classifier"])
        assert row["images"] == len(indices) and row["unreadable"] == 0
        assert row["spurious_accuracy"] == pytest.approx(expected["spurious_accuracy"][c], abs=1e-12)
        assert row["top5_rate"] == pytest.approx(expected["top5_rate"][c], abs=1e-12)
        assert row["mean_class_probability"] == pytest.approx(expected["mean_class_probability"][c], abs=2e-3)
        assert row["consistently_spurious_rate"] == pytest.approx(expected["consistently_spurious_rate"], abs=1e-12)
        assert row["spurious_score_roc_auc"] is None and row["quality_mean"] is None
        for key in (
            "class_index",
            "images",
            "spurious_accuracy",
            "mean_class_probability",
            "consistently_spurious_rate",
        ):
            assert float(csv_row[key]) == pytest.approx(float(row[key]), rel=1e-12), key
        assert (csv_row["source"], csv_row["classifier"], csv_row["spurious_score_roc_auc"]) == (
            row["source"],
            row["classifier"],
            "",
        )

    # the mean over classes, per source and classifier (the tables' 'mean' rows)
    for mean in report["means"]:
        c = RIGGED_CLASSIFIERS.index(mean["classifier"])
        per_class = [_expected(rigged, k, s[mean["source"]])["spurious_accuracy"][c] for k, s in sources.items()
                     if mean["source"] in s]
        assert mean["classes"] == len(per_class)
        assert mean["spurious_accuracy"] == pytest.approx(np.mean(per_class), abs=1e-12)

    # per image: each classifier's top-1, probability of the class, and consistency
    images = report["images"]
    assert len(images) == sum(len(i) for s in sources.values() for i in s.values())
    for image in images:
        name = Path(image["file"]).name
        source_indices = sources[image["class"]][image["source"]]
        i = (
            source_indices[int(name.split(".")[0])]
            if image["source"].startswith("run-")
            else int(name.split("_")[-1][:2])
        )
        scores = rigged.scores(image["class"])[:, i]
        for c, classifier in enumerate(RIGGED_CLASSIFIERS):
            prediction = image["predictions"][classifier]
            assert prediction["top1"] == (image["class"] if scores[c] > 0 else RIGGED_DECOY)
            assert prediction["top1_label"] == LABELS.label(prediction["top1"])
            assert prediction["class_probability"] == pytest.approx(_probability(scores[c]), abs=2e-3)
        assert image["consistently_spurious"] == bool((scores > 0).all())
    with open(ws.reports_dir / "evaluation-images.csv", newline="") as handle:
        assert sum(1 for _ in csv.DictReader(handle)) == len(images) * len(RIGGED_CLASSIFIERS)


def test_each_image_is_classified_once_and_the_cache_is_shared(scenario, rigged) -> None:
    ws, _, _, _ = scenario
    report = json.loads((ws.reports_dir / "evaluation.json").read_text())
    # runs and references are copies of data set images: only the 16 distinct images of the two classes
    assert report["computed_predictions"] == {name: 16 for name in RIGGED_CLASSIFIERS}
    selection = select_refs(resolve_config(SelectRefsConfig, {}, "select-refs", {
        "classes": ["hummingbird"], "dataset": str(rigged.dataset), "classifiers": list(RIGGED_CLASSIFIERS),
        "num_workers": 0, "device": "cpu", "k": 2}), ws, _flags(rigged))
    manifest = json.loads((selection[0].folder / "selection.json").read_text())
    assert manifest["computed_predictions"] == {name: 0 for name in RIGGED_CLASSIFIERS}


def test_cli_prints_table_1_and_table_2_and_reuses_the_cache(scenario, rigged) -> None:
    ws, _, _, _ = scenario
    args = ["evaluate", "-w", str(ws.root), "--classifiers", ",".join(RIGGED_CLASSIFIERS), "--num-workers", "0",
            "--device", "cpu", "--dataset", str(rigged.dataset), *(f"--classifier={f}" for f in _flags(rigged))]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Table 1: spurious accuracy (%)" in result.output and "Table 2: spurious accuracy (%)" in result.output
    for text in ("hummingbird (94)", "koala (105)", "run-a", "run-b", "spurious-imagenet", "mean"):
        assert text in result.output
    report = json.loads((ws.reports_dir / "evaluation.json").read_text())
    assert report["computed_predictions"] == {name: 0 for name in RIGGED_CLASSIFIERS}
    assert "report: " in result.output and "32 images of 2 class(es)" in result.output


def test_export_holds_exactly_the_consistently_spurious_generated_images_and_reads_back(scenario, rigged,
                                                                                         tmp_path: Path) -> None:
    ws, evaluation, _, export = scenario
    expected = set()
    for class_index, runs in RUNS.items():
        scores = rigged.scores(class_index)
        for run, indices in runs.items():
            expected |= {(class_index, f"{run}_{n:05d}.png") for n, i in enumerate(indices) if (scores[:, i] > 0).all()}
    folders = sorted(p for p in (export / "images").iterdir() if p.is_dir())
    # named like Spurious ImageNet's: class index third, the class's first neural-PCA component last
    assert [f.name for f in folders] == sorted(f"spurgen_generated_{c.index}_{c.slug}_{c.npca_components[0]}"
                                               for c in (LABELS[94], LABELS[105]))
    found = {(int(f.name.split("_")[2]), p.name) for f in folders for p in f.iterdir()}
    assert found == expected and evaluation.exported == len(expected) == 8
    manifest = json.loads((export / "manifest.json").read_text())
    assert {(e["class"], Path(e["file"]).name) for e in manifest["images"]} == expected
    # read as Spurious ImageNet's evaluate_all_models.py reads it: int() of the first line
    with open(export / "images" / "timestamp.txt") as f:
        timestamp = int(f.readline().rstrip())
    assert timestamp == manifest["timestamp"] and abs(timestamp - time.time()) < 3600 and manifest["created"]
    assert (export / "spurious_imagenet_classes.tsv").read_text().splitlines()[1:] == [
        f"{c.index}\t{c.name}\t{c.spurious_feature}\t{list(c.npca_components)}" for c in (LABELS[94], LABELS[105])]

    # select-refs reads the export as a Spurious ImageNet folder: the top folder and its images/ alike
    result = CliRunner().invoke(
        app,
        [
            "select-refs",
            "-w",
            str(ws.root.parent / "readback"),
            "--dataset",
            str(export),
            "--classes",
            "94,105",
            "-k",
            "10",
            "--classifiers",
            ",".join(RIGGED_CLASSIFIERS),
            "--num-workers",
            "0",
            "--device",
            "cpu",
            *(f"--classifier={f}" for f in _flags(rigged)),
        ],
    )
    assert result.exit_code == 0, result.output
    hummingbird = json.loads((ws.root.parent / "readback" / "refs" / "94-hummingbird" / "selection.json").read_text())
    assert hummingbird["summary"]["scanned"] == 6 and hummingbird["summary"]["consistently_spurious"] == 6

    # an export replaces an earlier export in its folder, but a folder holding anything else is refused
    other = Workspace(shutil.copytree(ws.root, tmp_path / "ws"))  # keeps the shared workspace's reports as they are
    evaluate(_config(runs=["run-b"], classes=["94"], export=str(export)), other, _flags(rigged))
    assert {p.name for p in (export / "images").glob("*/*.png")} == {n for k, n in expected if n.startswith("run-b")}
    with pytest.raises(SpurgenError, match="already holds other files"):
        evaluate(_config(export=str(other.root / "refs")), other, _flags(rigged))


def test_report_page_is_self_contained_with_tables_chart_and_captioned_grids(scenario) -> None:
    ws, _, _, _ = scenario
    page = (ws.reports_dir / "report.html").read_text()
    assert "Table 1: spurious accuracy" in page and "Table 2: spurious accuracy" in page
    assert page.count("<svg") == 3  # the overall chart and one per class
    assert page.count("data:image/jpeg;base64,") == 32  # every image: no source has more than 16
    assert "consistently spurious</span>" in page and "✓ res-a: hummingbird" in page and "conv-b: goldfish" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    assert 'href="../generated/94-hummingbird/run-a/00000.png"' in page


def test_report_renders_in_headless_chromium(scenario, tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium here (apt-get install chromium) to render report.html")
    ws, _, _, _ = scenario
    shot = tmp_path / "report.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1400,2400",
                    f"--screenshot={shot}", (ws.reports_dir / "report.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.int16)
    assert pixels.shape[:2] == (2400, 1400)
    # Rendered, not blank: the page has dark text and the green frames of consistently spurious images.
    assert (pixels.sum(axis=2) < 200).mean() > 0.002
    green = (pixels[..., 1] > 140) & (pixels[..., 0] < 60) & (pixels[..., 2] < 100)
    assert green.sum() > 500


def test_spurious_score_is_roc_auc_and_average_precision_each_named(rigged, tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    _write_run(ws, rigged, 94, "run-a", [0, 1, 3, 4, 6, 7])
    val = tmp_path / "val" / "n01833805"  # the class's WordNet id, as ImageNet's validation folders are named
    val.mkdir(parents=True)
    for i in (2, 5):  # real class images: scores that no source image shares, so the ranking is the designed one
        shutil.copyfile(rigged.files[94][i], val / rigged.files[94][i].name)
    extra = tmp_path / "extra"
    extra.mkdir()
    for i in (0, 7):
        shutil.copyfile(rigged.files[94][i], extra / rigged.files[94][i].name)
    evaluate(_config(classes=["94"], val_images=str(tmp_path / "val"), images=[f"mine={extra}"]), ws, _flags(rigged))
    report = json.loads((ws.reports_dir / "evaluation.json").read_text())
    negatives = {"run-a": [0, 1, 3, 4, 6, 7], "mine": [0, 7]}
    assert {r["source"] for r in report["results"]} == set(negatives)
    for row in report["results"]:
        c = RIGGED_CLASSIFIERS.index(row["classifier"])
        scores = rigged.scores(94)[c]
        pos = sorted((scores[i] for i in (2, 5)), reverse=True)
        neg = [scores[i] for i in negatives[row["source"]]]
        # ROC-AUC by the trapezoid rule over the ROC curve; AP as the mean precision at each positive's rank
        ranked = sorted([(s, 1) for s in pos] + [(s, 0) for s in neg], reverse=True)
        tpr = np.cumsum([y for _, y in ranked]) / len(pos)
        fpr = np.cumsum([1 - y for _, y in ranked]) / len(neg)
        auc = float(np.trapezoid(np.r_[0, tpr], np.r_[0, fpr]))
        precision_at_positives = [sum(y for _, y in ranked[:r + 1]) / (r + 1) for r, (_, y) in enumerate(ranked) if y]
        assert row["spurious_score_roc_auc"] == pytest.approx(auc, abs=1e-12)
        assert row["spurious_score_average_precision"] == pytest.approx(np.mean(precision_at_positives), abs=1e-12)
    assert report["val_images"] == {"94": [str(val / rigged.files[94][i].name) for i in (2, 5)]}
    # the functions themselves, ties included: a tie counts half for the AUC and forms one threshold for AP
    assert roc_auc([0.9, 0.5], [0.5, 0.1]) == pytest.approx((1 + 1 + 0.5 + 1) / 4)
    assert average_precision([0.9, 0.5], [0.5, 0.1]) == pytest.approx(0.5 * 1.0 + 0.5 * (2 / 3))


def test_quality_through_pyiqa_with_a_local_random_weight_topiq(rigged, tmp_path: Path) -> None:
    pyiqa = pytest.importorskip("pyiqa", reason="pyiqa (the 'quality' extra) is not installed")
    import torch
    from torchvision.transforms.functional import to_tensor

    metric = pyiqa.create_metric("topiq_nr", device="cpu", pretrained=False, backbone_pretrain=False)
    weights = tmp_path / "topiq_random.pth"
    torch.save({"params": metric.net.state_dict()}, weights)  # pyiqa's own checkpoint layout
    ws = Workspace(tmp_path / "ws")
    _write_run(ws, rigged, 94, "run-a", [0, 1, 2])
    export = tmp_path / "export"
    independent = [float(metric(to_tensor(Image.open(rigged.files[94][i]).convert("RGB"))[None])) for i in (0, 1, 2)]
    bar = sorted(independent)[1]
    evaluate(_config(classes=["94"], quality="topiq", quality_weights=str(weights), export=str(export),
                     min_quality=bar), ws, _flags(rigged))
    report = json.loads((ws.reports_dir / "evaluation.json").read_text())
    assert report["quality"] == {"metric": "topiq_nr", "weights": str(weights), "lower_better": False}
    scores = [image["quality"] for image in report["images"]]
    assert scores == pytest.approx(independent, abs=1e-5)
    row = report["results"][0]
    assert row["quality_metric"] == "topiq_nr"
    assert row["quality_mean"] == pytest.approx(np.mean(independent), abs=1e-5)
    assert row["quality_std"] == pytest.approx(np.std(independent), abs=1e-5)
    kept = {f"run-a_{n:05d}.png" for n, i in enumerate((0, 1, 2))
            if (rigged.scores(94)[:, i] > 0).all() and independent[n] >= bar}
    assert {Path(e["file"]).name for e in json.loads((export / "manifest.json").read_text())["images"]} == kept
    with pytest.raises(SpurgenError, match="unknown quality metric 'topiqq'; did you mean topiq_nr"):
        evaluate(_config(classes=["94"], quality="topiqq"), ws, _flags(rigged))
    with pytest.raises(SpurgenError, match="needs a reference image"):
        evaluate(_config(classes=["94"], quality="psnr"), ws, _flags(rigged))


def test_without_pyiqa_the_message_says_how_to_install_it(
    rigged, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # makes `import pyiqa` fail as if it were not installed
    ws = Workspace(tmp_path / "ws")
    _write_run(ws, rigged, 94, "run-a", [0])
    with pytest.raises(SpurgenError, match=r"pip install 'spurgen\[quality\]'"):
        evaluate(_config(quality="topiq"), ws, _flags(rigged))


def test_bad_input_is_a_one_line_error_before_any_work(rigged, tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    ws.generated_dir(LABELS[94], "empty").mkdir(parents=True)
    with pytest.raises(SpurgenError, match=r"94-hummingbird/empty has no generated images; run 'spurgen generate "
                                           r"--classes 94 --runs empty' first"):
        evaluate(_config(classes=["94"], runs=["empty"]), ws, _flags(rigged))
    with pytest.raises(SpurgenError, match=r"nothing to evaluate for hummingbird \(94\)"):
        evaluate(_config(classes=["94"]), ws, _flags(rigged))
    _write_run(ws, rigged, 94, "half", [0, 1])
    manifest = ws.generated_dir(LABELS[94], "half") / "generation.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "status": "incomplete", "num_images": 4}))
    with pytest.raises(SpurgenError, match=r"generation is incomplete \(2 of 4 images\)"):
        evaluate(_config(classes=["94"], runs=["half"]), ws, _flags(rigged))
    with pytest.raises(SpurgenError, match="--min-quality needs a quality metric"):
        _config(min_quality=0.5, export="x")
    (tmp_path / "val" / "n01833805").mkdir(parents=True)
    shutil.copyfile(rigged.files[94][2], tmp_path / "val" / "n01833805" / "real.png")
    with pytest.raises(SpurgenError, match=r"--val-images .*val has no folder for koala \(105\); expected a sub-folder "
                                           r"named n01882714 or 105-koala or 105"):
        evaluate(_config(classes=["94", "105"], dataset=str(rigged.dataset), val_images=str(tmp_path / "val")),
                 ws, _flags(rigged))
    assert not ws.reports_dir.exists()


# --- Spurious ImageNet's protocol, computed here as their code computes it -------------------------------------------


def _their_average_precision(y_true: list[int], y_score: np.ndarray) -> float:
    """scikit-learn's ``average_precision_score``, which their ``spurious_score.py`` calls (not installed here):
    precision and recall at each distinct score, from the highest down, and AP = sum of (R_n - R_n-1) x P_n."""
    order = np.argsort(-y_score, kind="mergesort")
    labels, scores = np.asarray(y_true)[order], y_score[order]
    ap, previous_recall, hits = 0.0, 0.0, 0
    for n in range(len(scores)):
        hits += labels[n]
        if n + 1 < len(scores) and scores[n + 1] == scores[n]:
            continue  # one threshold for equal scores
        recall = hits / labels.sum()
        ap += (recall - previous_recall) * hits / (n + 1)
        previous_recall = recall
    return ap


def _their_probabilities(model, default_cfg: dict, transform, files: list[Path], temperature: float = 1.0):
    """[images, classes]: their get_probabilities_targets: default_loader, the transform, NormalizationWrapper
    with the model's mean and std, logits / T (TemperatureWrapper), float32 softmax."""
    import torch

    mean = torch.tensor(default_cfg["mean"])[:, None, None]
    std = torch.tensor(default_cfg["std"])[:, None, None]
    with torch.no_grad():
        batch = torch.stack([transform(Image.open(f).convert("RGB")) for f in files])
        return torch.softmax(model((batch - mean) / std) / temperature, dim=1).numpy()


def test_protocol_spurious_imagenet_gives_their_scores_to_the_last_digit(rigged, tmp_path: Path) -> None:
    from torchvision import transforms

    from spurgen.classifiers import ROBUST_RN50_TEMPERATURE, builtin_classifiers, load_classifier, parse_classifier

    ws = Workspace(tmp_path / "ws")
    classes = (94, 105)
    for k in classes:
        _write_run(ws, rigged, k, "run-a", [0, 2, 4, 6])
    # Real images of another size and shape than the spurious ones, so that their resize and crop matter.
    val: dict[int, list[Path]] = {}
    rng = np.random.default_rng(7)
    for k in classes:
        folder = tmp_path / "val" / LABELS[k].synset
        folder.mkdir(parents=True)
        val[k] = []
        for i in range(5):
            val[k].append(folder / f"val_{i}.png")
            Image.fromarray(rng.integers(0, 256, (70 + 9 * i, 52, 3), dtype=np.uint8)).save(val[k][-1])
    evaluation = evaluate(_config(classes=[str(k) for k in classes], dataset=str(rigged.dataset),
                                  val_images=str(tmp_path / "val"), protocol="spurious-imagenet"), ws, _flags(rigged))
    report = json.loads((ws.reports_dir / "evaluation.json").read_text())
    assert report["protocol"] == "spurious-imagenet" and evaluation.protocol == "spurious-imagenet"

    sources = {"spurious-imagenet": {k: rigged.files[k] for k in classes},
               "run-a": {k: [ws.generated_dir(LABELS[k], "run-a") / f"{n:05d}.png" for n in range(4)] for k in classes}}
    differences = []
    for name in RIGGED_CLASSIFIERS:
        model = load_classifier(parse_classifier(rigged.flags[name], {})).model
        cfg = model.default_cfg  # their get_model: test_input_size, else input_size; mean and std
        size = cfg.get("test_input_size", cfg["input_size"])[1]
        bicubic = transforms.InterpolationMode.BICUBIC
        no_crop = transforms.Compose([transforms.Resize(size, interpolation=bicubic), transforms.ToTensor()])
        test = transforms.Compose([transforms.Resize(int(256 / 224 * size), interpolation=bicubic),
                                   transforms.CenterCrop(size), transforms.ToTensor()])
        for source, files in sources.items():
            # their calculate_spurious_score, class by class, then pooled
            in_scores = {k: _their_probabilities(model, cfg, test, val[k])[:, k] for k in classes}
            out_scores = {k: _their_probabilities(model, cfg, no_crop, files[k])[:, k] for k in classes}
            per_class = {k: _their_average_precision(len(in_scores[k]) * [1] + len(out_scores[k]) * [0],
                                                     np.concatenate([in_scores[k], out_scores[k]])) for k in classes}
            merged_in = np.concatenate([in_scores[k] for k in classes])
            merged_out = np.concatenate([out_scores[k] for k in classes])
            joint = _their_average_precision(len(merged_in) * [1] + len(merged_out) * [0],
                                             np.concatenate([merged_in, merged_out]))
            rows = {r["class_index"]: r for r in report["results"] if r["source"] == source and r["classifier"] == name}
            mean = next(m for m in report["means"] if m["source"] == source and m["classifier"] == name)
            differences += [abs(rows[k]["spurious_score_average_precision"] - per_class[k]) for k in classes]
            differences += [abs(mean["spurious_score_average_precision"] - np.mean(list(per_class.values()))),
                            abs(mean["spurious_score_joint_average_precision"] - joint)]
    print(f"largest difference from Spurious ImageNet's computation: {max(differences):.3g}")
    assert max(differences) <= 1e-6
    # the scores are not all trivially 1: the ranking mixes real and spurious images
    assert min(m["spurious_score_joint_average_precision"] for m in report["means"]) < 0.99
    # their robust ResNet-50's temperature, in full
    assert builtin_classifiers("imagenet")["robust-rn50"].temperature == ROBUST_RN50_TEMPERATURE == 0.7155761122703552


def test_images_the_safety_checker_blanked_are_left_out_and_counted(rigged, tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    _write_run(ws, rigged, 94, "run-a", [0, 1, 4, 5])
    manifest_file = ws.generated_dir(LABELS[94], "run-a") / "generation.json"
    manifest = json.loads(manifest_file.read_text())
    for entry in manifest["images"][1:3]:  # images 1 and 4: spurious for every classifier, then for none
        entry["nsfw_flagged"] = True
    manifest_file.write_text(json.dumps(manifest))
    evaluation = evaluate(_config(classes=["94"]), ws, _flags(rigged))
    report = json.loads((ws.reports_dir / "evaluation.json").read_text())
    assert report["blanked"] == 2 and evaluation.blanked == 2
    assert [(s["name"], s["images"], s["blanked"]) for s in report["sources"]] == [("run-a", 2, 2)]
    expected = _expected(rigged, 94, [0, 5])
    for row in report["results"]:
        c = RIGGED_CLASSIFIERS.index(row["classifier"])
        assert row["blanked"] == 2 and row["spurious_accuracy"] == pytest.approx(expected["spurious_accuracy"][c])
    assert {i["file"] for i in report["images"]} == {str(manifest_file.parent / f) for f in ("00000.png", "00003.png")}
    assert "2 image(s) blanked by the safety checker left out" in (ws.reports_dir / "report.html").read_text()

    for entry in manifest["images"]:  # a run the checker blanked whole has nothing to measure
        entry["nsfw_flagged"] = True
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(SpurgenError, match="blanked all 4 images; generate them again with --no-safety-checker"):
        evaluate(_config(classes=["94"], runs=["run-a"]), ws, _flags(rigged))
