"""Callbacks: evaluate the deployed (LoRA-folded) model, measure its speed, write ``results.json``."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from pyra_lightning.accounting import count_flops
from pyra_lightning.files import atomic_write_text
from pyra_lightning.patch import apply_merging, merge_schedule
from pyra_lightning.timing import images_per_second, time_forwards


class LoRAFolding(pl.Callback):
    """Test and predict with LoRA folded into the weights, as the model would be deployed.

    Folding happens on a copy (``PyraClassifier.folded_copy``), never on the training model, so
    training that continues after a test (or a test in the middle of ``fit``) is unaffected.
    """

    def _fold(self, pl_module: pl.LightningModule) -> None:
        pl_module.inference_model = pl_module.folded_copy()

    def _unfold(self, pl_module: pl.LightningModule) -> None:
        pl_module.inference_model = None

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fold(pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unfold(pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fold(pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._unfold(pl_module)


class InferenceThroughput(pl.Callback):
    """After testing, measure the folded model's images/s with and without merging.

    Logs ``test/throughput``, ``test/throughput_unmerged``, ``test/speedup``, ``test/gflops`` and
    ``test/gflops_unmerged`` to every logger. Timing is ``pyra_lightning.timing``'s protocol, the
    benchmark's: the model alone on the module's device (CUDA-synchronised), a warm-up, then the
    median of ``runs`` timed batches, merged and unmerged interleaved.

    Args:
        batch_size: Images per timed forward.
        precision: ``"32"``, ``"bf16"`` or ``"16"`` (autocast) for the timing.
        warmup: Untimed forwards first.
        runs: Timed forwards; the median is reported.
        enabled: Switch the measurement off (e.g. for quick debugging runs).
    """

    def __init__(
        self,
        batch_size: int = 64,
        precision: Literal["32", "bf16", "16"] = "32",
        warmup: int = 3,
        runs: int = 10,
        enabled: bool = True,
    ) -> None:
        self.batch_size = batch_size
        self.precision = precision
        self.warmup = warmup
        self.runs = runs
        self.enabled = enabled
        self.results: dict[str, float] = {}

    def measure(self, pl_module: pl.LightningModule) -> dict[str, float]:
        model = (
            pl_module.inference_model if pl_module.inference_model is not None else pl_module.folded_copy()
        )
        unmerged = apply_merging(copy.deepcopy(model), 0, pyra=False) if any(merge_schedule(model)) else model
        img_size = pl_module.hparams.img_size
        # Round-robin timing: the speedup compares forwards taken side by side, not minutes apart.
        times = time_forwards(
            {"merged": model, "unmerged": unmerged},
            batch_size=self.batch_size,
            img_size=img_size,
            device=pl_module.device,
            precision=self.precision,
            warmup=self.warmup,
            runs=self.runs,
        )
        merged_ips = images_per_second(self.batch_size, times["merged"])
        unmerged_ips = images_per_second(self.batch_size, times["unmerged"])
        return {
            "test/throughput": merged_ips,
            "test/throughput_unmerged": unmerged_ips,
            "test/speedup": merged_ips / unmerged_ips,
            "test/gflops": count_flops(model, img_size) / 1e9,
            "test/gflops_unmerged": count_flops(unmerged, img_size) / 1e9,
        }

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        if trainer.is_global_zero:
            self.results = self.measure(pl_module)
            rank_zero_info(
                "throughput: {:.1f} img/s merged, {:.1f} img/s unmerged ({:.2f}x), {:.3f} GFLOPs".format(
                    self.results["test/throughput"],
                    self.results["test/throughput_unmerged"],
                    self.results["test/speedup"],
                    self.results["test/gflops"],
                )
            )
            for key, value in self.results.items():
                pl_module.log(key, value, rank_zero_only=True)


def results_dir(trainer: pl.Trainer) -> Path:
    """The run's own folder: the logger's ``log_dir``, or ``save_dir/name/version`` for loggers
    such as W&B whose ``trainer.log_dir`` is a folder shared by all runs."""
    logger = trainer.logger
    if logger is not None and getattr(logger, "log_dir", None) is None and logger.save_dir is not None:
        return Path(logger.save_dir) / str(logger.name) / str(logger.version)
    return Path(trainer.log_dir or trainer.default_root_dir)


class ResultsJSON(pl.Callback):
    """Write ``results.json`` into the run's log directory after testing.

    Fields: ``task``, ``group``, ``protocol``, ``method``, ``test_acc`` and ``test_acc_best``
    (fractions), ``throughput``, ``throughput_unmerged`` (images/s), ``speedup``, ``gflops``,
    ``gflops_unmerged``, ``params`` (trainable counts by group, total, ``trainable_pct``),
    ``config`` (the key hyperparameters) and ``benchmark`` (how throughput was measured).
    ``pyra-lightning report`` reads these files.

    Args:
        filename: Name of the file inside ``trainer.log_dir`` (or ``default_root_dir``).
    """

    def __init__(self, filename: str = "results.json") -> None:
        self.filename = filename
        self.path: Path | None = None

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        log_dir = results_dir(trainer)  # may broadcast under DDP: every rank must call it
        if not trainer.is_global_zero:
            return
        metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items() if isinstance(v, torch.Tensor | float)
        }
        datamodule = trainer.datamodule
        hp = pl_module.hparams
        throughput = next((cb for cb in trainer.callbacks if isinstance(cb, InferenceThroughput)), None)
        results: dict[str, Any] = {
            "task": getattr(datamodule, "task", None),
            "group": getattr(datamodule, "group", None),
            "protocol": getattr(datamodule, "protocol", None),
            "method": pl_module.method,
            "test_acc": metrics.get("test/acc"),
            "test_acc_best": metrics.get("test/acc_best"),
            "throughput": metrics.get("test/throughput"),
            "throughput_unmerged": metrics.get("test/throughput_unmerged"),
            "speedup": metrics.get("test/speedup"),
            "gflops": metrics.get("test/gflops"),
            "gflops_unmerged": metrics.get("test/gflops_unmerged"),
            "params": pl_module.parameter_count().as_dict(),
            "config": {
                "model_name": hp.model_name,
                "merge_r": merge_schedule(pl_module.model),
                "lora_rank": hp.lora_rank,
                "pyra": hp.pyra,
                "prop_attn": hp.prop_attn,
                "img_size": hp.img_size,
                "max_epochs": trainer.max_epochs,
                "seed": int(os.environ.get("PL_GLOBAL_SEED", "-1")),
                "precision": str(trainer.precision),
            },
            "benchmark": {
                "batch_size": throughput.batch_size if throughput else None,
                "precision": throughput.precision if throughput else None,
                "device": str(pl_module.device),
            },
        }
        self.path = log_dir / self.filename
        atomic_write_text(self.path, json.dumps(results, indent=2) + "\n")
        rank_zero_info(f"results written to {self.path}")
