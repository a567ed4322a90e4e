"""finetune's speed levers that leave the arithmetic alone: ``torch.compile`` of the models' repeated blocks
(``--compile``, ``--compile-mode``) and the channels-last memory format of the UNet and VAE (``--channels-last``).

Regional compilation: each transformer, ResNet and (trained) text encoder layer is compiled in place
(``Module.compile``), not the whole model. Blocks of one class and shape share a graph, so a model of many blocks
costs a few graphs' compile time; parameter names stay as they are (no ``_orig_mod.`` prefix), so checkpoints and
LoRA files of a compiled run are those of an eager one. PEFT's LoRA layers inside the blocks are compiled with them.
"""

from __future__ import annotations

import importlib.util
from contextlib import AbstractContextManager, nullcontext
from typing import Iterable

import torch

from ..errors import SpurgenError

__all__ = ["CUDA_GRAPH_MODES", "REPEATED_BLOCKS", "compiles", "uses_channels_last",
           "check_compile", "compile_blocks", "eager", "mark_step"]

# The --compile-mode values that record CUDA graphs (one launch per block instead of one per kernel).
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# The classes compiled one instance at a time: diffusers' own list (UNet2DConditionModel._repeated_blocks, where
# the installed diffusers has one) is only the transformer block, and the ResNet blocks are half the UNet's time.
REPEATED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D", "CLIPEncoderLayer")
# torch.compile's backend; tests swap in "aot_eager" (the same graphs and autograd, without inductor's code
# generation, which takes minutes on a small CPU).
BACKEND = "inductor"
# SD 1.5's UNet has about 15 distinct ResNet block shapes; dynamo's default of 8 graphs per function would leave
# the rest eager.
_GRAPHS_PER_BLOCK = 64


def compiles(setting: str, device: torch.device) -> bool:
    """Whether ``--compile`` is on: ``on``, ``off``, or ``auto``, on for CUDA where triton is installed.

    ``auto`` leaves CPUs and MPS eager: on a CPU a cold compile took longer than an 800-step run could save
    (performance.md, Compilation), and nothing was measured on MPS.

    Args:
        setting: ``--compile``.
        device: The training device.
    """
    if setting != "auto":
        return setting == "on"
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def uses_channels_last(setting: str, device: torch.device) -> bool:
    """Whether ``--channels-last`` is on: ``on``, ``off``, or ``auto``, on for CUDA only (cuDNN's tensor-core
    convolutions prefer it; on CPUs it measured from 8% faster to 44% slower, performance.md, Compilation).

    Args:
        setting: ``--channels-last``.
        device: The training device.
    """
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def check_compile(setting: str, device: torch.device) -> None:
    """Checks before training that ``--compile on`` can compile on ``device``.

    Raises:
        SpurgenError: CUDA without triton, or a CPU without a C++ compiler (inductor's code generators).
    """
    if setting != "on":
        return
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise SpurgenError("--compile on needs triton on a GPU, which is not installed; pip install triton, or pass "
                           "--compile off")
    if device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:
            get_cpp_compiler()
        except RuntimeError:
            raise SpurgenError("--compile on needs a C++ compiler on a CPU, and none was found; install g++ (or set "
                               "CXX), or pass --compile off") from None


def compile_blocks(models: Iterable[torch.nn.Module], mode: str) -> None:
    """Compiles, in place, every repeated block of ``models`` (:data:`REPEATED_BLOCKS`, and the model's own
    ``_repeated_blocks``); the first steps then compile their graphs.

    Shapes are static (``dynamic=False``): a step's shapes never change, and CUDA graphs need them fixed.

    Args:
        models: The trained models.
        mode: ``--compile-mode``.
    """
    import torch._dynamo.config

    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), _GRAPHS_PER_BLOCK))
    for model in models:
        names = set(REPEATED_BLOCKS) | set(getattr(model, "_repeated_blocks", None) or ())
        for module in model.modules():
            if type(module).__name__ in names:
                module.compile(backend=BACKEND, mode=mode, dynamic=False)


def eager() -> AbstractContextManager[None]:
    """A context in which compiled blocks run their eager code: sampling (validation images) has other shapes and
    no gradients, and would otherwise compile a second set of graphs for a few calls."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch >= 2.6; before, sampling compiles its graphs
    return set_stance("force_eager") if set_stance is not None else nullcontext()


def mark_step(mode: str) -> None:
    """Tells CUDA graph trees that a new training step starts, so that they may reuse the last step's output
    memory; without CUDA graphs it does nothing.

    Args:
        mode: ``--compile-mode`` of a compiled run.
    """
    if mode in CUDA_GRAPH_MODES:
        torch.compiler.cudagraph_mark_step_begin()
