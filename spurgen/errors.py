"""User-facing errors.

Every problem caused by input (a flag, a file, a folder, a setting) raises :class:`SpurgenError`
with a single line naming the problem and the fix. The CLI prints it and exits with ``exit_code``
(2 by default) instead of a traceback.
"""

from __future__ import annotations

import sys


class SpurgenError(Exception):
    """An error the user can fix; its message is one line: the problem, then the fix."""

    exit_code: int = 2

    def __init__(self, message: str, *, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# What to lower or switch on when a stage runs out of GPU memory, by the module the error came from (the deepest
# stage module in its traceback: `spurgen run` calls every stage, and select-refs and evaluate share the predictor).
OUT_OF_MEMORY_HINTS = {
    "spurgen.select_refs": ("select-refs", "lower --batch-size, or pass --device cpu"),
    "spurgen.finetune": ("finetune", "lower --batch-size or --resolution, switch on --gradient-checkpointing, "
                         "--use-8bit-adam or --mixed-precision fp16 (bf16), give SFSL a TAESD --sfsl-decoder "
                         "(madebyollin/taesd), lower --sample-batch-size for the class images; then continue from "
                         "the last checkpoint with --resume"),
    "spurgen.generate": ("generate", "lower --batch-size or --resolution; the same command then makes only the "
                         "missing images"),
    "spurgen.evaluate": ("evaluate", "lower --batch-size, evaluate fewer --classifiers at a time, or pass "
                         "--device cpu"),
}
_OTHER_STAGE = ("this command", "lower its batch size or pass --device cpu")


def out_of_memory_message(exc: BaseException) -> str | None:
    """The one-line message for a GPU out-of-memory error, naming the stage and its remedies; None for other errors.

    torch is looked up only if some stage already imported it: without torch there is no GPU memory to run out of,
    and ``--help`` must stay fast.

    Args:
        exc: The error a command raised.
    """
    torch = sys.modules.get("torch")
    cuda_oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    first_line = (str(exc).strip().splitlines() or [""])[0]
    # Some kernels (cuDNN, MPS) raise a plain RuntimeError that says so instead of the dedicated type.
    if not ((cuda_oom and isinstance(exc, cuda_oom))
            or (torch is not None and isinstance(exc, RuntimeError) and "out of memory" in first_line.lower())):
        return None
    stage, traceback = _OTHER_STAGE, exc.__traceback__
    while traceback is not None:  # outermost to innermost frame: the deepest stage module wins
        module = traceback.tb_frame.f_globals.get("__name__", "")
        stage = next((hint for prefix, hint in OUT_OF_MEMORY_HINTS.items()
                      if module == prefix or module.startswith(prefix + ".")), stage)
        traceback = traceback.tb_next
    name, remedy = stage
    detail = first_line.split(". ")[0][:200] or type(exc).__name__
    return f"{name} ran out of GPU memory ({detail}); {remedy} (finished outputs are kept)"
