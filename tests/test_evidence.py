"""`spurgen world evidence`: its statistics and its settings (the end-to-end run needs the world's model)."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from spurgen.cli import app
from spurgen.errors import SpurgenError
from spurgen.world.evidence import EvidenceConfig, _paired_difference, _row


def _scores(table: dict[str, dict[str, float]]) -> dict[str, dict[str, dict[str, float]]]:
    """{run: {class: accuracy}} -> the scores layout, consistent rate = accuracy / 2."""
    return {run: {cls: {"spurious_accuracy": acc, "consistent": acc / 2} for cls, acc in per_class.items()}
            for run, per_class in table.items()}


SCORES = _scores({
    "base": {"circle": 0.1, "star": 0.3},
    "sfsl-s0": {"circle": 0.6, "star": 0.8}, "sfsl-s1": {"circle": 0.5, "star": 0.9},
    "dreambooth-te-s0": {"circle": 0.5, "star": 0.8}, "dreambooth-te-s1": {"circle": 0.4, "star": 0.6},
})


def test_paired_difference_is_over_classes_and_seeds() -> None:
    differences = [0.1, 0.0, 0.1, 0.3]  # circle s0, star s0, circle s1, star s1
    result = _paired_difference(SCORES, "sfsl", "dreambooth-te", [0, 1])
    assert result["pairs"] == 4
    assert result["mean"] == pytest.approx(sum(differences) / 4)
    mean = sum(differences) / 4
    stdev = math.sqrt(sum((d - mean) ** 2 for d in differences) / 3)
    assert result["standard_error"] == pytest.approx(stdev / 2)
    consistent = _paired_difference(SCORES, "sfsl", "dreambooth-te", [0, 1], "consistent")
    assert consistent["mean"] == pytest.approx(mean / 2)  # the fixture's consistent rate is accuracy / 2
    assert consistent["standard_error"] == pytest.approx(stdev / 4)


def test_row_averages_classes_then_seeds() -> None:
    row = _row(SCORES, ["sfsl-s0", "sfsl-s1"])
    assert row["spurious_accuracy"] == pytest.approx((0.7 + 0.7) / 2)
    assert row["spurious_accuracy_std"] == pytest.approx(0.0)
    assert row["consistent"] == pytest.approx(0.35)
    assert row["runs"] == 2
    assert _row(SCORES, ["dreambooth-te-s0", "dreambooth-te-s1"])["spurious_accuracy_std"] == pytest.approx(0.075)


def test_a_class_cannot_both_tune_and_report() -> None:
    with pytest.raises(SpurgenError, match="overlap"):
        EvidenceConfig(tuning_classes=["star"], report_classes=["star", "ring"]).validate()


@pytest.mark.parametrize("args, message", [
    (["--tuning-classes", "star", "--report-classes", "star"], "overlap"),
    (["--kappas", "a,b"], "--kappas: expected numbers"),
    (["--seeds", ","], "need a value each"),
])
def test_bad_evidence_settings_are_one_line_errors(tmp_path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["world", "evidence", "-w", str(tmp_path / "ws"), *args])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "ws").exists()


def test_the_model_choice_decides_what_the_workspace_fine_tunes(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    import spurgen.world.demo
    from spurgen.workspace import Workspace
    from spurgen.world.evidence import _Experiment
    from spurgen.world.models import OUT_ENV, SD_DIR

    out = tmp_path / "out"
    (out / "sd-epsilon").mkdir(parents=True)
    (out / "sd-epsilon" / "model_index.json").write_text("{}")
    monkeypatch.setenv(OUT_ENV, str(out))
    monkeypatch.setattr(spurgen.world.demo, "render_spurious_set", lambda workspace: None)
    assert _Experiment(Workspace(tmp_path / "eps"), EvidenceConfig(model="epsilon")).settings["model"] == \
        (out / "sd-epsilon").as_posix()
    assert _Experiment(Workspace(tmp_path / "v"), EvidenceConfig()).settings["model"] == SD_DIR.as_posix()
    # A workspace keeps its runs: one model's must not be reported as another's.
    with pytest.raises(SpurgenError, match="give this model its own --workspace"):
        _Experiment(Workspace(tmp_path / "v"), EvidenceConfig(model="epsilon"))


def test_an_unknown_model_is_a_one_line_error(tmp_path) -> None:
    result = CliRunner().invoke(app, ["world", "evidence", "-w", str(tmp_path / "ws"), "--model", "x"])
    assert result.exit_code == 2
    assert "--model must be one of v, epsilon" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "ws").exists()
