"""Prints pip constraints that pin every dependency of spurgen to its lower bound in pyproject.toml.

`make test-floors` installs spurgen under these pins in a second environment, so each floor that
pyproject.toml states is the version a test runs (reading the floors from pyproject keeps the two from drifting).
A dependency without a lower bound is an error: every floor must be stated to be tested.

Usage: python .ci/floor_pins.py [pyproject.toml] [--python X.Y]
Only the requirements whose environment marker holds for that Python (default: this interpreter's) are printed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*?)\s*(?:;\s*(.+))?$")


def _marker_holds(marker: str | None, python: tuple[int, int]) -> bool:
    """Evaluates the only kind of marker pyproject.toml uses: python_version against a version."""
    if not marker:
        return True
    match = re.fullmatch(r"""python_version\s*(<=|>=|==|!=|<|>)\s*["'](\d+)\.(\d+)["']""", marker.strip())
    if match is None:
        raise SystemExit(f"floor_pins: cannot evaluate marker {marker!r}")
    op, bound = match[1], (int(match[2]), int(match[3]))
    return {"<": python < bound, "<=": python <= bound, ">": python > bound, ">=": python >= bound,
            "==": python == bound, "!=": python != bound}[op]


def floor_pins(pyproject: Path, python: tuple[int, int]) -> list[str]:
    dependencies = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    pins = []
    for requirement in dependencies:
        match = _REQUIREMENT.match(requirement)
        if match is None:
            raise SystemExit(f"floor_pins: cannot parse {requirement!r}")
        name, _, specifiers, marker = match.groups()
        if not _marker_holds(marker, python):
            continue
        lower = [spec.strip()[2:].strip() for spec in specifiers.split(",") if spec.strip().startswith(">=")]
        if len(lower) != 1:
            raise SystemExit(f"floor_pins: {requirement!r} states no single '>=' floor")
        pins.append(f"{name}=={lower[0]}")
    return pins


def main(argv: list[str]) -> None:
    python = sys.version_info[:2]
    if "--python" in argv:
        at = argv.index("--python")
        python = tuple(int(part) for part in argv[at + 1].split("."))
        del argv[at:at + 2]
    pyproject = Path(argv[0]) if argv else Path(__file__).resolve().parent.parent / "pyproject.toml"
    print("\n".join(floor_pins(pyproject, python)))


if __name__ == "__main__":
    main(sys.argv[1:])
