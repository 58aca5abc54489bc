"""One writer per run folder: a second command refuses at once, naming the holder; kill -9 frees it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import quickstart_args

from pyra_lightning.data import generate_demo
from pyra_lightning.training.lock import HOLDER_FILE, RunFolderBusy, RunLock, hold, release_all


def test_a_second_lock_on_a_folder_is_refused_naming_the_holder(tmp_path: Path) -> None:
    first = RunLock(tmp_path / "run", "pyra-lightning fit --config a.yaml").acquire()
    holder = json.loads((tmp_path / "run" / HOLDER_FILE).read_text())
    assert holder["pid"] == os.getpid() and holder["command"] == "pyra-lightning fit --config a.yaml"
    with pytest.raises(RunFolderBusy, match=rf"in use by another command: pid {os.getpid()} on .*a\.yaml"):
        RunLock(tmp_path / "run").acquire()
    first.release()
    assert not (tmp_path / "run" / HOLDER_FILE).exists()
    RunLock(tmp_path / "run").acquire().release()  # free again


def test_a_command_holding_its_folder_may_take_it_again(tmp_path: Path) -> None:
    lock = hold(tmp_path)
    assert hold(tmp_path) is lock, "fit's own test after training does not lock itself out"
    release_all()
    assert not lock.held


HOLD_SCRIPT = """
import sys, time
from pyra_lightning.training.lock import RunLock
lock = RunLock(sys.argv[1], "holder").acquire()  # kept: a collected FileLock unlocks
print("held", flush=True)
time.sleep(600)
"""


def test_the_lock_is_released_when_its_holder_is_killed(tmp_path: Path) -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_SCRIPT, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "held"
    with pytest.raises(RunFolderBusy, match=f"pid {process.pid} on .*: holder"):
        RunLock(tmp_path).acquire()
    process.send_signal(signal.SIGKILL)
    process.wait()
    RunLock(tmp_path).acquire().release()  # the OS freed it: no stale lock blocks the rerun


@pytest.mark.slow
def test_two_fits_in_one_folder_the_second_refuses_at_once(tmp_path: Path) -> None:
    data, root = tmp_path / "data", tmp_path / "run"
    generate_demo(data)
    args = [
        "fit",
        *quickstart_args(
            root, data, "--trainer.max_epochs=50", "--trainer.limit_train_batches=2", "--test_after_fit=false"
        ),
    ]
    command = [sys.executable, "-m", "pyra_lightning", *args]
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (root / "checkpoints" / "last.ckpt").exists() and time.time() < deadline:
            time.sleep(0.1)  # well into training: metrics.csv and last.ckpt are being written
        assert first.poll() is None
        second = subprocess.run(command, capture_output=True, text=True, timeout=240)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"is in use by another command: pid {first.pid} on " in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert json.loads((root / "run.json").read_text())["status"] == "running"


@pytest.mark.parametrize(
    ("env", "rank"),
    [
        ({}, 0),
        ({"LOCAL_RANK": "1"}, 1),  # Lightning's own launcher, second process
        ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, 1),  # a manual multi-node launch: not rank 0
        ({"RANK": "3", "NODE_RANK": "1", "LOCAL_RANK": "1"}, 3),  # torchrun says it outright
        ({"SLURM_PROCID": "2", "LOCAL_RANK": "0"}, 2),  # srun
    ],
)
def test_the_launch_rank_knows_a_second_node(
    env: dict[str, str], rank: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only global rank 0 takes the run folder's lock; a node-1 process with LOCAL_RANK 0 and no
    RANK (Lightning's manual multi-node launch) must not think it is rank 0."""
    from pyra_lightning.training.lock import launch_rank

    for name in (
        "RANK",
        "LOCAL_RANK",
        "NODE_RANK",
        "GROUP_RANK",
        "SLURM_PROCID",
        "JSM_NAMESPACE_RANK",
        "LOCAL_WORLD_SIZE",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launch_rank() == rank
