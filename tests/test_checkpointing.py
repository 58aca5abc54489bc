"""Small, atomic checkpoints; exact resume; surviving kill -9; automatic resume after requeue."""

from __future__ import annotations

import csv
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import resumable_fit

from pyra_lightning.__main__ import main
from pyra_lightning.data import generate_demo
from pyra_lightning.training.checkpointing import AtomicCheckpointIO, find_resume_checkpoint
from pyra_lightning.training.module import PyraClassifier


def short_run(root: Path, data: Path, *extra: str) -> list[str]:
    return resumable_fit(root, data, 3, *extra)


def last_val_acc(root: Path) -> float:
    rows = [
        r for f in sorted(root.rglob("metrics.csv")) for r in csv.DictReader(f.open()) if r.get("val/acc")
    ]
    return float(rows[-1]["val/acc"])


@pytest.mark.slow
def test_resumed_run_ends_exactly_like_an_uninterrupted_one(tmp_path: Path) -> None:
    data = tmp_path / "data"
    main(short_run(tmp_path / "straight", data))
    main(short_run(tmp_path / "resumed", data, "--trainer.max_steps=4"))  # stops after epoch 1 of 3
    stopped = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=True)
    assert stopped["global_step"] == 4
    main(short_run(tmp_path / "resumed", data))  # no flag: auto_resume finds last.ckpt
    a = torch.load(tmp_path / "straight/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 12
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    assert last_val_acc(tmp_path / "straight") == last_val_acc(tmp_path / "resumed")
    with open(tmp_path / "resumed" / "metrics.csv") as handle:
        epochs = {row["epoch"] for row in csv.DictReader(handle) if row.get("val/acc")}
    assert epochs == {"0", "1", "2"}, "the resumed run continues its metrics.csv in place"


def test_atomic_save_never_leaves_a_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    io_plugin = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io_plugin.save_checkpoint({"step": torch.tensor(1)}, target)
    (tmp_path / ".last.ckpt.stale123.tmp").write_bytes(b"junk from a killed run")

    def broken_save(obj: object, handle: io.BufferedWriter) -> None:
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        io_plugin.save_checkpoint({"step": torch.tensor(2)}, target)
    monkeypatch.undo()
    assert torch.load(target, weights_only=True)["step"] == 1, "the previous checkpoint is intact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"], "no temporary files left"


def test_resume_picks_the_newest_of_last_and_slurm_checkpoints(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    assert find_resume_checkpoint(checkpoints, tmp_path) is None
    checkpoints.mkdir()
    (checkpoints / "last.ckpt").write_bytes(b"a")
    assert find_resume_checkpoint(checkpoints, tmp_path) == checkpoints / "last.ckpt"
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    hpc.write_bytes(b"b")
    os.utime(checkpoints / "last.ckpt", (time.time() - 100, time.time() - 100))
    assert find_resume_checkpoint(checkpoints, tmp_path) == hpc


@pytest.mark.slow
def test_kill_9_at_any_moment_leaves_a_loadable_last_ckpt(tmp_path: Path) -> None:
    data, root = tmp_path / "data", tmp_path / "run"
    generate_demo(data)  # once, so that the killed runs spend their time training
    args = short_run(root, data, "--checkpoint.every_n_train_steps=1", "--trainer.max_epochs=4")
    last = root / "checkpoints" / "last.ckpt"
    command = [sys.executable, "-m", "pyra_lightning", *args]
    for kill_after_writes in (1, 4):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seen, previous = 0, last.stat().st_mtime_ns if last.exists() else None
        deadline = time.time() + 240
        while seen < kill_after_writes and process.poll() is None and time.time() < deadline:
            current = last.stat().st_mtime_ns if last.exists() else None
            if current != previous:
                seen, previous = seen + 1, current
            time.sleep(0.02)
        time.sleep(0.05 * kill_after_writes)  # land somewhere inside the next step or write
        process.send_signal(signal.SIGKILL)
        process.wait()
        checkpoint = torch.load(last, weights_only=True)
        assert checkpoint["global_step"] >= 1
    finished = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert "auto_resume: continuing from" in finished.stderr + finished.stdout
    assert torch.load(last, weights_only=True)["global_step"] == 16


def test_vit_b16_checkpoint_is_at_most_5_mb() -> None:
    module = PyraClassifier(
        model_name="vit_base_patch16_224", num_classes=100, merging={"merge_r": "high"}, lora={"rank": 8}
    )
    optimizer = module.configure_optimizers()["optimizer"]
    for param in module.parameters():
        if param.requires_grad:
            param.grad = torch.randn_like(param)
    optimizer.step()  # creates AdamW's two moment buffers per trainable tensor
    checkpoint = {"state_dict": module.state_dict(), "optimizer_states": [optimizer.state_dict()]}
    module.on_save_checkpoint(checkpoint)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    full = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    assert buffer.tell() <= 5 * 1024 * 1024, f"{buffer.tell() / 2**20:.2f} MiB"
    assert full > 300 * 2**20, "a full state dict would be ~350 MB"


@pytest.mark.slow
def test_a_max_steps_stop_inside_an_epoch_resumes_that_epoch_from_its_start(tmp_path: Path) -> None:
    """Lightning runs the epoch-end hooks at a ``max_steps`` stop too: a checkpoint there recorded
    epoch 1 as done after 2 of its 4 batches, and the rerun skipped the other 2."""
    data = tmp_path / "data"
    main(short_run(tmp_path / "straight", data))
    main(short_run(tmp_path / "resumed", data, "--trainer.max_steps=6"))  # batch 2 of epoch 1's 4
    stopped = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=True)
    assert (stopped["epoch"], stopped["global_step"]) == (0, 4), "the last finished epoch's checkpoint"
    main(short_run(tmp_path / "resumed", data))
    a = torch.load(tmp_path / "straight/checkpoints/last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 12
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
