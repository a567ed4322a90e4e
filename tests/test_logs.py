"""Batch jobs and logs: plain progress lines off a terminal, losses.csv during training, full-width tables in log
files, third-party noise kept out, and a class search that suggests like ``--classes`` does."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from test_finetune import HUMMINGBIRD, config, loss_rows, write_refs
from typer.testing import CliRunner

from spurgen._runtime import LOG_WIDTH, console, progress_bar
from spurgen.cli import app
from spurgen.labels import get_label_set

ANSI = re.compile(r"\x1b\[")


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines_of(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# --- Progress off a terminal --------------------------------------------------------------------------------------


def test_progress_lines_follow_steps_and_the_clock_off_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    clock = FakeClock()
    with progress_bar("it", get_time=clock) as progress:
        task = progress.add_task("koala", total=1000)
        assert capsys.readouterr().err == ""  # nothing before the first step...

        def step(seconds: float, steps: int = 1) -> list[str]:
            # The progress lock keeps the line ticker out while the clock and the count move together.
            with progress._lock:
                clock.now += seconds
                progress.update(task, advance=steps, description=f"koala: loss {seconds:.4f}")
            return lines_of(capsys.readouterr().err)

        # ...the first line at once
        assert step(0.5) == ["koala: loss 0.5000 | 1/1000 it (0%) | -- it/s | 0:00:00 elapsed | ETA --"]
        assert [step(1.0) for _ in range(9)] == [[]] * 9  # 9 s: neither 10 s nor a tenth of the steps yet
        [line] = step(1.0)  # 10 s since the last line
        assert line.startswith("koala: loss 1.0000 | 11/1000 it (1%) | 1.00 it/s | 0:00:1")
        assert line.endswith("ETA 0:16:29")
        assert step(0.5, 100) == []  # a tenth done, but within a tenth of the interval of the last line
        [line] = step(0.6)  # a tenth done and > 1 s: no need to wait the whole interval
        assert "| 112/1000 it (11%) |" in line
        # A step longer than the interval: the ticker thread prints the same count again within about a second.
        with progress._lock:
            clock.now += 10
        err = ticker_output(capsys)
        assert "| 112/1000 it (11%) |" in err and "0:00:22 elapsed" in err
        [line] = step(0.1, 888)
        assert "| 1000/1000 it (100%) |" in line and line.endswith("ETA 0:00:00")
    assert capsys.readouterr().err == ""  # the final line is not repeated when the bar stops


def ticker_output(capsys: pytest.CaptureFixture[str]) -> str:
    """What the line ticker thread prints within 10 s (it looks every second)."""
    deadline = time.monotonic() + 10
    while not (err := capsys.readouterr().err) and time.monotonic() < deadline:
        time.sleep(0.05)
    return err


def test_a_first_step_longer_than_the_interval_still_gets_a_line(capsys: pytest.CaptureFixture[str]) -> None:
    clock = FakeClock()
    with progress_bar("it", get_time=clock) as progress:
        progress.add_task("koala", total=1000)
        with progress._lock:
            clock.now += 10
        assert lines_of(ticker_output(capsys)) == ["koala | 0/1000 it (0%) | -- it/s | 0:00:10 elapsed | ETA --"]


def test_a_bar_stopped_early_prints_where_it_stopped(capsys: pytest.CaptureFixture[str]) -> None:
    clock = FakeClock()
    with pytest.raises(KeyboardInterrupt), progress_bar("images", get_time=clock) as progress:
        task = progress.add_task("[bold]generate[/]", total=50)
        progress.advance(task)
        clock.now += 2
        progress.advance(task, 3)
        raise KeyboardInterrupt
    assert [line.split(" | ")[:2] for line in lines_of(capsys.readouterr().err)] == [
        ["generate", "1/50 images (2%)"], ["generate", "4/50 images (8%)"]]


def test_redirected_finetune_prints_plain_progress_lines(tiny_sd_dir: Path, tmp_path: Path) -> None:
    workspace = write_refs(tmp_path / "ws")
    log = tmp_path / "log"
    env = {key: value for key, value in os.environ.items()
           if key not in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE")}
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-m", "spurgen", "finetune", "-w", str(workspace.root),
                               "--classes", "94", "--model", str(tiny_sd_dir), "--preset", "dreambooth-te",
                               "--steps", "12", "--num-class-images", "2", "--sample-steps", "2",
                               "--num-validation-images", "0", "--rank", "4"],
                              stdout=out, stderr=subprocess.STDOUT, timeout=600,
                              env={**env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""})
    text = log.read_text()
    assert done.returncode == 0, text[-3000:]
    assert not ANSI.search(text) and "…" not in text, text
    assert "gemm_4bit_forward" not in text  # bitsandbytes' import-time warning (on CPUs with AVX512-BF16)
    steps = [line for line in text.splitlines() if line.startswith("hummingbird: loss ")]
    assert steps and re.search(r" \| 1/12 it \(8%\) \| ", steps[0]), text
    assert " | 12/12 it (100%) | " in steps[-1] and steps[-1].endswith("ETA 0:00:00"), text
    assert all(re.fullmatch(r"hummingbird: loss \S+ \(inst \S+ prior \S+\), \|grad\| \S+, clipped \d+% "
                            r"\| \d+/12 it .* \| ETA [-0-9:]+", line)
               for line in steps), steps
    assert any(len(line) > 80 for line in steps)  # not cut to 80 columns
    assert re.search(r"class images '[^']+' \| 2/2 images \(100%\)", text), text
    assert "dreambooth-te" in text  # the summary table's run column in full


# --- losses.csv during training -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("interval", "checkpointing_steps", "rows_before_each_step"), [
    (0.0, 0, [None, 1, 2, 3]),  # at every step
    (1e9, 2, [None, 1, 2, 2]),  # after the first step, then at the checkpoints only
])
def test_losses_csv_is_written_as_training_goes(interval: float, checkpointing_steps: int,
                                                rows_before_each_step: list[int | None], tiny_sd_dir: Path,
                                                tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import spurgen.finetune
    from spurgen.finetune import Trainer, finetune

    monkeypatch.setattr(spurgen.finetune, "LOSSES_INTERVAL_S", interval)
    workspace = write_refs(tmp_path)
    folder = workspace.model_dir(HUMMINGBIRD, "dreambooth")
    seen: list[list[dict[str, str]] | None] = []
    train_step = Trainer.train_step

    def watched(self: Trainer, step: int) -> dict[str, Any]:
        seen.append(loss_rows(folder) if (folder / "losses.csv").exists() else None)
        return train_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", watched)
    finetune(config(tiny_sd_dir, preset="dreambooth", steps=4, checkpointing_steps=checkpointing_steps), workspace)
    final = loss_rows(folder)
    assert [step["step"] for step in final] == ["1", "2", "3", "4"]
    assert [None if rows is None else len(rows) for rows in seen] == rows_before_each_step
    assert all(rows == final[:len(rows)] for rows in seen if rows is not None)  # each a prefix of the final file


# --- Tables in logs -------------------------------------------------------------------------------------------------


def test_tables_are_not_cut_off_a_terminal(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from spurgen.finetune import FinetuneResult, print_finetune_table
    from spurgen.select_refs import ClassSelection, print_selection_table

    monkeypatch.delenv("COLUMNS", raising=False)
    assert console.width == LOG_WIDTH
    classifiers = ["convnext_large.fb_in22k_ft_in1k", "vit_base_patch16_224.augreg2_in21k_ft_in1k", "resnet50.a1_in1k"]
    koala = get_label_set("imagenet").resolve("koala")
    print_selection_table([ClassSelection(koala, 1300, 0, dict.fromkeys(classifiers, 41), 17)], classifiers)
    print_finetune_table([FinetuneResult(koala, run, Path(run), "trained", 1000, 0.0, {"loss": 0.1}, 30.0)
                          for run in ("dreambooth", "dreambooth-te")])
    out = capsys.readouterr().out
    assert "…" not in out and not ANSI.search(out)
    for name in (*classifiers, "spurious", "scanned", "consistent", "selected", "dreambooth ", "dreambooth-te"):
        assert name in out, out
    monkeypatch.setenv("COLUMNS", "100")
    assert console.width == 100  # COLUMNS still wins


# --- Library noise --------------------------------------------------------------------------------------------------


def test_bitsandbytes_kernel_warning_is_dropped_and_nothing_else(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING):
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already "
                       "`pip install kernels` and the kernels >= 0.11.1", "No module named 'kernels'")
        logger.warning("some other bitsandbytes warning")
        logging.getLogger("bitsandbytes").warning("Failed to load CPU gemm_4bit_forward from kernels-community: "
                                                  "other logger")
    assert [record.getMessage() for record in caplog.records] == [
        "some other bitsandbytes warning", "Failed to load CPU gemm_4bit_forward from kernels-community: other logger"]


# --- spurgen classes TEXT -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "code", "expect"), [
    (["humingbird"], 2, "error: no class name contains 'humingbird'; did you mean 'hummingbird' (94)?"),
    (["tabby"], 2, "none of the classes that 'all' selects contains 'tabby'; add --all-classes"),
    (["tabby", "--all-classes"], 0, "281   │ tabby │ n02123045"),
    (["humming"], 0, "hummingbird"),
])
def test_class_search_without_a_hit_suggests_like_classes_does(args: list[str], code: int, expect: str) -> None:
    result = CliRunner().invoke(app, ["classes", *args])
    assert result.exit_code == code and expect in result.output, result.output
    if code:
        assert len(lines_of(result.output)) == 1
