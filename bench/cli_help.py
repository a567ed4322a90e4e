"""``spurgen --help`` in a fresh process against bare Python starts, median of a few runs.

The CLI imports nothing heavy until a command runs (docs/DEVELOPING.md), so its help is the interpreter's
start plus Typer, rich and the settings dataclasses. Two targets: under 1 s, and at most 2x a bare
``python -c "import typer, rich"``, the start of any Typer CLI (Typer's help renderer itself costs most of the rest).

    python -m bench.cli_help [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from ._common import add_common_arguments, measure_interleaved, save_run

TARGET_S = 1.0
TARGET_RATIO = 2.0
# run()'s arguments per --size: the same at both sizes.
SIZES: dict[str, dict[str, Any]] = {"tiny": {}, "full": {}}
# An installed package has its bytecode compiled; without it every run would time compiling spurgen's sources.
_ENV = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}


def _process(*args: str) -> Callable[[], None]:
    def start() -> None:
        subprocess.run([sys.executable, *args], check=True, capture_output=True, env=_ENV)

    return start


def run(repeats: int = 5, device: str = "cpu") -> list[dict[str, Any]]:
    """Times ``python -m spurgen --help``, ``python -c "import typer, rich"`` and ``python -c pass`` in turns.

    Args:
        repeats: Timed turns of each, after one warm-up (which fills the file and bytecode caches).
        device: Unused: the help never touches a device.

    Returns:
        Two records: the help's time against the bare start, and its ratio to the Typer start.
    """
    times = measure_interleaved({"help": _process("-m", "spurgen", "--help"),
                                 "typer": _process("-c", "import typer, rich"), "python": _process("-c", "pass")},
                                repeats=max(repeats, 3))
    seconds, typer_seconds, python_seconds = times["help"].median, times["typer"].median, times["python"].median
    # Each turn's ratio: a load that drifts over the run slows both sides of a turn alike.
    ratio = statistics.median(h / t for h, t in zip(times["help"].seconds, times["typer"].seconds))
    print(f"spurgen --help: {seconds:.3f} s (median of {len(times['help'].seconds)}; bare python "
          f"{python_seconds:.3f} s), target < {TARGET_S} s")
    print(f"spurgen --help / python -c 'import typer, rich' ({typer_seconds:.3f} s): {seconds / typer_seconds:.2f}x, "
          f"paired {ratio:.2f}x, target <= {TARGET_RATIO:g}x")
    return [{"stage": "help", "name": "spurgen --help (subprocess, median)", "unit": "s", "ours": seconds,
             "baseline": python_seconds, "ratio": seconds / python_seconds, "target": TARGET_S,
             "target_text": f"< {TARGET_S} s", "verdict": "ok" if seconds < TARGET_S else "ABOVE TARGET",
             "ours_seconds": times["help"].seconds, "baseline_seconds": times["python"].seconds,
             "ours_peak_mb": None, "baseline_peak_mb": None},
            {"stage": "help", "name": "spurgen --help vs import typer, rich", "unit": "s", "ours": seconds,
             "baseline": typer_seconds, "ratio": seconds / typer_seconds, "paired_ratio": ratio,
             "target": TARGET_RATIO, "target_text": f"<= {TARGET_RATIO:g}x",
             "verdict": "ok" if ratio <= TARGET_RATIO else "ABOVE TARGET", "ours_seconds": times["help"].seconds,
             "baseline_seconds": times["typer"].seconds, "ours_peak_mb": None, "baseline_peak_mb": None}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, repeats=5)
    args = parser.parse_args()
    save_run(run(args.repeats), "tiny")


if __name__ == "__main__":
    main()
