"""Weights & Biases, offline: metrics, the resolved config and merge images reach the local run files.

wandb 0.31 writes an offline run into one ``run-<id>.wandb`` file (``wandb-summary.json`` and
``config.yaml`` only appear on ``wandb sync``), so the test reads that file: a LevelDB-style log
of 32 KiB blocks whose records are ``wandb_internal_pb2.Record`` protobufs.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

wandb = pytest.importorskip("wandb", reason="wandb is not installed; the W&B logger config needs it")

from helpers import CONFIGS, quickstart_args  # noqa: E402

from pyra_lightning.training.cli import PyraCLI, build_cli  # noqa: E402
from pyra_lightning.training.monitoring import WANDB_ID_FILE, finish_wandb  # noqa: E402

WANDB_PIECE = CONFIGS / "logger" / "wandb.yaml"
BLOCK = 32 * 1024
HEADER = struct.Struct("<IHB")  # crc32c, payload length, chunk type (1 full, 2 first, 3 middle, 4 last)


def read_records(path: Path) -> Iterator[Any]:
    """The protobuf records of a ``.wandb`` run file."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    position, chunks = 7, []
    while position + HEADER.size <= len(data):
        if BLOCK - position % BLOCK < HEADER.size:  # block trailer: zero padding
            position += BLOCK - position % BLOCK
            continue
        _, length, kind = HEADER.unpack_from(data, position)
        position += HEADER.size
        if kind == 0:
            continue
        chunks.append(data[position : position + length])
        position += length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            chunks = []
            yield record


def wait_for_exit(path: Path, timeout: float = 60.0) -> Path:
    """Wait until wandb's writer has flushed the run's final ``exit`` record (it writes asynchronously)."""
    deadline = time.monotonic() + timeout
    while not any(r.WhichOneof("record_type") == "exit" for r in read_records(path)):
        assert time.monotonic() < deadline, f"{path} has no exit record after {timeout} s"
        time.sleep(0.5)
    return path


def run_contents(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(summary, config) of an offline run, as the W&B UI would show them."""
    summary: dict[str, Any] = {}
    config: dict[str, Any] = {}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        items = {"summary": record.summary.update, "history": record.history.item}.get(kind, [])
        if kind == "config":
            items = record.config.update
        for item in items:
            key = item.key or "/".join(item.nested_key)
            (config if kind == "config" else summary)[key] = json.loads(item.value_json)
    return summary, config


def run_cli(args: list[str]) -> PyraCLI:
    return build_cli(args)


def media(run_file: Path) -> list[Path]:
    return sorted((run_file.parent / "files" / "media" / "images" / "val").glob("merging_*.png"))


@pytest.mark.slow
def test_offline_run_records_metrics_config_and_merge_images(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # leave pytest's output capture alone
    base = quickstart_args(tmp_path / "runs", tmp_path / "data", f"--config={WANDB_PIECE}")
    args = [
        "fit",
        *base,
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=4",
        "--trainer.limit_val_batches=2",
        "--trainer.log_every_n_steps=1",
        "--train_throughput.window_size=2",
        "--merge_vis.every_n_epochs=1",
    ]
    try:
        cli = run_cli(args)
        assert [type(logger).__name__ for logger in cli.trainer.loggers] == ["WandbLogger", "RunCSVLogger"]
        assert (tmp_path / "runs" / "metrics.csv").is_file(), "the run folder keeps its own log beside W&B"
        finish_wandb(cli.trainer)
        assert wandb.run is None
        # Validating the run's checkpoint continues the run folder's W&B run (its id), after the
        # first was finished: a W&B run left open would take the second run's steps as its own.
        finish_wandb(run_cli(["validate", *base, "--trainer.limit_val_batches=1"]).trainer)
    finally:
        wandb.finish()
    run_id = (tmp_path / "runs" / WANDB_ID_FILE).read_text().strip()
    offline = list((tmp_path / "runs" / "wandb").glob("offline-run-*"))
    assert offline and {path.name.rsplit("-", 1)[-1] for path in offline} == {run_id}, (
        "one W&B run per run folder"
    )

    run_file = next(f for f in (tmp_path / "runs" / "wandb").glob("offline-run-*/run-*.wandb") if media(f))
    summary, config = run_contents(wait_for_exit(run_file))
    for key in ("val/acc", "test/acc", "test/throughput", "test/speedup", "train/samples_per_sec"):
        assert isinstance(summary.get(key), float), key
    assert 0.0 <= summary["test/acc"] <= 1.0 and summary["test/throughput"] > 0
    assert config["merging"]["merge_r"] == [16, 12, 8, 6, 4, 2]  # the module's hyperparameters
    assert config["lora"]["rank"] == 16 and config["optim"]["lr"] == 0.003  # grouped as in the YAML
    cli_config = config["cli"]  # the whole resolved CLI config
    assert cli_config["model"]["merging"]["merge_r"] == [16, 12, 8, 6, 4, 2]
    assert cli_config["trainer"]["max_epochs"] == 2 and cli_config["seed_everything"] == 0
    assert cli_config["trainer"]["logger"][0]["init_args"]["project"] == "pyra-lightning"

    assert len(media(run_file)) == 2 * 4, "4 images after each of the 2 epochs"
    assert summary["val/merging/count"] == 4 and summary["val/merging/_type"] == "images/separated"

    # No credentials anywhere: not in the config we ship, not in what the run wrote.
    run_text = "\n".join(p.read_text(errors="ignore") for p in run_file.parent.rglob("*") if p.is_file())
    assert "key" not in json.dumps(yaml.safe_load(WANDB_PIECE.read_text())).lower()
    assert "api_key" not in run_text.lower()


def test_wandb_piece_composes_with_every_trainer_config(tmp_path: Path) -> None:
    ids = set()
    for base in (CONFIGS / "quickstart.yaml", CONFIGS / "trainer" / "paper.yaml"):
        root = tmp_path / base.stem
        cli = build_cli(
            [
                f"--config={base}",
                f"--config={WANDB_PIECE}",
                "--model.pretrained=false",
                f"--run_dir={root}",
            ],
            run=False,
        )
        logger = cli.trainer.logger
        assert type(logger).__name__ == "WandbLogger" and logger.name == "pyra-lightning"
        # The config fixes no id; the CLI gives each run folder its own, kept for reruns.
        assert "id" not in yaml.safe_load(WANDB_PIECE.read_text())["trainer"]["logger"]["init_args"]
        assert logger.version == (root / WANDB_ID_FILE).read_text().strip()
        assert logger.save_dir == str(root), "W&B files go to the run folder"
        assert cli.config.trainer.logger[0].init_args.log_model is False
        ids.add(logger.version)
    assert len(ids) == 2, "two run folders, two W&B runs (the issue: fresh runs shared one id)"
