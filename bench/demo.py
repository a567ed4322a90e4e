"""``spurgen demo`` end to end in a fresh workspace, as a user runs it. Target: at most 10 minutes.

Runs ``python -m spurgen demo`` in a subprocess (so import and model-loading time count) and reads
each stage's time from the demo's own ``reports/demo.json``. There is no baseline to divide by: the
issue's target is the wall-clock time on a 2-core CPU.

    python -m bench.demo [--repeats 1] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ._common import add_common_arguments, save_run

TARGET_S = 600.0
# run()'s arguments per --size: the demo has one size.
SIZES: dict[str, dict[str, Any]] = {"tiny": {}, "full": {}}


def run(repeats: int = 1, device: str = "cpu", threads: int | None = None) -> list[dict[str, Any]]:
    """Times ``spurgen demo`` in a fresh workspace ``repeats`` times; returns the record.

    Args:
        repeats: Demo runs, each in a new workspace (the median is reported).
        device: Unused: the demo runs on the CPU, as on a laptop.
        threads: OMP_NUM_THREADS of the demo process (default: the environment's).
    """
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    seconds, stages = [], []
    for _ in range(repeats):
        root = Path(tempfile.mkdtemp(prefix="spurgen-bench-demo-"))
        try:
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "spurgen", "demo", "-w", str(root / "ws")], env=env, check=True,
                           stdout=subprocess.DEVNULL)
            seconds.append(time.perf_counter() - started)
            stages.append(json.loads((root / "ws" / "reports" / "demo.json").read_text())["timings_seconds"])
        finally:
            shutil.rmtree(root, ignore_errors=True)
    median = sorted(seconds)[len(seconds) // 2]
    per_stage = ", ".join(f"{name} {value:.0f} s" for name, value in stages[seconds.index(median)].items())
    print(f"spurgen demo: {median:.0f} s (target <= {TARGET_S:.0f} s); {per_stage}; load {os.getloadavg()[0]:.1f}")
    return [{"stage": "demo", "name": "spurgen demo (fresh workspace, wall clock)", "unit": "s", "ours": median,
             "baseline": None, "ratio": None, "target": TARGET_S, "target_text": f"<= {TARGET_S:.0f} s",
             "verdict": "ok" if median <= TARGET_S else "ABOVE TARGET", "ours_seconds": seconds,
             "stage_seconds": stages, "ours_peak_mb": None, "baseline_peak_mb": None}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, repeats=1)
    args = parser.parse_args()
    save_run(run(args.repeats, threads=args.threads), "tiny")


if __name__ == "__main__":
    main()
