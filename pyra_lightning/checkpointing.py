"""Checkpoints that survive ``kill -9`` and resume by themselves after a preemption.

Lightning's own save moves a temporary file from ``$TMPDIR`` into place; across filesystems that
move is a copy, and a kill during it leaves a truncated ``last.ckpt``. ``AtomicCheckpointIO``
writes the temporary file next to the target, fsyncs it and renames it: a reader sees either the
old checkpoint or the new one, never a partial one.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

TMP_SUFFIX = ".tmp"


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` into a sibling temporary file, then ``os.replace`` it over the target."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_write(Path(path), lambda handle: torch.save(checkpoint, handle))


def atomic_write(target: Path, write: Callable[[BinaryIO], object]) -> None:
    """Let ``write`` fill a sibling temporary file, fsync it, then rename it over ``target``.

    A reader sees the old file or the new one, never a partial one; temporary files that a killed
    process left behind are removed (nothing ever reads them).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*{TMP_SUFFIX}"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def atomic_write_text(path: Path, text: str) -> None:
    """``atomic_write`` for a text file (``results.json``, ``sweep.json``)."""
    atomic_write(Path(path), lambda handle: handle.write(text.encode()))


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
