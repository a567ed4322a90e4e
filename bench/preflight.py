"""bench/gpu.sh's first step on the machine: are the packages spurgen requires there, in range, and is the device?

Prints the versions of Python, torch (with its CUDA) and every package of ``pyproject.toml``'s dependencies, fails
(exit 1) on one missing or out of range, or on ``--device cuda`` without a GPU, and writes the name that the record
file takes (``h200``, ``h100-80gb-hbm3``; ``cpu`` on the CPU) to ``--name-file``. With ``--build-model ARCH`` it
then builds the random Stable Diffusion into ``SPURGEN_BENCH_CACHE``, so that the stages reuse one model and this
step's time is its own in the log. A minute lost here costs no stage its figures.

    python -m bench.preflight --device cuda --name-file /tmp/name [--build-model full]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def requirement_problems(pyproject: Path = PYPROJECT) -> list[str]:
    """One line per dependency of ``pyproject`` that is missing or outside its range here; prints the others.

    Args:
        pyproject: The project file whose ``[project].dependencies`` are checked.
    """
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: its backport, a dependency of spurgen there
        import tomli as tomllib

    from packaging.requirements import Requirement

    problems = []
    for line in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            version = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            problems.append(f"{requirement.name}: not installed (needs {requirement.specifier})")
            continue
        if requirement.specifier and not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{requirement.name} {version}: outside {requirement.specifier}")
        else:
            print(f"  {requirement.name} {version}", file=sys.stderr)
    return problems


def card_name(device: str) -> str:
    """The record file's name for the device: the GPU's name in lower case without the maker, or ``cpu``.

    Args:
        device: ``cpu`` or ``cuda``.
    """
    import torch

    if device == "cpu":
        return "cpu"
    name = torch.cuda.get_device_name()
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    parser.add_argument("--name-file", type=Path, required=True, help="where the record file's name is written")
    parser.add_argument("--build-model", metavar="ARCH", help="build (or reuse) this random Stable Diffusion")
    args = parser.parse_args()
    import torch

    print(f"python {sys.version.split()[0]}, torch {torch.__version__} (CUDA {torch.version.cuda})", file=sys.stderr)
    problems = requirement_problems()
    if args.device == "cuda" and not torch.cuda.is_available():
        problems.append("--device cuda, but torch sees no GPU")
    if problems:
        sys.exit("preflight failed:\n  " + "\n  ".join(problems))
    name = card_name(args.device)
    if args.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}", file=sys.stderr)
    args.name_file.write_text(name + "\n")
    if args.build_model:
        from ._common import random_stable_diffusion

        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as scratch:  # used only without SPURGEN_BENCH_CACHE
            folder = random_stable_diffusion(args.build_model, Path(scratch))
        print(f"random Stable Diffusion ({args.build_model}) at {folder}: {time.perf_counter() - started:.0f} s",
              file=sys.stderr)


if __name__ == "__main__":
    main()
