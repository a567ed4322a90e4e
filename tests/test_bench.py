"""python -m bench's plumbing: every stage accepts its size's arguments on every device, and the table renders
every kind of record (a stage without a baseline, a failed stage)."""

from __future__ import annotations

import importlib
import inspect

import pytest

from bench.__main__ import STAGES, _stage_arguments, print_table


@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("size", ["tiny", "full"])
def test_each_stage_takes_its_size_arguments(stage: str, device: str, size: str) -> None:
    module = importlib.import_module(STAGES[stage])
    arguments = _stage_arguments(stage, module, size, repeats=2, threads=None, device=device)
    inspect.signature(module.run).bind(**arguments)  # raises TypeError on a key run() does not take
    if device == "cuda" and size == "full" and hasattr(module, "GPU_SIZES"):
        assert arguments.items() >= module.GPU_SIZES["full"].items()


def test_the_table_shows_records_without_a_baseline_and_failed_stages(capsys: pytest.CaptureFixture[str]) -> None:
    print_table([
        {"stage": "demo", "name": "spurgen demo", "ours": 222.0, "baseline": None, "ratio": None, "unit": "s",
         "target_text": "<= 600 s", "verdict": "ok"},
        {"stage": "generate", "name": "generate", "error": "OSError: disk full"},
        {"stage": "evaluate", "name": "evaluate (x)", "ours": 5.5, "baseline": 6.0, "ratio": 0.917, "paired_ratio": 0.9,
         "unit": "images/s", "target_text": ">= 0.8", "verdict": "ok", "ours_peak_mb": 10.0, "baseline_peak_mb": 9.0},
    ], "title")
    out = capsys.readouterr().out
    assert "222.000 s" in out and "<= 600 s" in out
    assert "failed: OSError: disk full" in out
    assert "0.900" in out and "10 / 9 MB" in out
