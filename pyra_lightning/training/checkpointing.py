"""Checkpoints that survive ``kill -9`` and resume by themselves after a preemption.

Lightning's own save moves a temporary file from ``$TMPDIR`` into place; across filesystems that
move is a copy, and a kill during it leaves a truncated ``last.ckpt``. ``AtomicCheckpointIO``
writes the temporary file next to the target, fsyncs it and renames it: a reader sees either the
old checkpoint or the new one, never a partial one.

``RunCheckpoint`` makes ``last.ckpt`` exist after every finished epoch. Lightning's
``ModelCheckpoint`` (2.6) writes ``last`` at an epoch's end only when it also saved a top-k
checkpoint in that step, so with ``save_top_k=0`` (no metric to rank by) nothing was written
before training ended, and a preempted job started over.

``RunStatus`` marks ``run.json`` when a fit ends early: ``interrupted`` (SIGINT, SIGTERM) with the
one line that says how to resume, or ``failed`` with the error, so that a fixed rerun of a start
that failed before its first checkpoint is not refused as "another run".
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint, Timer
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException

from pyra_lightning.files import atomic_write

LAST = "last.ckpt"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a sibling temporary file, then ``os.replace`` it over the target."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_write(Path(path), lambda handle: torch.save(checkpoint, handle))


def find_resume_checkpoint(checkpoint_dir: _PATH, root_dir: _PATH | None = None) -> Path | None:
    """The newest of ``<checkpoint_dir>/last.ckpt`` and SLURM's ``<root_dir>/hpc_ckpt_N.ckpt``.

    A SLURM requeue saves ``hpc_ckpt_N.ckpt`` at the signal, which Lightning only reads when no
    ``ckpt_path`` is given; considering both here means a requeued job continues from whichever
    is newer, with no flag.
    """
    candidates = [Path(checkpoint_dir) / "last.ckpt"]
    if root_dir is not None:
        candidates += Path(root_dir).glob("hpc_ckpt_*.ckpt")
    existing = [path for path in candidates if path.is_file()]
    return max(existing, key=lambda path: path.stat().st_mtime, default=None)


def named_checkpoint(name: str, checkpoint_dir: _PATH, run_dir: Path, command: str) -> Path:
    """Lightning's ``ckpt_path="last"``/``"hpc"``, looked up in the run's own folder.

    ``last``: the newest of ``checkpoints/last.ckpt`` and SLURM's ``hpc_ckpt_N.ckpt``;
    ``hpc``: the newest ``hpc_ckpt_N.ckpt``. The identity check then applies as to any file.

    Raises:
        FileNotFoundError: the run has no such checkpoint.
    """
    if name == "last":
        found = find_resume_checkpoint(checkpoint_dir, run_dir)
    else:
        found = max(
            Path(run_dir).glob("hpc_ckpt_*.ckpt"),
            key=lambda path: int(path.stem.rsplit("_", 1)[-1]),
            default=None,
        )
    if found is None:
        looked = "checkpoints/last.ckpt or hpc_ckpt_N.ckpt" if name == "last" else "hpc_ckpt_N.ckpt"
        raise FileNotFoundError(
            f"{command} --ckpt_path {name}: {run_dir} has no {looked} (the run folder comes from "
            "--run_dir, or --trainer.default_root_dir/<task>/<method>)"
        )
    rank_zero_info(f"--ckpt_path {name}: {found}")
    return found


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` whose ``last.ckpt`` is written after every training epoch.

    Everything else is Lightning's: ``every_n_train_steps`` also rewrites ``last.ckpt`` every N
    steps, ``monitor``/``save_top_k`` keep the best checkpoints beside it. Only the end of an
    epoch changes: when Lightning saved no top-k checkpoint there (``save_top_k=0``, or a monitor
    that did not improve), ``last.ckpt`` is written anyway, so a kill at any later moment resumes
    at the next epoch.
    """

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not stopped_inside_epoch(trainer):  # Lightning validates at a stop, then saves here
            super().on_validation_end(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not stopped_inside_epoch(trainer):  # Lightning (2.6) saves ``last.ckpt`` here too
            super().on_train_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if stopped_inside_epoch(trainer):
            return  # see ``stopped_inside_epoch``: the last checkpoint stays the last finished epoch's
        last = Path(self.dirpath or ".") / LAST
        before = _mtime(last)
        super().on_train_epoch_end(trainer, pl_module)
        if not self.save_last or trainer.fast_dev_run or trainer.sanity_checking:
            return
        # ModelCheckpoint has no public "write last now" hook: Lightning's own save already ran
        # if the file changed during super(); otherwise save it through the trainer, which goes
        # through the CheckpointIO plugin (atomic) and is collective under DDP. Lightning's
        # weights_only choice is passed on: left as None, the trainer logs a line per save.
        if _mtime(last) == before:
            trainer.save_checkpoint(last, weights_only=self.save_weights_only)
            self.last_model_path = str(last)


def stopped_inside_epoch(trainer: pl.Trainer) -> bool:
    """Whether training is ending before its epoch's last batch (``max_steps``, ``max_time``).

    Lightning then still runs the epoch-end hooks, and a checkpoint saved there records the epoch
    as finished: the rerun would skip the rest of it and still end "finished". So no checkpoint is
    written then, and the rerun repeats the partial epoch from the last finished one, exactly as
    after a kill in the middle of an epoch.
    """
    if trainer.sanity_checking:
        return False
    return job_limit_reached(trainer) and not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch


def job_limit_reached(trainer: pl.Trainer) -> bool:
    """Whether ``max_steps`` or ``max_time`` (Lightning's ``Timer``) ends this fit: limits of one
    job, outside the run's settings. A callback's own stop (``EarlyStopping``) is not one."""
    return max_steps_reached(trainer) or any(
        isinstance(callback, Timer) and (left := callback.time_remaining()) is not None and left <= 0
        for callback in trainer.callbacks
    )


def max_steps_reached(trainer: pl.Trainer) -> bool:
    """Whether ``trainer.global_step`` has reached ``max_steps`` (-1: no limit)."""
    return trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step


def saved_at(checkpoint: Path, step: int) -> str:
    """`` (saved at epoch E, step S: the N steps after it run again)``, or ``""`` if unreadable."""
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)  # LoRA-sized
        epoch, saved_step = int(saved["epoch"]), int(saved["global_step"])
    except Exception:  # the interrupt must be reported whatever the file holds
        return ""
    again = f": the {step - saved_step} steps after it run again" if step > saved_step else ""
    return f" (saved at epoch {epoch}, step {saved_step}{again})"


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


class RunStatus(pl.Callback):
    """Record in ``run.json`` how a fit that did not finish ended, and say how to continue.

    Args:
        mark: ``mark(trainer, pl_module, status, error)`` writes the run record; the CLI passes
            one that knows the run folder and settings.
        checkpoint_dir: Where ``last.ckpt`` is written.
        run_dir: The run folder, where a SLURM requeue (SIGUSR1) saves ``hpc_ckpt_N.ckpt``.
    """

    def __init__(
        self,
        mark: Callable[[pl.Trainer, pl.LightningModule, str, str | None], None],
        checkpoint_dir: Path,
        run_dir: Path | None = None,
    ) -> None:
        self.mark = mark
        self.checkpoint_dir = Path(checkpoint_dir)
        self.run_dir = run_dir
        self.message: str | None = None
        self.fit_ended = False  # the test that ``fit`` runs after training still belongs to the fit

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fit_ended = True

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if trainer.state.fn != "fit" and not self.fit_ended:
            return
        if isinstance(exception, KeyboardInterrupt | SIGTERMException):
            last = find_resume_checkpoint(self.checkpoint_dir, self.run_dir)
            where = f"at epoch {trainer.current_epoch}, step {trainer.global_step}"
            if self.fit_ended and last is not None:  # the rerun restores the trained model, only tests
                where = f"in the test after training ({where})"
                resume = f"rerun the same command to test again: it restores {last} and does not train"
            elif last is not None:
                resume = f"rerun the same command to resume from {last}{saved_at(last, trainer.global_step)}"
            else:
                resume = "no epoch finished, so nothing was saved; rerun the same command to start again"
            self.message = f"interrupted {where}; {resume}"
            self.mark(trainer, pl_module, "interrupted", None)
            if rank_zero_only.rank == 0:
                print(self.message, file=sys.stderr, flush=True)
        else:
            self.mark(trainer, pl_module, "failed", f"{type(exception).__name__}: {exception}")
