"""One writer per run folder: an OS file lock held for the life of the command.

Two ``fit`` commands in one folder (a requeued cluster job overlapping the old one, two terminals)
would write one ``metrics.csv`` and one ``last.ckpt`` at once and mangle both. Every command that
writes into a run folder takes ``<run>/.lock`` with ``filelock`` first; the lock is the operating
system's (``flock``), so a ``kill -9`` releases it with the process and never leaves a stale lock.
Beside it, ``.lock.json`` says who holds it (pid, host, command, start time), so the refusal can
name the holder.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path

from filelock import FileLock, Timeout

from pyra_lightning.files import atomic_write_text

LOCK_FILE = ".lock"
HOLDER_FILE = ".lock.json"


class RunFolderBusy(FileExistsError):
    """Another command writes into the run folder right now."""


class RunLock:
    """The lock of one run folder, taken at once or refused naming the holder.

    Args:
        run_dir: The run folder; created if missing.
        command: What this process is doing, shown to a second writer (default: its argv).
    """

    def __init__(self, run_dir: str | Path, command: str | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.command = command or shlex.join(["pyra-lightning", *sys.argv[1:]])
        self._lock = FileLock(self.run_dir / LOCK_FILE, timeout=0)

    @property
    def held(self) -> bool:
        return self._lock.is_locked

    def acquire(self) -> RunLock:
        """Take the lock, or raise ``RunFolderBusy`` naming the pid, host, command and start time."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            raise RunFolderBusy(
                f"{self.run_dir} is in use by another command: {self.holder()}; wait for it to end "
                "or stop it (one writer per run folder)"
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
        atomic_write_text(self.run_dir / HOLDER_FILE, json.dumps(holder) + "\n")
        return self

    def holder(self) -> str:
        """Who holds the lock, as recorded in ``.lock.json`` (or that it is unknown)."""
        try:
            info = json.loads((self.run_dir / HOLDER_FILE).read_text(encoding="utf-8"))
            return f"pid {info['pid']} on {info['host']}, started {info['started']}: {info['command']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "a process that has not recorded itself yet"

    def release(self) -> None:
        """Give the lock back (a no-op when not held); the holder file goes first."""
        if self._lock.is_locked:
            (self.run_dir / HOLDER_FILE).unlink(missing_ok=True)
            self._lock.release()


_HELD: list[RunLock] = []


def hold(run_dir: str | Path, command: str | None = None) -> RunLock:
    """Take the run folder's lock for this command; ``release_all`` (or the process's end) frees it.

    Taking the lock of a folder this process already holds is a no-op, so a ``fit`` that tests
    its model afterwards does not lock itself out.
    """
    resolved = Path(run_dir).resolve()
    for lock in _HELD:
        if lock.run_dir.resolve() == resolved and lock.held:
            return lock
    lock = RunLock(run_dir, command).acquire()
    _HELD.append(lock)
    return lock


def release_all() -> None:
    """Release every run-folder lock this process holds (the end of one command)."""
    while _HELD:
        _HELD.pop().release()


def launch_rank() -> int:
    """This process's global rank as its launcher set it, before a Trainer exists.

    Lightning's ``rank_zero_only.rank`` reads ``RANK``, else ``LOCAL_RANK``: right for torchrun
    and Lightning's own single-node launcher, but on a multi-node launch that sets ``NODE_RANK``
    and ``LOCAL_RANK`` only (Lightning's documented manual launch) every node's first process
    would think it is rank 0 and take the shared run folder's lock. A node rank above 0 is
    therefore never rank 0 here.
    """
    env = os.environ
    for name in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if name in env:
            return int(env[name])
    local = int(env.get("LOCAL_RANK", 0))
    node = int(env.get("NODE_RANK", env.get("GROUP_RANK", 0)))
    return local if node == 0 else node * max(1, int(env.get("LOCAL_WORLD_SIZE", 1))) + local
