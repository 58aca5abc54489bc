"""The sweep's progress line: ``done / running / failed / remaining`` and an ETA."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

from tqdm.auto import tqdm

if TYPE_CHECKING:
    from pyra_lightning.commands.sweep_state import TaskRun

FINISHED = ("done", "skipped")


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """``done / running / failed / remaining`` and an ETA: a ``tqdm`` bar on a TTY, plain lines in a log.

    The ETA assumes every unfinished task takes the mean duration of the tasks finished in this
    invocation (skipped ones took no time here), spread over the parallel slots; tqdm's own rate
    would count the skipped tasks as instant and ignore the tasks already running, so the bar shows
    this line as its text and tqdm draws it (width, redraws, messages printed above the bar).
    """

    def __init__(self, name: str, total: int, max_parallel: int, stream: TextIO | None = None) -> None:
        self.name, self.total, self.max_parallel = name, total, max_parallel
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.durations: list[float] = []
        self._last = ""
        # A log file gets no bar: tqdm would fill it with carriage-return redraws.
        self.bar = tqdm(total=total, file=self.stream, disable=not self.tty, bar_format="{desc}", leave=True)

    def line(self, runs: Sequence[TaskRun], started: dict[str, float]) -> str:
        done = sum(run.status in FINISHED for run in runs)
        failed = sum(run.status in ("failed", "interrupted") for run in runs)
        running = [run for run in runs if run.status == "running"]
        pending = self.total - done - failed - len(running)
        text = (
            f"sweep {self.name}: {done}/{self.total} done, {len(running)} running, "
            f"{failed} failed, {pending} remaining"
        )
        if self.durations and (pending or running):
            mean = sum(self.durations) / len(self.durations)
            now = time.monotonic()
            work = pending * mean + sum(max(mean - (now - started[run.task]), 0.0) for run in running)
            text += f", ETA {format_duration(work / max(1, min(self.max_parallel, pending + len(running))))}"
        return text

    def show(self, runs: Sequence[TaskRun], started: dict[str, float]) -> None:
        text = self.line(runs, started)
        if self.tty:
            self.bar.set_description_str(text)
        elif text.split(", ETA")[0] != self._last.split(", ETA")[0]:
            self.stream.write(text + "\n")  # plain logs: only when the counts change
            self.stream.flush()
        self._last = text

    def message(self, text: str) -> None:
        """Print a line above the progress bar (tqdm redraws the bar below it)."""
        if self.tty:
            self.bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def close(self) -> None:
        self.bar.close()
