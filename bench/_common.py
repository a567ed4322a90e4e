"""Helpers shared by the benchmarks: repeated timing, medians, peak memory, and the printed comparison.

Every benchmark times our code and a bare baseline doing the same work in the same process, a few
repetitions each after a warm-up, and reports the ratio of the medians. Absolute numbers depend on
the machine; the ratio is what a benchmark asserts about our overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["Measurement", "measure", "measure_interleaved", "peak_memory", "compare", "save_result"]

RESULTS_FILE = Path(__file__).with_name("results.json")


@dataclass
class Measurement:
    """Wall-clock seconds of each repetition of one timed function, and its peak memory."""

    seconds: list[float]
    peak_memory_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def rate(self, items: int) -> float:
        """Items per second at the median time."""
        return items / self.median


def _rss_mb() -> float | None:
    # /proc/self/statm gives the resident set now (ru_maxrss only has the lifetime peak, which
    # cannot be reset between our run and the baseline's).
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


@contextmanager
def peak_memory(device: str = "cpu", interval_s: float = 0.01) -> Iterator[dict[str, float | None]]:
    """Measures the peak memory of the block: CUDA's allocator peak on a GPU, sampled RSS on the CPU.

    Yields a dict whose ``"mb"`` is filled in when the block ends (``None`` where not measurable).
    """
    result: dict[str, float | None] = {"mb": None}
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield result
        torch.cuda.synchronize()
        result["mb"] = torch.cuda.max_memory_allocated() / 2**20
        return
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            value = _rss_mb()
            if value is not None:
                samples.append(value)
            stop.wait(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
        result["mb"] = max(samples) if samples else None


def _timed_call(fn: Callable[[], Any], device: str) -> float:
    """Seconds of one call; on CUDA the queued kernels are waited for before and after."""
    cuda = device.startswith("cuda")
    if cuda:
        import torch

        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure_interleaved(functions: dict[str, Callable[[], Any]], *, repeats: int = 3, warmup: int = 1,
                        device: str = "cpu") -> dict[str, Measurement]:
    """Times several functions in turns (A B A B ...), so that a machine whose load drifts, shared with other
    jobs, slows each of them alike; each one's peak memory is the highest over its own calls."""
    for _ in range(warmup):
        for fn in functions.values():
            fn()
    results = {name: Measurement([]) for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            with peak_memory(device) as memory:
                results[name].seconds.append(_timed_call(fn, device))
            if memory["mb"] is not None:
                results[name].peak_memory_mb = max(results[name].peak_memory_mb or 0.0, memory["mb"])
    return results


def measure(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1, device: str = "cpu") -> Measurement:
    """Times ``fn`` ``repeats`` times after ``warmup`` untimed calls; peak memory over the timed calls."""
    return measure_interleaved({"fn": fn}, repeats=repeats, warmup=warmup, device=device)["fn"]


def add_common_arguments(parser: argparse.ArgumentParser, threads: int | None = None) -> None:
    """``--device``, ``--repeats`` and ``--threads``, shared by the benchmarks' command lines."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=threads,
                        help="CPU threads for torch (default: torch's); 1 is steadier on a machine shared with other jobs")


def apply_threads(threads: int | None) -> None:
    """Sets torch's CPU threads when ``--threads`` was given."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def _memory_note(measurement: Measurement) -> str:
    return f", peak {measurement.peak_memory_mb:.0f} MB" if measurement.peak_memory_mb is not None else ""


def compare(name: str, ours: Measurement, baseline: Measurement, items: int, unit: str, target: float,
            paired: bool = False) -> dict[str, Any]:
    """Prints ours vs the baseline as rates (items per second) and their ratio against the target.

    With ``paired`` (measurements from :func:`measure_interleaved`), the verdict uses the median of the
    per-turn ratios, which cancels the load drift of a shared machine better than the ratio of medians.
    """
    ratio = ours.rate(items) / baseline.rate(items)
    turns = [b / o for o, b in zip(ours.seconds, baseline.seconds)] if paired else []
    decisive = statistics.median(turns) if turns else ratio
    verdict = "ok" if decisive >= target else "BELOW TARGET"
    paired_note = f", paired ratio {decisive:.3f} (median of {len(turns)} turns)" if turns else ""
    print(f"{name}: ours {ours.rate(items):.2f} {unit}/s (median of {len(ours.seconds)}{_memory_note(ours)}) | "
          f"baseline {baseline.rate(items):.2f} {unit}/s (median of {len(baseline.seconds)}{_memory_note(baseline)}) | "
          f"ratio {ratio:.3f}{paired_note} (target >= {target}) {verdict}")
    return {"name": name, "unit": f"{unit}/s", "items": items, "ours": ours.rate(items), "baseline": baseline.rate(items),
            "ratio": ratio, "paired_ratio": decisive if turns else None, "target": target,
            "ours_seconds": ours.seconds, "baseline_seconds": baseline.seconds,
            "ours_peak_mb": ours.peak_memory_mb, "baseline_peak_mb": baseline.peak_memory_mb,
            "ours_extra": ours.extra, "baseline_extra": baseline.extra}


def save_result(benchmark: str, result: dict[str, Any]) -> None:
    """Records a benchmark's latest result in ``bench/results.json`` (not versioned), keyed by benchmark."""
    try:
        results = json.loads(RESULTS_FILE.read_text())
    except (OSError, json.JSONDecodeError):
        results = {}
    results[benchmark] = {**result, "recorded": time.strftime("%Y-%m-%dT%H:%M:%S")}
    RESULTS_FILE.write_text(json.dumps(results, indent=2) + "\n")
