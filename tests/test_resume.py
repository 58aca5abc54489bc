"""A fit interrupted after a finished epoch (kill -9, SIGTERM, Ctrl-C) resumes where it stopped.

These tests take the path a preempted cluster job takes: a real ``pyra-lightning fit`` process,
no ``max_steps`` and no per-step checkpointing, stopped from outside once an epoch has finished,
then the same command run again.
"""

from __future__ import annotations

import csv
import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import resumable_fit
from lightning.pytorch import Callback

from pyra_lightning.__main__ import main
from pyra_lightning.data import generate_demo

EPOCHS = 4


def fit_args(root: Path, data: Path, *extra: str) -> list[str]:
    return resumable_fit(root, data, EPOCHS, *extra)


def epoch_of(last: Path) -> int | None:
    """The epoch a ``last.ckpt`` was written after, or None while there is none."""
    if not last.is_file():
        return None
    return int(torch.load(last, map_location="cpu", weights_only=True)["epoch"])


def stop_after_epoch(command: list[str], last: Path, epoch: int, sig: signal.Signals) -> tuple[int, str]:
    """Start ``command``, send ``sig`` once ``last.ckpt`` holds ``epoch``; its exit code and stderr."""
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        if last.is_file() and epoch_of(last) == epoch:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the fit ended before it could be stopped"
    process.send_signal(sig)
    _, err = process.communicate(timeout=120)
    return process.returncode, err


def run_status(root: Path) -> dict:
    return json.loads((root / "run.json").read_text())


@pytest.mark.slow
def test_a_fit_stopped_after_finished_epochs_resumes_bit_identically(tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate_demo(data)
    every_step = "--trainer.log_every_n_steps=1"  # rows inside an epoch too, stopped with it
    main(fit_args(tmp_path / "straight", data, every_step))

    root = tmp_path / "stopped"
    last = root / "checkpoints" / "last.ckpt"
    command = [sys.executable, "-m", "pyra_lightning", *fit_args(root, data, every_step)]

    code, _ = stop_after_epoch(command, last, 0, signal.SIGKILL)  # a node lost, no warning
    assert code == -signal.SIGKILL
    assert epoch_of(last) in (0, 1), "the checkpoint of a finished epoch was on disk"

    code, err = stop_after_epoch(command, last, 1, signal.SIGTERM)  # a scheduler's preemption
    lines = [line for line in err.splitlines() if line.startswith("interrupted at epoch")]
    assert code == 128 + signal.SIGTERM, err[-2000:]
    assert "auto_resume: continuing from" in err
    assert (
        len(lines) == 1
        and f"rerun the same command to resume from {last} (saved at epoch 1, step 8" in lines[0]
    )
    stopped_at = int(lines[0].split(", step ")[1].split(";")[0])
    if stopped_at > 8:  # stopped inside epoch 2: says what the rerun repeats
        assert lines[0].endswith(f": the {stopped_at - 8} steps after it run again)"), lines[0]
    assert run_status(root)["status"] == "interrupted"

    code, err = stop_after_epoch(command, last, 2, signal.SIGINT)  # Ctrl-C
    assert code == 128 + signal.SIGINT, err[-2000:]
    assert any(line.startswith("interrupted at epoch") for line in err.splitlines())
    assert run_status(root)["status"] == "interrupted"

    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert run_status(root)["status"] == "finished"

    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(last, weights_only=True)
    assert a["global_step"] == b["global_step"] == 4 * EPOCHS
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert logged(tmp_path / "straight") == logged(root), "metrics.csv: each step once, as if never stopped"


def logged(root: Path) -> list[tuple[str, ...]]:
    """The rows of a run's ``metrics.csv``: epoch, step, loss and accuracy (not the timings)."""
    with (root / "metrics.csv").open(newline="") as handle:
        keys = ("epoch", "step", "train/loss", "val/acc")
        return [tuple(row.get(key, "") for key in keys) for row in csv.DictReader(handle)]


def test_a_resumed_fit_forgets_the_rows_logged_after_its_checkpoint(tmp_path: Path) -> None:
    from pyra_lightning.training.runs import RunCSVLogger

    logger = RunCSVLogger(save_dir=tmp_path, name="", version="")
    path = Path(logger.log_dir) / "metrics.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["epoch,step,train/loss,val/acc", "0,9,1.4,", "0,31,,0.25", "0,31,1.3,", "1,39,1.2,", "1,49,1.1,"]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    assert logger.forget_from_step(32) == 2  # the checkpoint holds global_step 32 (epoch 0 done)
    assert path.read_bytes() == ("\r\n".join(lines[:4]) + "\r\n").encode(), "Lightning's CSV dialect"
    assert logger.forget_from_step(32) == 0 and logger.forget_from_step(100) == 0


class WatchLastCheckpoint(Callback):
    """Notes, at the start of every epoch, which epoch the run's ``last.ckpt`` holds, and its keys."""

    seen: list[int | None] = []
    keys: list[set[str]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # type: ignore[no-untyped-def]
        last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        self.seen.append(epoch_of(last))
        if last.is_file():
            self.keys.append(set(torch.load(last, map_location="cpu", weights_only=True)))


def test_last_ckpt_is_written_after_every_epoch_whatever_top_k_says(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    WatchLastCheckpoint.seen.clear()
    WatchLastCheckpoint.keys.clear()
    args = fit_args(tmp_path / "run", tmp_path / "data", "--trainer.max_epochs=3")
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        main([*args, "--checkpoint.save_top_k=0", "--trainer.callbacks+=test_resume.WatchLastCheckpoint"])
    assert WatchLastCheckpoint.seen == [None, 0, 1], "each epoch starts with the previous one saved"
    assert all("optimizer_states" in keys for keys in WatchLastCheckpoint.keys), "resumable"
    final = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 3 * 4
    assert "`weights_only` was not set" not in caplog.text, "each save says what it saves"


def test_save_weights_only_holds_for_the_last_ckpt_written_after_each_epoch(tmp_path: Path) -> None:
    WatchLastCheckpoint.seen.clear()
    WatchLastCheckpoint.keys.clear()
    args = fit_args(tmp_path / "run", tmp_path / "data", "--trainer.max_epochs=2")
    watch = "--trainer.callbacks+=test_resume.WatchLastCheckpoint"
    main([*args, "--checkpoint.save_top_k=0", "--checkpoint.save_weights_only=true", watch])
    assert WatchLastCheckpoint.seen == [None, 0]
    (after_epoch_0,) = WatchLastCheckpoint.keys
    assert "state_dict" in after_epoch_0 and "optimizer_states" not in after_epoch_0, sorted(after_epoch_0)


def test_a_start_that_failed_before_its_first_checkpoint_does_not_block_a_changed_rerun(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    task = generate_demo(data)
    image = task / "images" / "train" / "00003.png"
    moved = image.with_suffix(".moved")
    image.rename(moved)  # a missing image: the fit fails while loading its data
    root = tmp_path / "run"
    args = fit_args(root, data, "--trainer.max_epochs=1")
    with pytest.raises(SystemExit):
        main(args)
    assert "00003.png does not exist" in capsys.readouterr().err
    record = run_status(root)
    assert record["status"] == "failed" and record["error"], record
    assert not (root / "checkpoints" / "last.ckpt").exists()

    moved.rename(image)
    main([*args, "--data.batch_size=16"])  # fixed, and with another setting: takes the folder
    record = run_status(root)
    assert record["status"] == "finished"
    assert record["settings"]["data.batch_size"] == 16


def test_a_missing_test_image_fails_the_fit_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """fit tests after training: a test image that is not there is found at the start, not after
    the last epoch, and the run is marked failed."""
    data = tmp_path / "data"
    task = generate_demo(data)
    line = 6
    image = task / (task / "test.txt").read_text().splitlines()[line - 1].split()[0]
    image.unlink()
    root = tmp_path / "run"
    with pytest.raises(SystemExit):
        main(fit_args(root, data, "--trainer.max_epochs=1"))
    err = capsys.readouterr().err
    assert f"test.txt, line {line}: image {image} does not exist" in err, err[-2000:]
    assert run_status(root)["status"] == "failed"
    assert not (root / "checkpoints" / "last.ckpt").exists(), "nothing was trained"


def test_a_failure_in_the_test_after_training_marks_the_run_failed() -> None:
    """The test ``fit`` runs after training is part of the fit: an error there leaves run.json
    "failed", not "running"; a ``test`` command's own errors are not the fit's."""
    from types import SimpleNamespace

    from pyra_lightning.training.checkpointing import RunStatus

    marks: list[tuple[str, str | None]] = []
    status = RunStatus(lambda trainer, module, state, error: marks.append((state, error)), Path("unused"))
    testing = SimpleNamespace(state=SimpleNamespace(fn="test"))
    status.on_exception(testing, None, ValueError("a broken test image"))  # type: ignore[arg-type]
    assert marks == []
    status.on_fit_end(testing, None)  # type: ignore[arg-type]
    status.on_exception(testing, None, ValueError("a broken test image"))  # type: ignore[arg-type]
    assert marks == [("failed", "ValueError: a broken test image")]


def test_an_interrupt_in_the_test_after_training_says_the_rerun_only_tests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C in the test ``fit`` runs after its last epoch: training is done, and the message says
    the rerun restores ``last.ckpt`` and tests, not that it resumes training."""
    from types import SimpleNamespace

    from pyra_lightning.training.checkpointing import RunStatus

    last = tmp_path / "last.ckpt"
    last.write_bytes(b"")
    marks: list[str] = []
    status = RunStatus(lambda trainer, module, state, error: marks.append(state), tmp_path)
    testing = SimpleNamespace(state=SimpleNamespace(fn="test"), current_epoch=4, global_step=16)
    status.on_fit_end(testing, None)  # type: ignore[arg-type]
    status.on_exception(testing, None, KeyboardInterrupt())  # type: ignore[arg-type]
    assert marks == ["interrupted"]
    assert capsys.readouterr().err.strip() == (
        "interrupted in the test after training (at epoch 4, step 16); rerun the same command to "
        f"test again: it restores {last} and does not train"
    )
