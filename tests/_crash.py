"""Crash-test helpers: spurgen processes killed at chosen moments, and checks of what a kill leaves behind.

- :func:`start_script` starts the installed ``spurgen`` console script; :class:`Forker` starts the same entry point
  in a process forked from a warm interpreter that has already imported torch, diffusers and timm. Both are real
  processes that SIGKILL ends at once; the fork only saves the ~10 s of imports per start, which is what makes
  dozens of kill points affordable in a test run.
- :func:`kill_at_event` watches the workspace and kills a process at the k-th new or changed file;
  :func:`signal_when` at any condition on the workspace's files (a temporary file present).
- :func:`scan` checks that every file under a final name is whole; :func:`outputs` reads a workspace's results
  for comparison with an uninterrupted run; :func:`finished` lists the outputs a restart must leave alone.

Run as a script (``python _crash.py``) it is the forking server behind :class:`Forker`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol

SPURGEN = Path(sys.executable).with_name("spurgen")  # the installed console script, beside this interpreter
TIMEOUT_S = 300.0

# What spurgen's atomic writes leave while they work (spurgen.workspace, finetune's checkpoint and output staging):
# files ``.<name>.<pid>-<hex>.tmp``, folders ``.<name>.<pid>-<random>.tmp`` / ``.checkpoint-N.tmp`` /
# ``.final-<pid>.tmp``, and ``.<name>.<pid>-<hex>.old`` for a folder being replaced; ensure_writable's probe
# ``.spurgen-write-test``. (A user's hidden ``.notes.tmp`` matches too: these are never results.)
_TEMPORARY = re.compile(r"^\..+\.(tmp|old)$|^\.spurgen-write-test$")
# Timestamps in text outputs (report.html's header): they differ between any two runs.
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?([+-]\d\d:\d\d|Z)?")
# JSON keys whose values legitimately differ between an interrupted and an uninterrupted run:
IGNORED_KEYS = {
    "created", "updated", "started", "finished",  # wall-clock times
    "computed_predictions",  # predictions this process computed; a killed process may have cached some already
    "rss_mb",  # run.json: the memory of the process tree
    "stages", "evaluated",  # run.json: what *this* process ran; a restart skips what the killed one finished
    "resume",  # finetune's setting: `spurgen run` sets it to continue an interrupted run; the result is the same
}


def spurgen_env() -> dict[str, str]:
    """The environment of every spurgen process: offline, one thread (the machine is shared)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


class Process(Protocol):
    """What the tests need of a running spurgen: :class:`subprocess.Popen` and :class:`ForkedProcess` both have it."""

    pid: int

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...


def start_script(args: list[str], log: Path) -> subprocess.Popen:
    """Starts ``spurgen ARGS`` (the console script); stdout goes to ``log``, stderr to :func:`stderr_of` it.

    SIGINT gets its default action back in the child, as in a terminal: a test suite started in the background
    (``make test &``) inherits SIGINT ignored, and Python then never raises KeyboardInterrupt.
    """
    with open(log, "wb") as out, open(stderr_of(log), "wb") as err:
        return subprocess.Popen([str(SPURGEN), *args], stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                env=spurgen_env(), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def stderr_of(log: Path) -> Path:
    """Where a process started with stdout to ``log`` writes its stderr."""
    return Path(f"{log}.err")


class ForkedProcess:
    """A spurgen command in a process forked by :class:`Forker`; its exit status comes from the server."""

    def __init__(self, forker: Forker, pid: int) -> None:
        self.forker, self.pid = forker, pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            reply = self.forker.reply(timeout=0)
            if reply is not None:
                self.returncode = reply["exit"]
        return self.returncode

    def wait(self, timeout: float | None = TIMEOUT_S) -> int:
        if self.returncode is None:
            reply = self.forker.reply(timeout=timeout)
            assert reply is not None, f"spurgen (pid {self.pid}) did not end within {timeout} s"
            self.returncode = reply["exit"]
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, sig)


class Forker:
    """A warm interpreter (this file run as a script) that forks one process per spurgen command, one at a time."""

    def __init__(self) -> None:
        self.server = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       env=spurgen_env())
        self.buffer = b""
        ready = self.reply(timeout=TIMEOUT_S)
        assert ready == {"ready": True}, ready

    def reply(self, timeout: float | None) -> dict[str, Any] | None:
        """The server's next message, or None when none came within ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buffer:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.server.stdout], [], [], left)[0]:
                return None
            chunk = os.read(self.server.stdout.fileno(), 65536)  # type: ignore[union-attr]
            assert chunk, "the forking server died"
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def start(self, args: list[str], log: Path) -> ForkedProcess:
        """Starts ``spurgen ARGS`` in a fresh fork; stdout goes to ``log``, stderr to :func:`stderr_of` it."""
        self.server.stdin.write(json.dumps({"args": args, "log": str(log)}).encode() + b"\n")  # type: ignore[union-attr]
        self.server.stdin.flush()  # type: ignore[union-attr]
        reply = self.reply(timeout=TIMEOUT_S)
        assert reply is not None and "pid" in reply, reply
        return ForkedProcess(self, reply["pid"])

    def close(self) -> None:
        self.server.stdin.close()  # type: ignore[union-attr]
        self.server.wait(timeout=60)


def _serve() -> None:
    """The forking server: imports spurgen's libraries once, then forks a child per request and reports its end."""
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # whatever the libraries print must not mix into the replies
    # Every library the stages import, so that a child starts at once; importing starts no thread, so the
    # fork is safe (nothing has run yet).
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import timm  # noqa: F401
    from diffusers import StableDiffusionPipeline  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401

    import spurgen.cli
    import spurgen.run  # noqa: F401  (imports every stage module)

    print(json.dumps({"ready": True}), file=protocol, flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request["args"], request["log"])
        print(json.dumps({"pid": pid}), file=protocol, flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"exit": os.waitstatus_to_exitcode(status)}), file=protocol, flush=True)


def _child(args: list[str], log: str) -> None:
    """Runs the console script's entry point in a forked child; never returns."""
    code = 1
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        os.dup2(os.open(log, flags), 1)
        os.dup2(os.open(stderr_of(Path(log)), flags), 2)
        sys.argv = ["spurgen", *args]
        from spurgen.cli import run

        run()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:  # reported in the log like the console script would
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


# --- Kill moments --------------------------------------------------------------------------------------------


def file_state(root: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of every file under ``root``, temporary ones included."""
    state: dict[str, tuple[int, int]] = {}
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:  # removed or renamed while we looked
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                else:
                    info = entry.stat(follow_symlinks=False)
                    state[os.path.relpath(entry.path, root)] = (info.st_size, info.st_mtime_ns)
            except OSError:
                continue
    return state


def signal_when(process: Process, root: Path, condition: Callable[[dict[str, tuple[int, int]]], bool],
                sig: int = signal.SIGKILL, interval_s: float = 0.005) -> bool:
    """Sends ``sig`` to ``process`` once ``condition`` holds for the :func:`file_state` of ``root``.

    Returns whether the signal went to the running process (False: it ended on its own first).
    """
    deadline = time.monotonic() + TIMEOUT_S
    while process.poll() is None:
        assert time.monotonic() < deadline, f"spurgen (pid {process.pid}) ran past {TIMEOUT_S} s"
        if condition(file_state(root)):
            process.send_signal(sig)
            return True
        time.sleep(interval_s)
    return False


def signal_at_event(process: Process, root: Path, k: int, sig: int = signal.SIGKILL,
                    interval_s: float = 0.005) -> bool:
    """Sends ``sig`` to ``process`` once ``root`` has seen ``k`` new or changed files since the call."""
    seen, events = file_state(root), 0

    def kth_event(now: dict[str, tuple[int, int]]) -> bool:
        nonlocal seen, events
        events += sum(1 for path, state in now.items() if seen.get(path) != state)
        seen = now
        return events >= k

    return signal_when(process, root, kth_event, sig, interval_s)


def kill_at_event(process: Process, root: Path, k: int) -> bool:
    """SIGKILLs ``process`` at the ``k``-th file event; returns whether the kill landed while it ran."""
    return signal_at_event(process, root, k) and process.wait() == -signal.SIGKILL


# --- What a kill leaves behind ---------------------------------------------------------------------------------


def leftovers(root: Path) -> list[str]:
    """The temporary files under ``root`` (relative paths): what a killed process left, or one that works writes."""
    return sorted(relative for relative in file_state(root) if is_temporary(relative))


def is_temporary(relative: str) -> bool:
    """Whether a path (relative to the workspace) is an atomic write's temporary file or lies in a staging folder."""
    return any(_TEMPORARY.match(part) for part in Path(relative).parts)


def _check_file(path: Path) -> None:
    """Reads a file fully by its type; raises if it is truncated or corrupt."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        json.loads(path.read_text(encoding="utf-8"))
    elif suffix in (".png", ".jpg", ".jpeg"):
        from PIL import Image

        with Image.open(path) as image:
            image.load()
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        load_file(str(path))
    elif suffix in (".bin", ".pkl", ".pt"):
        import torch

        torch.load(path, weights_only=False, map_location="cpu")  # our own test's files: accelerate's state
    elif suffix == ".html":
        assert path.read_text(encoding="utf-8").rstrip().endswith("</html>"), "truncated HTML"
    else:
        path.read_text(encoding="utf-8")


def scan(root: Path, checkpoint_files: set[str] | None = None) -> list[str]:
    """Problems with the files under their final names: each must read whole by its type.

    ``checkpoint_files``: the file names a finished checkpoint folder holds; each ``checkpoint-N`` must hold all.
    """
    problems = []
    for relative in sorted(file_state(root)):
        if is_temporary(relative):
            continue
        try:
            _check_file(root / relative)
        except Exception as exc:  # any failure to read is the finding
            problems.append(f"{relative}: {type(exc).__name__}: {exc}")
    for folder in root.glob("models/*/*/checkpoints/checkpoint-*") if checkpoint_files else ():
        names = {p.name for p in folder.iterdir()}
        if names != checkpoint_files:
            problems.append(f"{folder.relative_to(root)} holds {sorted(names)}, not {sorted(checkpoint_files)}")
    return problems


def _strip(value: Any) -> Any:
    """A JSON value without :data:`IGNORED_KEYS`, anywhere in it."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in IGNORED_KEYS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def outputs(root: Path, *also: Path) -> dict[str, Any]:
    """A workspace's results, comparable with ``==`` except tensors: ``{relative path: content}``.

    JSON without :data:`IGNORED_KEYS`; text without timestamps; safetensors as tensors (compare with
    :func:`assert_same_outputs`); other files as bytes. Paths in contents are made relative to ``root`` and to
    ``also`` (the workspace it was copied from, which earlier stages' manifests name), so two workspaces compare.
    The prediction cache's shards have random names and their split depends on when a process was killed: their
    union per classifier is compared instead, under ``cache/predictions/<fp>``.
    Temporary files left by a kill are not results.
    """
    from safetensors.torch import load_file

    found: dict[str, Any] = {}
    for relative in sorted(file_state(root)):
        # cache/sha256.json remembers weight files by inode and times, which differ between workspaces by nature.
        if is_temporary(relative) or Path(relative).name == "spurgen.toml" or relative == "cache/sha256.json":
            continue
        path = root / relative
        if path.suffix == ".safetensors":
            tensors = load_file(str(path))
            parts = Path(relative).parts
            if parts[:2] == ("cache", "predictions"):
                found.setdefault("/".join(parts[:3]), {}).update(tensors)
            else:
                found[relative] = tensors
        elif path.suffix in (".json", ".html", ".csv", ".md", ".txt"):
            text = path.read_text(encoding="utf-8")
            for folder in (root, *also):
                text = text.replace(str(folder), "<workspace>")
            found[relative] = _strip(json.loads(text)) if path.suffix == ".json" else _TIMESTAMP.sub("<time>", text)
        else:
            found[relative] = path.read_bytes()
    return found


def assert_same_outputs(got: dict[str, Any], expected: dict[str, Any]) -> None:
    """The same files with the same contents; tensors equal to a float tolerance."""
    import torch

    assert sorted(got) == sorted(expected), (set(got) ^ set(expected))
    for relative, value in expected.items():
        if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            assert sorted(got[relative]) == sorted(value), relative
            for name, tensor in value.items():
                assert torch.allclose(got[relative][name], tensor, rtol=1e-5, atol=1e-6), f"{relative}: {name}"
        else:
            assert got[relative] == value, f"{relative} differs: {_differences(got[relative], value)}"


def _differences(got: Any, expected: Any, where: str = "") -> list[str]:
    """Where two JSON values differ: ``["settings.steps: 2 != 4", ...]`` (at most 10)."""
    if isinstance(got, dict) and isinstance(expected, dict):
        found = [
            d for key in {*got, *expected} for d in _differences(got.get(key), expected.get(key), f"{where}.{key}")
        ]
    elif isinstance(got, list) and isinstance(expected, list) and len(got) == len(expected):
        found = [d for i, (a, b) in enumerate(zip(got, expected)) for d in _differences(a, b, f"{where}[{i}]")]
    elif isinstance(got, str) and isinstance(expected, str) and "\n" in got + expected:
        import difflib

        found = (
            [
                f"{where or '<text>'}: "
                + "\n".join(
                    list(
                        difflib.unified_diff(
                            expected.splitlines(), got.splitlines(), "expected", "got", lineterm="", n=0
                        )
                    )[:12]
                )
            ]
            if got != expected
            else []
        )
    else:
        found = [] if got == expected else [f"{where or '<file>'}: {str(got)[:200]} != {str(expected)[:200]}"]
    return found[:10]


def finished(root: Path) -> dict[str, tuple[int, str]]:
    """The outputs a restart must leave untouched: ``{relative path: (mtime_ns, SHA-256)}``.

    References with their selection.json; a fine-tuning run whose training.json says complete (all its files);
    every saved checkpoint (it may be rotated away, never changed); every generated image, and generation.json
    once complete; every prediction cache shard; in a `spurgen run` workspace, evaluate's reports once
    evaluation.json (written last) exists — the evaluate command itself re-evaluates on every call, by design.
    """
    state = file_state(root)
    done = [relative for relative in state if not is_temporary(relative) and _is_finished(root, Path(relative).parts)]
    return {r: (state[r][1], hashlib.sha256((root / r).read_bytes()).hexdigest()) for r in done}


def _is_finished(root: Path, parts: tuple[str, ...]) -> bool:
    run = root.joinpath(*parts[:3])  # a run's folder: models/<class>/<run>, generated/<class>/<run>
    return (
        (parts[0] == "refs" and (root.joinpath(*parts[:2]) / "selection.json").is_file())
        or (parts[0] == "models" and _status(run / "training.json") == "complete")
        or (parts[0] == "models" and len(parts) > 4 and parts[3] == "checkpoints")
        or (parts[0] == "generated" and (parts[-1].endswith(".png") or _status(root.joinpath(*parts)) == "complete"))
        or parts[:2] == ("cache", "predictions")
        or (parts[0] == "reports" and (root / "run.json").is_file() and (root / "reports/evaluation.json").is_file())
    )


def _status(manifest: Path) -> str | None:
    """A manifest's ``status``; None for anything else, or a manifest being rewritten."""
    if manifest.suffix != ".json":
        return None
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError):
        return None


def changed_since(before: dict[str, tuple[int, str]], root: Path) -> list[str]:
    """The finished outputs of ``before`` that were rewritten or (except rotated checkpoints) deleted since."""
    now = finished(root)
    return [relative for relative, state in before.items()
            if now.get(relative, state if "/checkpoints/" in relative else None) != state]


if __name__ == "__main__":
    _serve()
