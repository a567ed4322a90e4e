"""Every benchmark in one run, one table: ``python -m bench`` (``make bench``).

Stages, each ours against a baseline measured in the same process (see each module's docstring):

    help         spurgen --help in a subprocess vs a bare Python start       target < 1 s
                 and vs a bare python -c "import typer, rich"                <= 2x
    select-refs  select_refs end to end vs bare batched classifier forwards  >= 0.8x
    evaluate     evaluate end to end vs bare batched classifier forwards     >= 0.8x
    generate     generate vs a bare diffusers StableDiffusionPipeline loop   >= 1.0x
    finetune     the step of each preset vs diffusers' train_dreambooth step time <= 0.9x (sfsl: its cost)
    sfsl         SFSL's cost-cutting measures vs the no-SFSL step            <= 1.3x
    sdxl         SDXL's step vs train_dreambooth_lora_sdxl's step            time <= 0.9x; with SFSL <= 1.3x
                 (--only sdxl: SDXL at 1024 px takes minutes per step on a CPU)
    flux         FLUX.1's step vs train_dreambooth_lora_flux's step          time <= 0.9x; with SFSL <= 1.3x
                 (--only flux: FLUX.1-dev at 512 px, --size full, needs a GPU)
    levers       --channels-last, --compile (+ CUDA graphs) vs the eager step  measured; compile time, break-even
                 (--only levers: on a CPU the compilation takes minutes)
    mfu          the UNet step's model-FLOPs utilisation at batch 1+1 and 8+8  reported
    scaling      generate / evaluate commands, 2 processes vs 1              >= 1.2x
    demo         spurgen demo end to end in a fresh workspace (--only demo)  <= 10 min

``--size tiny`` (default) takes seconds to minutes on a CPU: the tiny random Stable Diffusion and a small
timm ResNet. ``--size full`` uses SD 1.5's architecture and ResNet-50s with random weights (nothing is
downloaded); on a CPU an SD 1.5 training step takes about a minute. Results are appended to
``bench/results.json`` (runs with date, machine, size and git commit, and the latest record of each).

    python -m bench [--size tiny|full] [--only sfsl,finetune] [--repeats 3] [--threads 1] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import importlib
import os
import time
import traceback
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench._common import apply_threads, save_run  # noqa: E402

# Stage name -> module; each module has run(**SIZES[size], repeats=..., device=...) -> list of records, and may
# have GPU_SIZES[size]: what changes on a GPU, where the CPU's sizes would time little but start-up.
STAGES: dict[str, str] = {
    "help": "bench.cli_help",
    "select-refs": "bench.select_refs",
    "evaluate": "bench.evaluate",
    "generate": "bench.generate",
    "finetune": "bench.finetune",
    "sfsl": "bench.sfsl",
    "sdxl": "bench.sdxl",
    "flux": "bench.flux",
    "levers": "bench.levers",
    "mfu": "bench.mfu",
    "scaling": "bench.scaling",
    "demo": "bench.demo",
}


ON_REQUEST = ("demo", "levers", "sdxl", "flux")


def _stage_arguments(stage: str, module: Any, size: str, repeats: int | None, threads: int | None,
                     device: str) -> dict[str, Any]:
    """The stage's run() arguments: its size preset, and the command line's repeats, threads and device."""
    arguments = dict(module.SIZES[size])
    if device != "cpu":
        arguments.update(getattr(module, "GPU_SIZES", {}).get(size, {}))
    if repeats is not None:
        arguments["repeats"] = repeats
    # finetune's own device setting: the GPU when there is one
    if stage in ("finetune", "sfsl", "sdxl", "flux", "levers", "mfu"):
        arguments["device"] = "cpu" if device == "cpu" else "auto"
    else:
        arguments["device"] = device
    if stage == "scaling":
        arguments["threads"] = threads or 1
    elif stage == "demo":
        arguments["threads"] = threads
    return arguments


def _figure(value: Any, unit: str) -> str:
    if value is None:
        return ""
    if unit == "s/step" or unit == "s":
        return f"{value:.3f} {unit}"
    return f"{value:.3g} {unit}"


def _memory(record: dict[str, Any]) -> str:
    ours, baseline = record.get("ours_peak_mb"), record.get("baseline_peak_mb")
    if ours is None and baseline is None:
        return ""
    return f"{ours or 0:.0f} / {baseline or 0:.0f} MB"


def print_table(records: list[dict[str, Any]], title: str) -> None:
    """The one table of a run: stage, benchmark, our figure, the baseline's, ratio, target, peak memory."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("stage", "benchmark", "ours", "baseline", "ratio", "target", "peak memory ours / baseline", ""):
        table.add_column(column, justify="left" if column in ("stage", "benchmark", "") else "right")
    for r in records:
        if "error" in r:
            table.add_row(r["stage"], r["name"], "", "", "", "", "", f"[red]failed: {r['error']}[/red]")
            continue
        ratio = r.get("paired_ratio") or r.get("ratio")
        table.add_row(r["stage"], r.get("label", r["name"]), _figure(r["ours"], r["unit"]),
                      _figure(r["baseline"], r["unit"]), "" if ratio is None else f"{ratio:.3f}",
                      r.get("target_text", ""), _memory(r),
                      r.get("verdict", ""))
    Console(width=200).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="tiny", choices=["tiny", "full"])
    parser.add_argument("--only", help=f"comma-separated stages: {', '.join(STAGES)}")
    parser.add_argument("--repeats", type=int, help="timed turns per side; default: each stage's")
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU threads for torch (default: torch's); 1 is steadier on a machine shared with other jobs",
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    # The demo, the levers' compilation and SDXL's full-size steps on a CPU take minutes of their own, FLUX.1's at full
    # size a GPU: only on request (--only demo,levers,sdxl,flux).
    stages = [s.strip() for s in args.only.split(",")] if args.only else [s for s in STAGES if s not in ON_REQUEST]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    apply_threads(args.threads)
    records: list[dict[str, Any]] = []
    for stage in stages:
        module = importlib.import_module(STAGES[stage])
        print(f"== {stage} ({args.size})", flush=True)
        started = time.perf_counter()
        try:
            records += module.run(**_stage_arguments(stage, module, args.size, args.repeats, args.threads, args.device))
        except Exception as exc:  # noqa: BLE001 - one failed stage does not lose the others' figures
            traceback.print_exc()
            records.append({"stage": stage, "name": stage, "error": f"{type(exc).__name__}: {exc}"})
        print(f"   {stage} took {time.perf_counter() - started:.0f} s", flush=True)
    run = save_run(records, args.size, args.device)
    machine = run["machine"]
    print_table(records, f"python -m bench --size {args.size} — {machine.get('gpu') or machine['cpu']}, "
                         f"{machine['cores']} cores, {machine['threads']} torch threads, commit {run['git_commit']}")


if __name__ == "__main__":
    main()
