"""Checkpoints that survive ``kill -9`` and resume by themselves after a preemption.

Lightning's own save moves a temporary file from ``$TMPDIR`` into place; across filesystems that
move is a copy, and a kill during it leaves a truncated ``last.ckpt``. ``AtomicCheckpointIO``
writes the temporary file next to the target, fsyncs it and renames it: a reader sees either the
old checkpoint or the new one, never a partial one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO

from pyra_lightning.files import atomic_write


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
