"""Callbacks: evaluate the deployed (LoRA-folded) model, measure its speed, write ``results.json``
and ``predictions.csv``, and take the reference implementation's number (``ReferenceProtocol``)."""

from __future__ import annotations

import copy
import csv
import io
import os
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from pyra_lightning.accounting import count_flops
from pyra_lightning.files import atomic_write_text
from pyra_lightning.patch import apply_merging, merge_schedule
from pyra_lightning.results import RESULTS_FILENAME, RunResult
from pyra_lightning.timing import images_per_second, time_forwards
from pyra_lightning.training.runs import fingerprint, run_settings

PREDICTIONS_FILENAME = "predictions.csv"


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


class ReferenceProtocol(pl.Callback):
    """The number the reference implementation reports: max test accuracy over a fixed cadence.

    The reference's ``train.py`` evaluates the test split after epoch ``e`` whenever
    ``e % val_interval == 0`` or ``e`` is the last epoch (0, 10, ..., 90 and 99 for 100 epochs), and
    reports the maximum. Choosing the best of several test evaluations looks at the test split, so
    this is kept apart from our own ``test_acc`` (the final model): it is logged as
    ``test/acc_reference_protocol`` and written to ``results.json`` as
    ``test_acc_reference_protocol``. The training model is evaluated as it is (LoRA unfolded, eval
    mode), as the reference does; each rank evaluates the whole test split.

    Args:
        val_interval: Evaluate after every epoch divisible by this (the reference's
            ``--val_interval``, 10), plus the last epoch.
    """

    def __init__(self, val_interval: int = 10) -> None:
        if val_interval < 1:
            raise ValueError(f"val_interval must be a positive integer, got {val_interval}")
        self.val_interval = val_interval
        self.evaluations: dict[int, float] = {}  # epoch -> test accuracy (fraction)

    @property
    def best(self) -> float | None:
        """The reported number: the maximum over ``evaluations``, ``None`` before the first."""
        return max(self.evaluations.values()) if self.evaluations else None

    def state_dict(self) -> dict[str, Any]:
        return {"val_interval": self.val_interval, "evaluations": dict(self.evaluations)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.evaluations = {int(k): float(v) for k, v in state_dict["evaluations"].items()}

    @torch.no_grad()
    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        """Top-1 accuracy of ``pl_module`` on the data module's test loader."""
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ValueError("ReferenceProtocol needs a LightningDataModule with a test_dataloader()")
        modes = {module: module.training for module in pl_module.modules()}
        pl_module.eval()
        correct, seen = 0, 0
        try:
            for batch in datamodule.test_dataloader():
                batch = pl_module.transfer_batch_to_device(batch, pl_module.device, 0)
                images, labels = datamodule.on_after_batch_transfer(batch, 0)
                with trainer.precision_plugin.forward_context():
                    logits = pl_module(images)  # (B, num_classes)
                correct += int((logits.argmax(dim=-1) == labels).sum())
                seen += labels.numel()
        finally:
            for module, mode in modes.items():
                module.train(mode)
        return correct / max(seen, 1)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch
        if epoch % self.val_interval and epoch != trainer.max_epochs - 1:
            return
        self.evaluations[epoch] = self.evaluate(trainer, pl_module)
        pl_module.log("test/acc_reference_protocol", self.best, rank_zero_only=True)


def results_dir(trainer: pl.Trainer) -> Path:
    """Where a run without a run folder (a plain ``Trainer``) puts its files: the logger's
    ``log_dir``, or ``save_dir/name/version`` for loggers such as W&B whose ``trainer.log_dir``
    is a folder shared by all runs."""
    logger = trainer.logger
    if logger is not None and getattr(logger, "log_dir", None) is None and logger.save_dir is not None:
        return Path(logger.save_dir) / str(logger.name) / str(logger.version)
    return Path(trainer.log_dir or trainer.default_root_dir)


class ResultsJSON(pl.Callback):
    """Write ``results.json`` (a ``pyra_lightning.results.RunResult``) into the run folder after testing.

    Fields: ``task``, ``group``, ``protocol``, ``method``, ``test_acc`` and ``test_acc_best``
    (fractions), ``throughput``, ``throughput_unmerged`` (images/s), ``speedup``, ``gflops``,
    ``gflops_unmerged``, ``params`` (trainable counts by group, total, ``trainable_pct``),
    ``config`` (the key hyperparameters), ``benchmark`` (how throughput was measured), and
    ``test_acc_reference_protocol`` with ``reference_protocol`` (its cadence and the evaluations,
    by epoch, it is the maximum of) when the ``ReferenceProtocol`` callback ran.
    ``pyra-lightning report`` reads these files.
    Besides the metrics it records which run produced them: ``settings`` and ``fingerprint`` (the
    CLI sets ``identity`` to the tested checkpoint's, so a ``test`` of an older checkpoint is
    described by the settings it was trained with) and the ``checkpoint`` tested.
    ``pyra-lightning report`` and ``sweep`` read these files.

    Args:
        filename: Name of the file inside the run folder.
    """

    def __init__(self, filename: str = RESULTS_FILENAME) -> None:
        self.filename = filename
        self.path: Path | None = None
        self.dirpath: Path | None = None  # the run folder (set by the CLI); None: the logger's folder
        self.identity: dict[str, Any] | None = None  # {"settings", "fingerprint"} of the tested model
        self.checkpoint: str | None = None

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items() if isinstance(v, torch.Tensor | float)
        }
        datamodule = trainer.datamodule
        hp = pl_module.hparams
        throughput = next((cb for cb in trainer.callbacks if isinstance(cb, InferenceThroughput)), None)
        reference = next((cb for cb in trainer.callbacks if isinstance(cb, ReferenceProtocol)), None)
        identity = self.identity
        if identity is None:
            settings = run_settings(trainer, pl_module, datamodule)
            identity = {"settings": settings, "fingerprint": fingerprint(settings)}
        result = RunResult(
            task=getattr(datamodule, "task", None) or "unknown",
            group=getattr(datamodule, "group", None),
            protocol=getattr(datamodule, "protocol", None),
            method=pl_module.method,
            test_acc=metrics["test/acc"],
            test_acc_best=metrics.get("test/acc_best"),
            throughput=metrics.get("test/throughput"),
            throughput_unmerged=metrics.get("test/throughput_unmerged"),
            speedup=metrics.get("test/speedup"),
            gflops=metrics.get("test/gflops"),
            gflops_unmerged=metrics.get("test/gflops_unmerged"),
            params=pl_module.parameter_count().as_dict(),
            config={
                "model_name": hp.model_name,
                "merge_r": merge_schedule(pl_module.model),
                "lora_rank": hp.lora_rank,
                "pyra": hp.pyra,
                "prop_attn": hp.prop_attn,
                "img_size": hp.img_size,
                "max_epochs": trainer.max_epochs,
                "seed": int(os.environ.get("PL_GLOBAL_SEED", "-1")),
                "precision": str(trainer.precision),
                # The training recipe (README: "Reproducing the paper"): ours or the reference's.
                "scheduler_step": hp.get("scheduler_step"),
                "lora_init": hp.get("lora_init"),
                "distilled_training": hp.get("distilled_training"),
                "drop_last": getattr(datamodule, "drop_last", None),
            },
            # The reference implementation's reported number (see ReferenceProtocol); only when
            # that callback ran (configs/recipe/reference.yaml adds it).
            test_acc_reference_protocol=reference.best if reference else None,
            reference_protocol=(
                {"val_interval": reference.val_interval, "evaluations": reference.evaluations}
                if reference
                else None
            ),
            benchmark={
                "batch_size": throughput.batch_size if throughput else None,
                "precision": throughput.precision if throughput else None,
                "device": str(pl_module.device),
            },
            settings=identity["settings"],
            fingerprint=identity["fingerprint"],
            checkpoint=self.checkpoint,
            curve=getattr(pl_module, "curve", None),  # elastic runs (training.elastic)
        )
        self.path = result.write((self.dirpath or results_dir(trainer)) / self.filename)
        rank_zero_info(f"results written to {self.path}")


class PredictionsCSV(pl.Callback):
    """Write ``predictions.csv`` into the run folder after ``predict``.

    One row per image of the predict split, in the split file's order: ``image`` (its path),
    ``label`` (the true label from the split file, empty where unknown), ``predicted`` (class
    index) and ``class_name`` (where the task has names: ``VTABDataModule.class_names``).

    Args:
        filename: Name of the file inside the run folder.
    """

    def __init__(self, filename: str = PREDICTIONS_FILENAME) -> None:
        self.filename = filename
        self.path: Path | None = None
        self.dirpath: Path | None = None  # the run folder (set by the CLI); None: the logger's folder
        self._predicted: list[int] = []

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1:
            raise ValueError(
                f"predict writes {self.filename} from one process; run it with --trainer.devices 1 "
                f"(got {trainer.world_size} processes)"
            )
        self._predicted = []

    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._predicted.extend(int(index) for index in torch.as_tensor(outputs).reshape(-1).tolist())

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loaders = trainer.predict_dataloaders
        dataset = (loaders[0] if isinstance(loaders, list | tuple) else loaders).dataset
        records = getattr(dataset, "records", None)
        task_dir = Path(getattr(dataset, "task_dir", "."))
        names = getattr(trainer.datamodule, "class_names", None)
        lines = io.StringIO()
        writer = csv.writer(lines)
        writer.writerow(["image", "label", "predicted", "class_name"])
        for index, predicted in enumerate(self._predicted):
            record = records[index] if records is not None and index < len(records) else None
            writer.writerow(
                [
                    str(task_dir / record.path) if record is not None else index,
                    record.label if record is not None else "",
                    predicted,
                    names[predicted] if names is not None and 0 <= predicted < len(names) else "",
                ]
            )
        self.path = (self.dirpath or results_dir(trainer)) / self.filename
        atomic_write_text(self.path, lines.getvalue())
        rank_zero_info(f"predictions written to {self.path}")
