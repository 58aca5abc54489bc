"""Scale-out settings on CPU: 2-process DDP (gloo) through the CLI, and the precision options.

``16-mixed`` (fp16 autocast with a gradient scaler) is GPU-only: on CPU Lightning falls back to
``bf16-mixed`` with a warning, which the last test pins down.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers import CONFIGS, quickstart_args

from pyra_lightning.data import generate_demo
from pyra_lightning.training.cli import build_cli, main


def ddp_fit(runs: Path, data: Path, *extra: str) -> str:
    """A quickstart fit in two gloo processes on the CPU, as a user starts one; its output."""
    command = [sys.executable, "-m", "pyra_lightning.training.cli", "fit", *quickstart_args(runs, data)]
    command += ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    return output


@pytest.mark.slow
def test_two_process_ddp_fit_and_test_on_cpu(tmp_path: Path) -> None:
    data, runs = tmp_path / "data", tmp_path / "ddp"
    # an odd test split: Lightning's DistributedSampler would count one image twice
    split = generate_demo(data) / "test.txt"
    split.write_text("".join(split.read_text().splitlines(keepends=True)[:399]))
    output = ddp_fit(
        runs,
        data,
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=4",
        "--trainer.limit_val_batches=2",
        "--trainer.log_every_n_steps=1",
        "--train_throughput.window_size=2",
    )
    assert "distributed_backend=gloo" in output and "GLOBAL_RANK: 1" in output
    assert "unused parameters" not in output.lower() and "find_unused_parameters" not in output

    (results_file,) = sorted(runs.rglob("results.json"))  # rank 0 only
    (last,) = sorted(runs.rglob("last.ckpt"))
    ddp_results = json.loads(results_file.read_text())

    # Throughput: rank 0's rate times the world size.
    with open(results_file.parent / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/samples_per_sec")]
    assert rows and all(
        float(r["train/samples_per_sec"]) == pytest.approx(2 * float(r["train/device/samples_per_sec"]))
        for r in rows
    )

    # test/acc is synced over both halves of the test split: one process on the whole split agrees.
    single = tmp_path / "single"
    main(["test", *quickstart_args(single, data), f"--ckpt_path={last}"])
    single_results = json.loads(next(single.rglob("results.json")).read_text())
    assert ddp_results["test_acc"] == pytest.approx(single_results["test_acc"], abs=1e-6)
    assert abs(single_results["test_acc"] * 399 - round(single_results["test_acc"] * 399)) < 1e-3, (
        "399 images, each counted once"
    )
    assert ddp_results["config"]["merge_r"] == [16, 12, 8, 6, 4, 2]


@pytest.mark.slow
def test_two_process_ddp_elastic_fit_trains_every_rank_and_writes_the_curve(tmp_path: Path) -> None:
    """Elastic merging under DDP: each rank runs the same seeded schedules per step (the sandwich's
    fastest and one drawn), so every parameter gets a gradient on every rank and DDP needs no
    find_unused_parameters; test writes the accuracy curve once, from rank 0."""
    runs = tmp_path / "ddp"
    output = ddp_fit(
        runs,
        tmp_path / "data",
        f"--config={CONFIGS / 'method/pyra_elastic.yaml'}",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=2",
        "--throughput.enabled=false",
        "--train_throughput.enabled=false",
    )
    assert "GLOBAL_RANK: 1" in output and "find_unused_parameters" not in output
    (results_file,) = sorted(runs.rglob("results.json"))
    result = json.loads(results_file.read_text())
    assert result["method"] == "pyra_elastic" and len(result["curve"]) >= 3
    assert all(0.0 <= point["test_acc"] <= 1.0 for point in result["curve"])


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_precision_options_train_and_test(tmp_path: Path, precision: str) -> None:
    cli = build_cli(
        quickstart_args(
            tmp_path / "runs",
            tmp_path / "data",
            f"--trainer.precision={precision}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=2",
            "--merge_vis.enabled=false",  # it runs a deepcopy (with the hook below) outside autocast
        ),
        run=False,
    )
    dtypes: set[torch.dtype] = set()
    qkv = cli.model.model.blocks[0].attn.qkv

    def record(module: torch.nn.Module, args: object, out: torch.Tensor) -> None:
        # Deep copies carry the hook (FLOPs counting on the meta device): record real forwards
        # only, and return None so that the output is never replaced.
        if not out.is_meta:
            dtypes.add(out.dtype)

    handle = qkv.register_forward_hook(record)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    handle.remove()
    assert dtypes == {torch.bfloat16 if precision == "bf16-mixed" else torch.float32}
    assert all(p.dtype == torch.float32 for p in cli.model.parameters()), "weights stay fp32"
    (metrics,) = cli.trainer.test(cli.model, datamodule=cli.datamodule)
    assert 0.0 <= metrics["test/acc"] <= 1.0 and torch.isfinite(torch.tensor(metrics["test/loss"]))


def test_fp16_mixed_precision_falls_back_to_bf16_on_cpu() -> None:
    with pytest.warns(UserWarning, match="not supported on CPU"):
        trainer = pl.Trainer(accelerator="cpu", precision="16-mixed", logger=False)
    assert trainer.precision == "bf16-mixed"
