"""Crash anywhere, lose nothing: every long command killed with SIGKILL at many moments, then restarted.

Each test copies the workspace a command starts from, runs the command as a real process, kills it at the k-th
new or changed file of the workspace (a watcher polls it every 5 ms), and restarts it — again and again for a
chain of kill points, then once to the end. The processes run the console script's entry point forked from a
warm interpreter (:class:`_crash.Forker`), which saves the ~10 s of imports per start; the Ctrl-C tests start
the installed console script itself. At every kill, every file under a final name must be whole and every
checkpoint complete (:func:`_crash.scan`); every process must leave alone what was finished before it started
(:func:`_crash.finished`); the end result must equal an uninterrupted run (:func:`_crash.outputs`, which names the
manifest keys that legitimately differ). Ctrl-C (SIGINT) on the console script exits 130 with a one-line hint that
works.

The kill points are in the test ids: ``finetune-k3.8.13`` kills three processes in turn at their 3rd, 8th and
13th file event. The first three file events of a stage are probes and manifests, later ones the stage's real
outputs and the temporary files they are written through, so the kills land before, inside and between writes.
Every restart sweeps what the kill left behind (hidden ``.tmp``/``.old`` files and staging folders): when a chain
ends, no temporary file is left; two more kills land while a checkpoint is being staged, and the restart must
delete it but leave a user's own hidden file alone.

Kill points (:data:`KILL_POINTS`): the sum of the chains' lengths in :data:`CHAINS`, plus one per case of
:func:`test_a_restart_sweeps_what_the_kill_left`.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from _crash import (Forker, assert_same_outputs, changed_since, finished, is_temporary, kill_at_event, leftovers,
                    outputs, scan, signal_at_event, signal_when, start_script, stderr_of)
from conftest import small_settings, solved_classifier, spurious_folder

from spurgen.labels import get_label_set

# Dozens of killed and restarted processes: CI runs them, the everyday loop (make test-fast) does not.
pytestmark = pytest.mark.slow

CLASSES = get_label_set("imagenet").resolve_many(["all"])[:2]
STAGES = ("select-refs", "finetune", "generate", "evaluate")
# evaluate as Spurious ImageNet scores: its protocol's own crops, and predictions of real (validation) images.
PROTOCOL = "evaluate-protocol"
# Small, but with every kind of output: 4 steps with a checkpoint each (rotated), a validation image mid-run
# and at the end, 6 images per class made one at a time.
FINETUNE = {"steps": 4, "num-validation-images": 1, "validation-steps": 2, "sample-steps": 2}
GENERATE = {"num-images": 6, "batch-size": 1}
# Kill chains: each tuple kills successive processes at these file events; a final process then runs to the end.
# The cheap stages are killed once per test at every event; the longer ones in chains that move through them.
CHAINS: dict[str, list[tuple[int, ...]]] = {
    "select-refs": [(k,) for k in range(1, 6)],
    # The third chain lands in losses.csv's rewrites and between a checkpoint's files.
    "finetune": [(2, 5, 9, 14, 20, 27), (12, 12, 12, 12, 12, 12), (3, 7, 11, 16, 22, 30)],
    "generate": [(2, 3, 4, 5, 6, 7), (4, 4, 4, 4)],
    "evaluate": [(k,) for k in range(1, 6)],
    PROTOCOL: [(k,) for k in range(1, 6)],
    "run": [(5, 15, 30, 45, 60, 75), (10, 25, 40, 55)],
}
# The commands whose restart after a kill in a checkpoint's staging is checked for leftovers.
SWEPT = ("finetune", "run")
KILL_POINTS = sum(len(chain) for chains in CHAINS.values() for chain in chains) + len(SWEPT)
LANDED: dict[str, list[int]] = {}  # command: [kills that landed while it ran, kills tried], over this session's tests


@dataclass
class Setup:
    """Where each command starts from, what an uninterrupted run of it leaves, and how to start one."""

    forker: Forker
    classifier: str
    reference: Path  # the uninterrupted stages' workspace, which the stages' inputs were copied from
    inputs: dict[str, Path]
    expected: dict[str, dict]
    checkpoint_files: set[str]
    val_images: Path  # a validation image folder per class, for evaluate --protocol spurious-imagenet

    def args(self, command: str, workspace: Path) -> list[str]:
        """The command line; finetune continues an interrupted run only when asked (``--resume``)."""
        extra = {"finetune": ["--preset", "dreambooth", "--resume"],
                 PROTOCOL: ["--protocol", "spurious-imagenet", "--val-images", str(self.val_images)]}.get(command, [])
        return [command.removesuffix("-protocol"), "-w", str(workspace), "--classes",
                ",".join(str(c.index) for c in CLASSES), f"--classifier={self.classifier}", *extra]


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, symlinks=True)
    return target


@pytest.fixture(scope="module")
def setup(tiny_sd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """Runs the four stages once, uninterrupted, keeping a copy of the workspace before each; and `spurgen run`.

    Two classes with two images each, the solved ``tiny`` classifier (it predicts every image's own class)."""
    root = tmp_path_factory.mktemp("crash")
    dataset = root / "images"
    spurious_folder(dataset, CLASSES, 2)
    classifier = solved_classifier(dataset, root / "tiny.safetensors")
    start = root / "start"
    start.mkdir()
    (start / "spurgen.toml").write_text(small_settings(tiny_sd_dir, dataset, finetune=FINETUNE, generate=GENERATE))
    for cls in CLASSES:  # the spurious images stand in for real ones: only the code path matters here
        shutil.copytree(next(dataset.glob(f"spurious_imagenet_{cls.index}_*")), root / "val" / cls.dirname)
    forker = Forker()
    reference = _copy(start, root / "reference")
    setup = Setup(forker, classifier, reference, {"run": start}, {}, set(), root / "val")
    for stage in STAGES:
        setup.inputs[stage] = _copy(reference, root / f"before-{stage}")
        if stage == "evaluate":  # the protocol's evaluation first, on a copy: the stages go on from `evaluate`'s
            setup.inputs[PROTOCOL] = setup.inputs[stage]
            protocol = _copy(reference, root / "reference-protocol")
            assert forker.start(setup.args(PROTOCOL, protocol), root / "protocol.log").wait() == 0, \
                stderr_of(root / "protocol.log").read_text()[-3000:]
            setup.expected[PROTOCOL] = outputs(protocol, reference)
        assert forker.start(setup.args(stage, reference), root / f"{stage}.log").wait() == 0, \
            stderr_of(root / f"{stage}.log").read_text()[-3000:]
        setup.expected[stage] = outputs(reference)
    whole = _copy(start, root / "reference-run")
    assert forker.start(setup.args("run", whole), root / "run.log").wait() == 0, \
        stderr_of(root / "run.log").read_text()[-3000:]
    setup.expected["run"] = outputs(whole)
    setup.checkpoint_files = {Path(r).name for r in setup.expected["finetune"] if "/checkpoints/checkpoint-" in r}
    yield setup
    forker.close()


def _chain_id(command: str, chain: tuple[int, ...]) -> str:
    return f"{command}-k{'.'.join(map(str, chain))}"


@pytest.mark.parametrize(("command", "chain"), [(c, chain) for c, chains in CHAINS.items() for chain in chains],
                         ids=[_chain_id(c, chain) for c, chains in CHAINS.items() for chain in chains])
def test_sigkill_then_restart_loses_nothing(setup: Setup, command: str, chain: tuple[int, ...], tmp_path: Path) -> None:
    """Kills a chain of processes at file events: every kill leaves whole files, no process redoes finished
    work, and the last, uninterrupted process ends with what one uninterrupted run makes."""
    workspace = _copy(setup.inputs[command], tmp_path / "ws")
    landed = 0
    for n, k in enumerate((*chain, None)):
        before = finished(workspace)
        log = tmp_path / f"{n}.log"
        process = setup.forker.start(setup.args(command, workspace), log)
        if k is not None and kill_at_event(process, workspace, k):
            landed += 1
            problems = scan(workspace, setup.checkpoint_files)
            assert not problems, f"after kill {n + 1} (event {k}):\n" + "\n".join(problems)
        else:  # the last process, or one that finished before its kill: it must have ended well
            assert process.wait() == 0, f"process {n + 1}: " + stderr_of(log).read_text()[-3000:]
        redone = changed_since(before, workspace)
        assert not redone, f"process {n + 1} rewrote or deleted finished outputs: {redone}"
    assert not leftovers(workspace), "the restarts left a killed process's temporary files"
    assert_same_outputs(outputs(workspace, setup.reference), setup.expected[command])
    tally = LANDED.setdefault(command, [0, 0])
    tally[0] += landed
    tally[1] += len(chain)
    print(f"{_chain_id(command, chain)}: {landed} of {len(chain)} kills landed")


def test_most_kills_landed_while_the_command_ran() -> None:
    """A kill after the process ended tests nothing: the chains above are made to land while it runs. How many
    file events a 5 ms poll sees depends on the machine's speed (on an idle one a short command can end before
    its last planned kill), so half of each command's kills must land, all of them in the usual runs."""
    if not LANDED:
        pytest.skip("no kill test ran in this session")
    print(", ".join(f"{command}: {landed} of {tried}" for command, (landed, tried) in LANDED.items()))
    for command, (landed, tried) in LANDED.items():
        assert landed >= 0.5 * tried, f"{command}: only {landed} of {tried} kills landed while it ran"


@pytest.mark.parametrize("command", SWEPT)
def test_a_restart_sweeps_what_the_kill_left(setup: Setup, command: str, tmp_path: Path) -> None:
    """Killed while a checkpoint is being staged after an earlier one: the kill leaves temporary files; the restart
    (which resumes) deletes them, leaves a user's own hidden file alone, and ends with an uninterrupted run's
    outputs."""
    workspace = _copy(setup.inputs[command], tmp_path / "ws")
    (workspace / ".notes.tmp").write_text("the user's, not spurgen's")
    process = setup.forker.start(setup.args(command, workspace), tmp_path / "killed.log")

    def staging_a_second_checkpoint(now: dict[str, tuple[int, int]]) -> bool:
        # With a checkpoint saved, the restart resumes instead of starting the run's folder afresh.
        return (any("/checkpoints/." in path and is_temporary(path) for path in now)
                and any("/checkpoints/checkpoint-" in path for path in now))

    assert signal_when(process, workspace, staging_a_second_checkpoint), "the command ended before a 2nd checkpoint"
    assert process.wait() == -signal.SIGKILL
    left = leftovers(workspace)
    assert any("/checkpoints/." in path for path in left), left
    restart = setup.forker.start(setup.args(command, workspace), tmp_path / "restart.log")
    assert restart.wait() == 0, stderr_of(tmp_path / "restart.log").read_text()[-3000:]
    assert leftovers(workspace) == [".notes.tmp"]
    assert_same_outputs(outputs(workspace, setup.reference), setup.expected[command])


def test_the_kill_points_number_at_least_50() -> None:
    """The crash tests' promise in docs/reliability.md: how many moments the commands are killed at."""
    assert KILL_POINTS >= 50, KILL_POINTS


@pytest.mark.parametrize(("command", "k"), [("finetune", 8), ("generate", 3)])
def test_ctrl_c_exits_130_with_a_hint_that_resumes(setup: Setup, command: str, k: int, tmp_path: Path) -> None:
    """SIGINT to the console script: exit code 130, one line saying how to resume, no traceback; doing what it
    says completes the work to the same outputs."""
    workspace = _copy(setup.inputs[command], tmp_path / "ws")
    args = [a for a in setup.args(command, workspace) if a != "--resume"]  # as a user would start it
    log = tmp_path / "interrupted.log"
    process = start_script(args, log)
    assert signal_at_event(process, workspace, k, signal.SIGINT), "the command ended before Ctrl-C"
    assert process.wait() == 130
    assert not scan(workspace, setup.checkpoint_files)
    stderr = stderr_of(log).read_text()
    assert "Traceback" not in stderr
    hints = [line for line in stderr.splitlines() if "interrupted" in line]
    assert len(hints) == 1, stderr
    assert "run the same command" in hints[0], hints[0]
    again = args + (["--resume"] if "--resume" in hints[0] else [])
    assert setup.forker.start(again, tmp_path / "again.log").wait() == 0, stderr_of(tmp_path / "again.log").read_text()
    assert_same_outputs(outputs(workspace, setup.reference), setup.expected[command])
