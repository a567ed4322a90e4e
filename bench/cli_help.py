"""``spurgen --help`` in a fresh process against a bare Python start, median of a few runs. Target: < 1 s.

The CLI imports nothing heavy until a command runs (docs/DEVELOPING.md), so its help is the interpreter's
start plus Typer and the settings dataclasses.

    python -m bench.cli_help [--repeats 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from typing import Any, Callable

from ._common import add_common_arguments, measure_interleaved, save_run

TARGET_S = 1.0
# run()'s arguments per --size: the same at both sizes.
SIZES: dict[str, dict[str, Any]] = {"tiny": {}, "full": {}}


def _process(*args: str) -> Callable[[], None]:
    def start() -> None:
        subprocess.run([sys.executable, *args], check=True, capture_output=True)

    return start


def run(repeats: int = 5, device: str = "cpu") -> list[dict[str, Any]]:
    """Times ``python -m spurgen --help`` and ``python -c pass`` in turns; returns the record.

    Args:
        repeats: Timed turns of each, after one warm-up (which fills the file cache).
        device: Unused: the help never touches a device.
    """
    times = measure_interleaved({"help": _process("-m", "spurgen", "--help"), "python": _process("-c", "pass")},
                                repeats=max(repeats, 3))
    seconds = times["help"].median
    print(f"spurgen --help: {seconds:.3f} s (median of {len(times['help'].seconds)}; bare python "
          f"{times['python'].median:.3f} s), target < {TARGET_S} s")
    return [{"stage": "help", "name": "spurgen --help (subprocess, median)", "unit": "s", "ours": seconds,
             "baseline": times["python"].median, "ratio": seconds / times["python"].median, "target": TARGET_S,
             "target_text": f"< {TARGET_S} s", "verdict": "ok" if seconds < TARGET_S else "ABOVE TARGET",
             "ours_seconds": times["help"].seconds, "baseline_seconds": times["python"].seconds,
             "ours_peak_mb": None, "baseline_peak_mb": None}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, repeats=5)
    args = parser.parse_args()
    save_run(run(args.repeats), "tiny")


if __name__ == "__main__":
    main()
