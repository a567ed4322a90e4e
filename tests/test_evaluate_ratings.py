"""evaluate with the human study's answers: hand-written ratings on the rigged images of test_evaluate.py.

Every number is recomputed here from the answers below: the naturalness distribution and mean, the object-present
rate, and Krippendorff's alpha (ordinal) from its coincidence-matrix definition (Krippendorff 2011, "Computing
Krippendorff's alpha-reliability"), independently of the krippendorff package evaluate uses.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from spurgen.cli import app
from spurgen.errors import SpurgenError
from spurgen.evaluate import evaluate, summary_tables
from spurgen.images import file_sha256
from spurgen.rate import RatingsStore, StudyImage, ratings_dir
from spurgen.workspace import Workspace

from conftest import RIGGED_CLASSIFIERS
from test_evaluate import LABELS, _config, _flags, _write_run

HUMMINGBIRD = LABELS[94]
# run-c holds copies of images of the other two runs: ratings follow the image content, not the run.
RUNS = {"run-a": [0, 1, 2, 3], "run-b": [4, 5, 6, 7], "run-c": [1, 6]}
# Per rater and rigged image: (naturalness, object answer); None = not answered. Images 6 and 7 are unrated.
ANSWERS = {
    "alice": {0: (5, "no"), 1: (4, "yes"), 2: (2, "yes"), 3: (1, "no"), 4: (5, "no"), 5: (5, "no")},
    "bob": {0: (4, "no"), 1: (4, "yes"), 2: (1, "yes"), 3: (None, "unsure"), 4: (4, None), 5: (5, "no")},
    "carol": {0: (5, "yes"), 1: (3, "yes"), 2: (None, "unsure"), 3: (2, None)},
}
# Consistently spurious for hummingbird (all three rigged scores > 0): images 0, 1, 3, 5, 6, 7.
# Most raters saw the object in images 1 (3 of 3) and 2 (2 of 3), so the export drops image 1.
CONSISTENT = {0, 1, 3, 5, 6, 7}
SEEN = {1, 2}


def _ordinal_alpha(matrix: np.ndarray) -> float:
    """Krippendorff's alpha, ordinal, of a raters x units matrix (NaN = missing), from the coincidence matrix."""
    values = sorted(set(matrix[~np.isnan(matrix)].tolist()))
    coincidences = np.zeros((len(values), len(values)))
    for unit in matrix.T:
        given = [values.index(v) for v in unit if not np.isnan(v)]
        for a in range(len(given)):
            for b in range(len(given)):
                if a != b:
                    coincidences[given[a], given[b]] += 1 / (len(given) - 1)
    n_c = coincidences.sum(axis=1)
    n = n_c.sum()
    distance = np.array([[(n_c[min(c, k):max(c, k) + 1].sum() - (n_c[c] + n_c[k]) / 2) ** 2 for k in range(len(values))]
                         for c in range(len(values))])
    return float(1 - (n - 1) * (coincidences * distance).sum() / (np.outer(n_c, n_c) * distance).sum())


def test_the_alpha_of_this_file_matches_krippendorffs_worked_example() -> None:
    # Krippendorff (2011), the 4 coders x 12 units example: ordinal alpha 0.815.
    nan = np.nan
    example = np.array([[1, 2, 3, 3, 2, 1, 4, 1, 2, nan, nan, nan],
                        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, nan, 3],
                        [nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, nan],
                        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, nan]])
    assert _ordinal_alpha(example) == pytest.approx(0.815, abs=5e-4)


@pytest.fixture(scope="module")
def rated(rigged, tmp_path_factory: pytest.TempPathFactory):
    """A workspace with hummingbird's runs RUNS and ratings/ of three raters, evaluated with an export."""
    ws = Workspace(tmp_path_factory.mktemp("rated") / "ws")
    for run, indices in RUNS.items():
        _write_run(ws, rigged, 94, run, indices)
    store = RatingsStore(ratings_dir(ws))
    for run in ("run-a", "run-b"):
        for n, i in enumerate(RUNS[run]):
            path = ws.generated_dir(HUMMINGBIRD, run) / f"{n:05d}.png"
            image = StudyImage(
                file_sha256(path), path, path.relative_to(ws.root).as_posix(), "generated", HUMMINGBIRD, run
            )
            for rater, answers in ANSWERS.items():
                if i in answers:
                    store.record(rater, image, naturalness=answers[i][0], object_present=answers[i][1])
    # An answer on an image that no evaluated source holds counts nowhere.
    stray = rigged.files[105][0]
    store.record(
        "alice", StudyImage(file_sha256(stray), stray, "elsewhere.png", "dataset", LABELS[105], None), 1, "yes"
    )
    export = ws.root.parent / "export"
    evaluation = evaluate(_config(classes=["hummingbird"], export=str(export), drop_object_present=True), ws,
                          _flags(rigged))
    return ws, evaluation, export


def _expected(run: str) -> dict[str, object]:
    """The summary of one run's images, computed from ANSWERS."""
    rated = [i for i in RUNS[run] if any(i in answers for answers in ANSWERS.values())]
    raters = [r for r in ANSWERS if any(ANSWERS[r].get(i, (None,))[0] is not None for i in rated)]
    matrix = np.array([[np.nan if ANSWERS[r].get(i, (None,))[0] is None else ANSWERS[r][i][0] for i in rated]
                       for r in raters])
    scores = matrix[~np.isnan(matrix)]
    objects = [[ANSWERS[r][i][1] for r in ANSWERS if i in ANSWERS[r] and ANSWERS[r][i][1] is not None] for i in rated]
    answered = [o for o in objects if o]
    seen = sum(o.count("yes") > len(o) / 2 for o in answered)
    return {"images_rated": int((~np.isnan(matrix)).any(axis=0).sum()), "ratings": len(scores), "raters": len(raters),
            "naturalness_counts": {str(s): int((scores == s).sum()) for s in range(1, 6)},
            "naturalness_distribution": {str(s): float((scores == s).mean()) for s in range(1, 6)},
            "naturalness_mean": float(scores.mean()), "krippendorff_alpha_ordinal": _ordinal_alpha(matrix),
            "object_answers": len(answered), "object_present_images": seen, "object_present_rate": seen / len(answered)}


def test_evaluation_json_has_each_sources_ratings_as_computed_here(rated) -> None:
    ws, _, _ = rated
    report = json.loads((ws.reports_dir / "evaluation.json").read_text())
    found = {entry.pop("source"): entry for entry in report["ratings"]}
    assert set(found) == set(RUNS)  # the stray answer matches nothing
    for source, entry in found.items():
        assert entry.pop("class") == 94
        expected = _expected(source)
        assert entry.pop("naturalness_counts") == expected.pop("naturalness_counts")
        assert entry.pop("naturalness_distribution") == pytest.approx(expected.pop("naturalness_distribution"))
        assert entry == pytest.approx(expected), source
    # the numbers checked by hand once: run-a's 10 scores add up to 31, 2 of 4 images with the object seen
    assert found["run-a"]["naturalness_mean"] == pytest.approx(3.1) and found["run-a"]["ratings"] == 10
    assert found["run-a"]["object_present_rate"] == 0.5


def test_the_terminal_table_and_the_report_chart_show_the_distribution(rated) -> None:
    ws, evaluation, _ = rated
    table = summary_tables(evaluation)[-1]
    assert table.title.startswith("Human ratings")
    expected = _expected("run-a")
    row = next(r for r in table.rows if r[1] == "run-a")
    shares = [f"{100 * expected['naturalness_distribution'][str(s)]:.1f}" for s in range(1, 6)]  # type: ignore[index]
    assert row == [str(HUMMINGBIRD), "run-a", "4", "3", *shares, f"{expected['naturalness_mean']:.2f}",
                   f"{expected['krippendorff_alpha_ordinal']:.3f}", "50.0"]
    assert [r[1] for r in table.rows] == list(RUNS)
    page = (ws.reports_dir / "report.html").read_text()
    assert "naturalness ratings (share of scores 1-5)" in page
    for score in range(1, 6):  # one bar per score and rated source, titled with its share
        share = 100 * expected["naturalness_distribution"][str(score)]  # type: ignore[index]
        assert f"<title>{score} / run-a: {share:.1f}%</title>" in page


def test_export_drops_the_images_most_raters_saw_the_object_in(rated) -> None:
    _, _, export = rated
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["drop_object_present"] is True
    kept = sorted(Path(e["file"]).name for e in manifest["images"])
    expected = sorted(f"{run}_{n:05d}.png" for run, indices in RUNS.items() for n, i in enumerate(indices)
                      if i in CONSISTENT and i not in SEEN)
    assert kept == expected and len(kept) == 6


def test_drop_object_present_needs_ratings_and_an_export(rigged, tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    _write_run(ws, rigged, 94, "run-a", RUNS["run-a"])
    with pytest.raises(SpurgenError, match="needs the answers of 'spurgen rate'"):
        evaluate(_config(export=str(tmp_path / "out"), drop_object_present=True), ws, _flags(rigged))
    with pytest.raises(SpurgenError, match="add --export DIR"):
        _config(drop_object_present=True)
    assert not (tmp_path / "out").exists() and not ws.reports_dir.exists()


def test_cli_passes_drop_object_present_to_the_export(rated, rigged) -> None:
    ws, _, _ = rated
    export = ws.root.parent / "export-cli"
    result = CliRunner().invoke(app, ["evaluate", "-w", str(ws.root), "--classes", "hummingbird", "--classifiers",
                                      ",".join(RIGGED_CLASSIFIERS), "--num-workers", "0", "--device", "cpu",
                                      "--export", str(export), "--drop-object-present",
                                      *(f"--classifier={f}" for f in _flags(rigged))])
    assert result.exit_code == 0, result.output
    kept = sum(1 for run, indices in RUNS.items() for i in indices if i in CONSISTENT and i not in SEEN)
    assert f"exported {kept} consistently spurious images" in result.output
