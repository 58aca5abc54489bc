"""What a sweep records: one ``sweep_task.json`` per task and the ``sweep.json`` that gathers them.

Each task's state file is rewritten atomically at every change of state; ``sweep.json`` is
rebuilt from them under a ``filelock`` lock, so the tasks of a SLURM job array, each running its
own ``sweep`` process, never lose each other's updates.
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock, Timeout

from pyra_lightning.files import atomic_write_text
from pyra_lightning.results import RESULTS_FILENAME, read_result

SWEEP_FILE = "sweep.json"
TASK_STATE_FILE = "sweep_task.json"
LOG_FILE = "train.log"
RUN_HEADER = "===== pyra-lightning sweep: run"  # starts the block each (re)run appends to train.log
Status = Literal["pending", "running", "done", "skipped", "failed", "interrupted"]
_LOG_TAIL_LINES = 20
LOCK_TIMEOUT_S = 60.0  # sweep.json is rewritten in milliseconds; a lock held this long is stale
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # tqdm's cursor moves


@dataclass
class TaskRun:
    """One task of a sweep: where it runs and how its last attempt went.

    Attributes:
        task: folder name of the task (the registry's name for known tasks, custom names as given).
        run_dir: ``<out_dir>/<name>/<task>``: the fit's ``--run_dir``.
        status: ``pending``, ``running``, ``done`` (finished in this invocation), ``skipped`` (had
            finished before), ``failed`` or ``interrupted`` (the sweep itself was stopped).
        attempts: runs started in this invocation (1 + retries used).
        returncode: exit status of the last run.
        duration_s: wall time of the last run (for ``skipped``: of the run that finished it).
        results_json: the task's ``results.json`` once it has one.
        log_tail: the last lines of ``train.log`` of a failed run.
        command: the command line of the last run.
        device: ``CUDA_VISIBLE_DEVICES`` of the last run, when devices are assigned.
        started, finished: UTC times of the last run.
    """

    task: str
    run_dir: str
    status: Status = "pending"
    attempts: int = 0
    returncode: int | None = None
    duration_s: float | None = None
    started: str | None = None
    finished: str | None = None
    results_json: str | None = None
    log_tail: str | None = None
    command: list[str] = field(default_factory=list)
    device: str | None = None

    @property
    def log(self) -> Path:
        return Path(self.run_dir) / LOG_FILE


@dataclass
class SweepSummary:
    """What one invocation of ``run_sweep`` did; ``runs`` are the tasks it was given (or picked)."""

    name: str
    sweep_dir: Path
    runs: list[TaskRun]
    dry_run: bool = False

    @property
    def done(self) -> list[str]:
        return [run.task for run in self.runs if run.status == "done"]

    @property
    def skipped(self) -> list[str]:
        return [run.task for run in self.runs if run.status == "skipped"]

    @property
    def failed(self) -> list[str]:
        return [run.task for run in self.runs if run.status in ("failed", "interrupted")]

    @property
    def ok(self) -> bool:
        return not self.failed

    def format(self) -> str:
        """A human summary: counts, then every failed task with the tail of its log."""
        lines = [
            f"sweep {self.name} ({self.sweep_dir}): {len(self.done)} done, {len(self.skipped)} skipped "
            f"(finished before), {len(self.failed)} failed, of {len(self.runs)}"
        ]
        for label, tasks in (("done", self.done), ("skipped", self.skipped), ("failed", self.failed)):
            if tasks:
                lines.append(f"  {label}: {', '.join(tasks)}")
        for run in self.runs:
            if run.status in ("failed", "interrupted"):
                lines.append(f"--- {run.task} {run.status} (exit {run.returncode}); tail of {run.log}:")
                lines.append(run.log_tail or "(empty log)")
        return "\n".join(lines)


def find_results(run_dir: Path) -> Path | None:
    """The task's ``results.json`` if ``report`` accepts it (``results.validate_result``), else ``None``.

    Using the report's own check means a task counts as finished exactly when its result can
    go into the table.
    """
    path = run_dir / RESULTS_FILENAME
    try:
        read_result(path)
    except (OSError, ValueError):
        return None
    return path


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last lines of a log, each cut to what follows its last ``\\r`` (progress bars redraw so)."""
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 64 * 1024))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    kept = [_ANSI.sub("", line.rsplit("\r", 1)[-1]).rstrip() for line in text.split("\n")]
    return "\n".join([line for line in kept if line][-lines:])


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_task_state(run_dir: Path) -> dict[str, Any] | None:
    try:
        state = json.loads((run_dir / TASK_STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def save_task_state(run: TaskRun) -> None:
    atomic_write_text(Path(run.run_dir) / TASK_STATE_FILE, json.dumps(asdict(run), indent=2) + "\n")


def write_sweep_json(sweep_dir: Path, tasks: Sequence[str], meta: dict[str, Any]) -> Path:
    """Gather every task's ``sweep_task.json`` into ``sweep.json`` (atomically, under a lock).

    Where the file system cannot lock (some NFS/Lustre mounts) or the lock stays taken past
    ``LOCK_TIMEOUT_S`` (a holder killed on another host), the file is written unlocked, with a
    warning: a concurrent update may then be lost until the next write, which repairs it, and the
    sweep itself never stops for its summary file.
    """
    path = sweep_dir / SWEEP_FILE
    lock = FileLock(sweep_dir / ".sweep.lock", timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except (Timeout, NotImplementedError, OSError) as error:
        print(
            f"sweep: cannot lock {lock.lock_file} ({type(error).__name__}: {error}); writing {path} unlocked",
            file=sys.stderr,
        )
    try:
        entries = {
            task: read_task_state(sweep_dir / task) or asdict(TaskRun(task, str(sweep_dir / task)))
            for task in tasks
        }
        counts = Counter(entry["status"] for entry in entries.values())
        document = {**meta, "updated": now_utc(), "counts": dict(counts), "tasks": entries}
        atomic_write_text(path, json.dumps(document, indent=2) + "\n")
    finally:
        if lock.is_locked:
            lock.release()
    return path
