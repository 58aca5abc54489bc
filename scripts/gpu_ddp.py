"""The ``ddp_fit`` part of scripts/gpu_check.py: ``pyra-lightning fit`` in two DDP processes on one GPU.

A user's multi-GPU fit is Lightning's DDP through the CLI, so that is what this runs: the
quickstart, one epoch, bf16-mixed, two processes started as a cluster starts them (``LOCAL_RANK``
set, so Lightning launches nothing itself: ``--trainer.num_nodes 2 --trainer.devices 1``, node
ranks 0 and 1), both on ``cuda:0`` through gloo (NCCL refuses two ranks on one GPU). It checks
that both ranks train to the end (rank 1 doing none of rank 0's run-folder work: it would be
refused the folder's lock), that Lightning's throughput counts both ranks
(``train/samples_per_sec`` = world size x ``train/device/samples_per_sec``), and that the run
folder holds one ``results.json``.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from lightning.fabric.plugins.environments.lightning import find_free_network_port

REPO = Path(__file__).resolve().parents[1]


def fit_command(args: Any, precision: str, folder: Path) -> list[str]:
    """``pyra-lightning fit`` of the quickstart for one epoch in ``precision``, its run in ``folder``."""
    command = [
        sys.executable,
        "-m",
        "pyra_lightning",
        "fit",
        f"--config={REPO / 'configs' / 'quickstart.yaml'}",
        f"--data.root={Path(args.out).resolve() / 'data'}",
        f"--run_dir={folder / 'runs'}",
        f"--trainer.accelerator={'cuda' if args.device.startswith('cuda') else 'cpu'}",
        "--trainer.devices=1",
        f"--trainer.precision={precision}",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
    ]
    # The quickstart's --throughput.clock auto takes the wall clock on a GPU: no override, the user's path.
    if args.dry_run:
        command += [
            "--trainer.limit_train_batches=4",
            "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=1",
            "--throughput.runs=1",
            "--throughput.warmup=0",
        ]
    return command


def part_ddp_fit(args: Any) -> dict[str, Any]:
    """Two ranks of one fit, each its own process on the same device; the checks above."""
    folder = Path(args.out).resolve() / "ddp_fit"
    shutil.rmtree(folder / "runs", ignore_errors=True)  # a finished run there would make fit a no-op
    folder.mkdir(parents=True, exist_ok=True)
    command = fit_command(args, "bf16-mixed", folder) + [
        "--trainer.num_nodes=2",
        "--trainer.strategy=DDPStrategy",
        "--trainer.strategy.process_group_backend=gloo",
        "--trainer.log_every_n_steps=1",
        "--train_throughput.window_size=2",
    ]
    port = find_free_network_port()
    ranks = []
    for rank in range(2):
        env = {
            **os.environ,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": "2",
            "NODE_RANK": str(rank),
            "LOCAL_RANK": "0",  # both on cuda:0; no RANK, as Lightning's manual multi-node launch
            "OMP_NUM_THREADS": "1",
        }
        log = open(folder / f"rank{rank}.log", "w")  # noqa: SIM115 (closed below, after the wait)
        ranks.append(
            (subprocess.Popen(command, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT), log)
        )
    while any(p.poll() is None for p, _ in ranks):  # a rank that dies stops the other (not a hang)
        if any(p.poll() not in (None, 0) for p, _ in ranks):
            for p, _ in ranks:
                if p.poll() is None:
                    p.kill()
        time.sleep(0.5)
    codes = [p.wait() for p, _ in ranks]
    for _, log in ranks:
        log.close()
    outputs = [(folder / f"rank{rank}.log").read_text() for rank in range(2)]
    for rank, (code, output) in enumerate(zip(codes, outputs, strict=True)):
        if code != 0:
            tail = [line for line in output.strip().splitlines() if line.strip()][-3:]
            raise RuntimeError(f"rank {rank} exited {code}: {tail}")
    for rank, output in enumerate(outputs):
        if f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/2" not in output:
            raise RuntimeError(f"process {rank} did not join the 2-process group as rank {rank}")
    found = sorted((folder / "runs").rglob("results.json"))
    if len(found) != 1:
        raise RuntimeError(f"results.json written {len(found)} times under {folder / 'runs'}: {found}")
    results = json.loads(found[0].read_text())
    with open(found[0].parent / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("train/samples_per_sec")]
    ratios = [float(r["train/samples_per_sec"]) / float(r["train/device/samples_per_sec"]) for r in rows]
    if not ratios or any(abs(ratio - 2.0) > 1e-6 for ratio in ratios):
        # Lightning's Throughput reports rank 0's rate times the world size (DDP's gradient
        # all-reduce keeps ranks in lock-step): what this checks is that the factor is applied.
        raise RuntimeError(f"throughput is not scaled to the 2 ranks: samples_per_sec / device = {ratios}")
    keys = ("test_acc", "throughput", "throughput_unmerged", "speedup", "throughput_engine")
    return {
        "world_size": 2,
        "results_json": str(found[0]),
        "train_samples_per_sec_all_ranks": float(rows[-1]["train/samples_per_sec"]),
        "train_samples_per_sec_per_rank": float(rows[-1]["train/device/samples_per_sec"]),
        **{key: results.get(key) for key in keys},
    }
