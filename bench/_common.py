"""Helpers shared by the benchmarks: repeated timing, medians, peak memory, and the printed comparison.

Every benchmark times our code and a bare baseline doing the same work in the same process, a few
repetitions each after a warm-up, and reports the ratio of the medians. Absolute numbers depend on
the machine; the ratio is what a benchmark asserts about our overhead.

Each stage module exposes ``run(...) -> list[record]`` (a record is :func:`compare`'s dict, plus ``stage``)
and ``SIZES`` (its ``run`` arguments for ``--size tiny`` and ``--size full``); ``python -m bench`` runs them
all, and ``python -m bench.<stage>`` one. :func:`save_run` appends each run to ``bench/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["Measurement", "measure", "measure_interleaved", "peak_memory", "compare", "save_run", "machine"]

RESULTS_FILE = Path(__file__).with_name("results.json")
# bench/gpu.sh points these at its run's record file and at the commit it found (the device machine's copy of the
# working tree may have no .git).
RESULTS_ENV, COMMIT_ENV = "SPURGEN_BENCH_RESULTS", "SPURGEN_BENCH_COMMIT"


@dataclass
class Measurement:
    """Wall-clock seconds of each repetition of one timed function, and its peak memory."""

    seconds: list[float]
    peak_memory_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    cpu_seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def cpu_median(self) -> float:
        """Median CPU seconds of this process per call: on a CPU shared with other jobs, unlike wall-clock time,
        it does not grow when they take turns on the cores (with one torch thread it is the work itself)."""
        return statistics.median(self.cpu_seconds)

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
def peak_memory(device: str = "cpu", interval_s: float = 0.01,
                relative: bool = False) -> Iterator[dict[str, float | None]]:
    """Measures the peak memory of the block: CUDA's allocator peak (``torch.cuda.max_memory_allocated``) on a
    GPU, sampled RSS on the CPU.

    Args:
        device: ``cpu`` or a CUDA device.
        interval_s: RSS sampling interval.
        relative: Report the growth over what was in use when the block started (for two models that share
            a process, so that each one's peak does not include the other's weights).

    Yields a dict whose ``"mb"`` is filled in when the block ends (``None`` where not measurable).
    """
    result: dict[str, float | None] = {"mb": None}
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated() if relative else 0
        yield result
        torch.cuda.synchronize()
        result["mb"] = (torch.cuda.max_memory_allocated() - start) / 2**20
        return
    start_mb = (_rss_mb() or 0.0) if relative else 0.0
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
        result["mb"] = max(samples) - start_mb if samples else None


def _timed_call(fn: Callable[[], Any], device: str) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one call; on CUDA the queued kernels are waited for before and after."""
    cuda = device.startswith("cuda")
    if cuda:
        import torch

        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu_start


def measure_interleaved(functions: dict[str, Callable[[], Any]], *, repeats: int = 3, warmup: int = 1,
                        device: str = "cpu", relative_memory: bool = False,
                        progress: bool = False) -> dict[str, Measurement]:
    """Times several functions in turns (A B A B ...), so that a machine whose load drifts, shared with other
    jobs, slows each of them alike; each one's peak memory is the highest over its own calls (with
    ``relative_memory``, the growth during the call, see :func:`peak_memory`). ``progress`` prints every timed
    call as it ends (long benchmarks keep what they measured if stopped)."""
    for _ in range(warmup):
        for fn in functions.values():
            fn()
    results = {name: Measurement([]) for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            with peak_memory(device, relative=relative_memory) as memory:
                wall, cpu = _timed_call(fn, device)
            results[name].seconds.append(wall)
            results[name].cpu_seconds.append(cpu)
            if memory["mb"] is not None:
                results[name].peak_memory_mb = max(results[name].peak_memory_mb or 0.0, memory["mb"])
            if progress:
                print(f"  {name}: {wall:.3f} s ({cpu:.3f} CPU s), peak {memory['mb'] or 0:.0f} MB", flush=True)
    return results


def measure(fn: Callable[[], Any], *, repeats: int = 3, warmup: int = 1, device: str = "cpu") -> Measurement:
    """Times ``fn`` ``repeats`` times after ``warmup`` untimed calls; peak memory over the timed calls."""
    return measure_interleaved({"fn": fn}, repeats=repeats, warmup=warmup, device=device)["fn"]


def random_stable_diffusion(arch: str, scratch: Path) -> Path:
    """A Stable Diffusion (or SDXL, or FLUX.1) folder with seeded random weights: built into ``scratch``, or with
    ``SPURGEN_BENCH_CACHE=DIR`` built once into DIR and reused (an SD 1.5-size model takes minutes to build on a
    small CPU and 4 GB to store; SDXL 14 GB; FLUX.1 34 GB, stored in bfloat16).

    Args:
        arch: ``spurgen.testing`` architecture (``tiny``, ``full``, ``full-v2``), or ``sdxl-`` and an SDXL
            architecture (``sdxl-tiny``, ``sdxl-full``), or ``flux-`` and a FLUX.1 one (``flux-tiny``, ``flux-full``).
        scratch: A temporary folder of the caller's, used without a cache.
    """
    import torch

    from spurgen.testing import build_stable_diffusion
    from spurgen.testing.flux import build_flux
    from spurgen.testing.sdxl import build_sdxl

    cache = os.environ.get("SPURGEN_BENCH_CACHE")
    folder = Path(cache) / f"sd-{arch}-seed0" if cache else scratch / f"sd-{arch}"
    if not (folder / "model_index.json").is_file():
        if arch.startswith("sdxl-"):
            build_sdxl(folder, arch.removeprefix("sdxl-"), seed=0)
        elif arch.startswith("flux-"):
            flux = arch.removeprefix("flux-")
            build_flux(folder, flux, seed=0, dtype=torch.bfloat16 if flux == "full" else torch.float32)
        else:
            build_stable_diffusion(folder, arch, seed=0)
    return folder


def refuse_full_flux_on_cpu(arch: str, device: str, how: str) -> None:
    """Stops a FLUX.1 benchmark at full size without a GPU, rather than let it shrink or run for hours.

    Args:
        arch: The benchmark's :func:`random_stable_diffusion` architecture.
        device: ``auto`` or ``cpu``.
        how: The command line that runs it on a GPU, for the message.

    Raises:
        RuntimeError: ``flux-full`` with ``device`` ``cpu`` or no GPU.
    """
    import torch

    if arch == "flux-full" and (device == "cpu" or not torch.cuda.is_available()):
        raise RuntimeError("FLUX.1 at full size is too large for a CPU step (a 12 B transformer and T5-XXL, 67 GB of "
                           f"float32 weights, minutes per forward pass); run {how} on a GPU")


def add_common_arguments(parser: argparse.ArgumentParser, threads: int | None = None, repeats: int = 3) -> None:
    """``--device``, ``--repeats`` and ``--threads``, shared by the benchmarks' command lines."""
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=threads,
                        help="CPU threads for torch (default: torch's); 1 is steadier on a machine shared with other "
                             "jobs")


def add_classify_arguments(parser: argparse.ArgumentParser) -> None:
    """``--decode`` and ``--cold-hashes`` of the classification benchmarks (select-refs, evaluate)."""
    parser.add_argument("--decode", default="auto", choices=["auto", "threads", "processes"],
                        help="where ours decodes images (default: spurgen's choice by the host's cores)")
    parser.add_argument("--cold-hashes", action="store_true",
                        help="ours hashes every image each call, as a first command on a data set does")


@contextmanager
def decoding_on(decode: str) -> Iterator[None]:
    """Makes spurgen's prediction stages decode images on ``threads`` or in ``processes`` (``auto``: its choice)."""
    from spurgen.predict import DECODE_ENV

    previous = os.environ.get(DECODE_ENV)
    os.environ[DECODE_ENV] = decode
    try:
        yield
    finally:
        if previous is None:
            del os.environ[DECODE_ENV]
        else:
            os.environ[DECODE_ENV] = previous


def rerun_workspaces(root: Path, cold_hashes: bool = False) -> Callable[[], Any]:
    """A function giving a fresh workspace under ``root`` for each timed call of a classification stage.

    Its prediction cache is empty, so every image is classified, but the image hashes remembered by the call
    before are kept (``cache/sha256.json``), as when a command is run again on the same images with a new
    classifier or in a new workspace; with ``cold_hashes`` every call hashes every image.
    """
    from spurgen.workspace import Workspace

    made: list[Workspace] = []

    def fresh() -> Workspace:
        workspace = Workspace(root / f"ws-{len(made)}")
        memo = made[-1].cache_dir("sha256.json") if made else None
        if memo is not None and memo.is_file() and not cold_hashes:
            workspace.cache_dir().mkdir(parents=True, exist_ok=True)
            shutil.copyfile(memo, workspace.cache_dir("sha256.json"))
        made.append(workspace)
        return workspace

    return fresh


def add_training_arguments(parser: argparse.ArgumentParser, sizes: list[str]) -> None:
    """``--size``, ``--arch``, ``--steps``, ``--batch-size`` and ``--mixed-precision`` of the training benchmarks."""
    parser.add_argument("--size", default="tiny", choices=sizes)
    parser.add_argument("--arch", choices=["tiny", "full", "full-v2", "sdxl-tiny", "sdxl-full", "flux-tiny",
                                           "flux-full"],
                        help="default: the size's")
    parser.add_argument("--steps", type=int, help="steps per timed repetition; default: the size's")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], help="default: bf16 on a GPU, no on a CPU")


def apply_threads(threads: int | None) -> None:
    """Sets torch's CPU threads when ``--threads`` was given."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def _memory_note(measurement: Measurement) -> str:
    return f", peak {measurement.peak_memory_mb:.0f} MB" if measurement.peak_memory_mb is not None else ""


def compare(name: str, ours: Measurement, baseline: Measurement, items: int, unit: str, target: float,
            paired: bool = False, stage: str = "") -> dict[str, Any]:
    """Prints ours vs the baseline as rates (items per second) and their ratio against the target.

    With ``paired`` (measurements from :func:`measure_interleaved`), the verdict uses the median of the
    per-turn ratios, which cancels the load drift of a shared machine better than the ratio of medians.
    Returns the record that ``python -m bench`` tabulates and :func:`save_run` stores.
    """
    ratio = ours.rate(items) / baseline.rate(items)
    turns = [b / o for o, b in zip(ours.seconds, baseline.seconds)] if paired else []
    decisive = statistics.median(turns) if turns else ratio
    verdict = "ok" if decisive >= target else "BELOW TARGET"
    paired_note = f", paired ratio {decisive:.3f} (median of {len(turns)} turns)" if turns else ""
    print(f"{name}: ours {ours.rate(items):.2f} {unit}/s (median of {len(ours.seconds)}{_memory_note(ours)}) | "
          f"baseline {baseline.rate(items):.2f} {unit}/s (median of {len(baseline.seconds)}{_memory_note(baseline)}) | "
          f"ratio {ratio:.3f}{paired_note} (target >= {target:.3g}) {verdict}")
    return {"stage": stage, "name": name, "unit": f"{unit}/s", "items": items, "ours": ours.rate(items),
            "baseline": baseline.rate(items), "ratio": ratio, "paired_ratio": decisive if turns else None,
            "target": target, "target_text": f">= {target:.3g}", "verdict": verdict,
            "ours_seconds": ours.seconds, "baseline_seconds": baseline.seconds,
            "ours_peak_mb": ours.peak_memory_mb, "baseline_peak_mb": baseline.peak_memory_mb,
            "ours_extra": ours.extra, "baseline_extra": baseline.extra}


def _git_commit() -> str | None:
    if os.environ.get(COMMIT_ENV):
        return os.environ[COMMIT_ENV]
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False,
                              cwd=RESULTS_FILE.parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               check=False, cwd=RESULTS_FILE.parent).stdout.strip()
    except OSError:
        return None
    return (done.stdout.strip() + ("+dirty" if dirty else "")) if done.returncode == 0 else None


def machine(device: str = "cpu") -> dict[str, Any]:
    """What the figures were measured on: host, CPU model and cores, load, torch, and the GPU's name."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info: dict[str, Any] = {"host": platform.node(), "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
                            "threads": torch.get_num_threads(), "python": platform.python_version()}
    try:
        info["load_average"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def save_run(records: list[dict[str, Any]], size: str = "custom", device: str = "cpu") -> dict[str, Any]:
    """Appends a run (date, machine, size, git commit, command, records) to ``bench/results.json`` (not
    versioned; ``SPURGEN_BENCH_RESULTS=FILE``: that file) and makes its records the ``latest`` of their stages, so
    that runs can be compared over time.

    Returns the run.
    """
    results_file = Path(os.environ.get(RESULTS_ENV) or RESULTS_FILE)
    try:
        results = json.loads(results_file.read_text())
    except (OSError, json.JSONDecodeError):
        results = {}
    if "runs" not in results:  # the older layout, one record per benchmark: kept as a legacy run
        results = {"runs": [{"legacy": results}] if results else [], "latest": {}}
    run = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(device), "size": size,
           "git_commit": _git_commit(), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "records": records}
    results["runs"].append(run)
    for record in records:
        results["latest"][f"{size}/{record.get('stage')}/{record['name']}"] = {**record, "date": run["date"]}
    results_file.parent.mkdir(parents=True, exist_ok=True)
    results_file.write_text(json.dumps(results, indent=2) + "\n")
    return run
