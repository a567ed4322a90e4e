"""tests/floors/: the pipeline under the floor versions (make test-floors). The fixtures come from tests/conftest.py."""

from __future__ import annotations

import sys

PACKAGES = ("torch", "torchvision", "diffusers", "transformers", "peft", "timm", "accelerate", "safetensors", "typer",
            "click", "rich", "numpy", "pillow", "open-clip-torch", "huggingface-hub", "tokenizers")


def pytest_report_header(config) -> str:
    """The versions under test, at the top of the run's output."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "missing"

    return f"floors: Python {sys.version.split()[0]}, " + ", ".join(f"{name} {installed(name)}" for name in PACKAGES)
