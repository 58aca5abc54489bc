"""Shared helpers of the command-line tests: the shipped configs and quick quickstart arguments."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
QUICKSTART = CONFIGS / "quickstart.yaml"
# A few training batches and a short timing: the command-line tests are about runs, not the model.
SHORT = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=4",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
]


def quickstart_args(root: Path | None, data: Path, *extra: str) -> list[str]:
    """Arguments of a quickstart command: ``root`` is the run folder (``None``: the default layout).

    The progress bar is off and the throughput measurement short; ``extra`` arguments come last,
    so they win.
    """
    args = [
        f"--config={QUICKSTART}",
        f"--data.root={data}",
        "--trainer.enable_progress_bar=false",
        "--throughput.runs=2",
        "--throughput.warmup=1",
    ]
    if root is not None:
        args.append(f"--run_dir={root}")
    return [*args, *extra]
