"""What a run folder holds, and Lightning's debugging flags, which must leave it alone.

``fit`` keeps one folder per run (``PyraCLI``): a folder whose ``run.json`` says ``finished`` is
not trained again, a checkpoint in it is resumed, and ``report`` reads every ``results.json``
under ``runs/``. Lightning's ``--trainer.fast_dev_run`` (one batch of train, val and test: a smoke
test of the code, with logging and checkpointing suppressed) used to write into that folder
anyway: a one-batch test accuracy as the run's result and the status ``finished``, so the real
``fit`` that followed said "Nothing to do" and ``report`` tabulated the debug pass. Such a pass
now runs in a scratch folder of its own. ``--trainer.barebones`` turns off what a run is made
of (loggers, checkpoints, ``self.log``), so it is refused with the tool that measures raw speed.
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info

from pyra_lightning.training.checkpointing import (
    find_resume_checkpoint,
    job_limit_reached,
    max_steps_reached,
    saved_at,
)
from pyra_lightning.training.runs import read_run_record

SCRATCH_PREFIX = "pyra-lightning-fast_dev_run-"


def holds_run(run_dir: Path, checkpoint_dir: str | Path) -> bool:
    """Whether ``run_dir`` holds a run: a finished one, or one with a checkpoint to resume.

    A start that failed or was killed before its first checkpoint holds nothing: the next start
    takes the folder, whatever its settings.
    """
    record = read_run_record(run_dir)
    if record is None:
        return False
    return record.get("status") == "finished" or find_resume_checkpoint(checkpoint_dir, run_dir) is not None


def fit_completed(trainer: Trainer) -> bool:
    """Whether a fit that ended without an interrupt finished its run (``run.json`` ``finished``).

    Finished: all epochs ran, or a callback judged training done (``EarlyStopping``). A stop at
    ``max_steps`` or ``max_time`` is not: both are limits of one job, outside the run's settings,
    so the rerun continues the run (from its last finished epoch, ``stopped_inside_epoch``).
    """
    epochs_done = trainer.max_epochs is not None and 0 <= trainer.max_epochs <= trainer.current_epoch
    return epochs_done or (trainer.should_stop and not job_limit_reached(trainer))


def job_limit_stop(trainer: Trainer, checkpoint_dir: str | Path, run_dir: Path) -> str:
    """The line for a fit that ``max_steps`` or ``max_time`` stopped before its last epoch.

    Such a fit is not tested and writes no ``results.json``: its accuracy is not the run's, and
    ``report`` would have tabulated it. Lightning counts both limits over the whole run (the
    ``Timer`` keeps its elapsed time in the checkpoint), so only a larger limit, or none, continues.
    """
    last = find_resume_checkpoint(checkpoint_dir, run_dir)
    steps = max_steps_reached(trainer)
    flag = "--trainer.max_steps" if steps else "--trainer.max_time"
    limit = f"{flag} {trainer.max_steps}" if steps else flag
    where = f"at epoch {trainer.current_epoch}, step {trainer.global_step}, before the run's {trainer.max_epochs} epochs"
    start = (
        f"from {last}{saved_at(last, trainer.global_step)}"
        if last is not None
        else "from the start (no epoch finished)"
    )
    return (
        f"fit: {limit} stopped training {where}, so the run is not finished: not tested, no results.json. "
        f"To continue {start}, rerun the same command with a larger {flag} or without it "
        "(Lightning counts it over the whole run, resumes included)."
    )


def scratch_run_dir(run_dir: Path) -> Path:
    """The scratch folder of a debug pass of ``run_dir``: one per run folder, under the system's
    temporary directory, named by a hash of its absolute path (so every rank of a node agrees)."""
    digest = hashlib.sha256(str(run_dir.absolute()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"{SCRATCH_PREFIX}{digest}"


def debug_run_dir(config: Namespace, run_dir: Path, rank: int) -> Path:
    """The folder a command writes to: ``run_dir``, or a fresh scratch folder for ``fast_dev_run``.

    With ``fast_dev_run`` the config's ``run_dir``, ``trainer.default_root_dir`` and
    ``checkpoint.dirpath`` are pointed at the scratch folder (rank 0 empties it first), so the
    pass runs every step of the command, checkpoint, ``results.json`` and ``run.json`` included,
    and the run folder is not touched. Call it after the checkpoint an evaluation reads has been
    found in the run folder.

    Raises:
        ValueError: ``trainer.barebones`` is set.
    """
    if config.trainer.get("barebones"):
        raise ValueError(
            "--trainer.barebones true turns off what a pyra-lightning run is made of (loggers, "
            "checkpoints, self.log, so resume and results.json); for the raw speed of a training "
            "step run `pyra-lightning benchmark --train`"
        )
    if not config.trainer.get("fast_dev_run"):
        return run_dir
    scratch = scratch_run_dir(run_dir)
    if rank == 0:
        shutil.rmtree(scratch, ignore_errors=True)
    config.run_dir = config.trainer.default_root_dir = str(scratch)
    if config.get("checkpoint") is not None:
        config.checkpoint.dirpath = str(scratch / "checkpoints")
    rank_zero_info(
        f"fast_dev_run: a debug pass, written to the scratch folder {scratch} (emptied first); "
        f"{run_dir} is left as it is"
    )
    return scratch
